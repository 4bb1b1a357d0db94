"""Evaluation report: ``report.json`` (one record per scheme and parameter set), ``report.md``
(tables) and PNG plots (DET curves, score histograms, unlinkability)."""
from __future__ import annotations

import json
import math
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidParameter
from .records import to_dict

PROTOCOL_MD = """\
**Protocol.** Genuine pairs: every pair of two samples of one subject. Impostor pairs: pairs of
samples of two different subjects; pair *(i, j)* reads "probe *i* claims the identity enrolled
with sample *j*". Every scheme and scenario scores the same sample pairs. With a pairs file
(LFW `pairs.txt`) the genuine and impostor pairs are exactly the listed ones.

* **normal (secret key)**: each subject's samples are protected with that subject's own key.
  A genuine user holds the claimed identity's token; an impostor does **not**, so his probe is
  protected with *his own* key and compared with the victim's template under *the victim's*
  key (two different keys). This is the favourable case that makes cancellable schemes look
  better than the unprotected embedding.
* **stolen-token**: the impostor holds the victim's token: every probe is protected with the
  *claimed* subject's key. This is the worst case and the one to set thresholds on.
* **unlinkability** (Gomez-Barrero et al., IEEE TIFS 2018): templates of application A vs
  application B (independent keys per subject); mated = same subject, different samples;
  non-mated = different subjects. D_sys from normalised histograms (omega = 1).
  D_null = D_sys of two samples of the non-mated scores with the sizes of the real test,
  drawn with the mated set's structure (each subject paired with one random other subject,
  as many pairs per subject as it has mated pairs), mean over repeats: the small-sample
  bias. All scores of one subject share one key pair, so with few subjects D_sys is biased
  up far more than an i.i.d. resample shows (D_null i.i.d. is reported too). A D_sys within
  D_null (up to its p95) means "no measurable linkability at this sample size".
* **irreversibility**: full disclosure (template + key); success = the reconstruction matches
  the original sample (type I) or the subject's other samples (type II) at the *unprotected*
  system's cosine threshold for FMR 0.1% / 0.01%; 95% bootstrap CIs.
* **renewability**: old template (key version 1) vs the re-keyed enrolment (version 2) of the
  same subject, other samples; match rate at the stolen-token threshold for FMR 0.1%
  (impostor level = that FMR).
"""


def _pct(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.{digits}f}%"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def check_out_dir(out: str | Path) -> Path:
    """Create ``out`` if needed and make sure files can be written there -- before any work.
    Raises :class:`InvalidParameter` with what to do instead."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidParameter(f"--out {out} is a file, not a directory; choose a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".veilface-write-test-"):
            pass
    except OSError as exc:
        raise InvalidParameter(f"cannot write reports to {out}: {exc.strerror or exc}; choose a writable "
                               "directory with --out") from None
    return out


def _match_ms(sp: dict, gallery: str) -> str:
    if not sp:
        return "–"
    if sp.get("search_1n_ms") is None and sp.get("verify_ms") is not None:
        return f"1:1 {_num(sp['verify_ms'], 2)}"
    return _num(sp.get("search_1n_ms"), 2) + gallery


@dataclass
class Report:
    """Result of :func:`engine.evaluation.evaluate`."""

    dataset: dict
    results: list
    config: dict
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    protocol_attacks: Any = None     # keysvc: studies.protocol_attacks.ProtocolAttacks | NotApplicable | None

    @property
    def records(self) -> list[dict]:
        """One JSON-serialisable dict per scheme and parameter set (first: ``unprotected``)."""
        return [r.as_dict() for r in self.results]

    def record(self, label: str) -> dict:
        """The record whose ``label`` or ``factory`` is ``label``."""
        for r in self.records:
            if label in (r["label"], r["factory"]):
                return r
        raise KeyError(label)

    def to_dict(self) -> dict:
        return to_dict({"tool": "veilface eval", "dataset": self.dataset,
                          "synthetic": bool(self.dataset.get("synthetic")), "config": self.config,
                          "machine": {"python": platform.python_version(), "machine": platform.machine(),
                                      "processor": platform.processor() or None},
                          "seconds": self.seconds, "records": self.records,
                          **self._attacks_dict()})

    def _attacks_dict(self) -> dict:
        """keysvc: ``protocol_attacks`` (list of {attack, scheme, success, ci_low, ci_high, n, chance, ...})."""
        pa = self.protocol_attacks
        if pa is None:
            return {}
        if not hasattr(pa, "records"):
            return {"protocol_attacks": [], "protocol_attacks_note": getattr(pa, "note", str(pa))}
        return {"protocol_attacks": pa.records, "protocol_attacks_settings": {**pa.settings, "seconds": pa.seconds}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    # -- markdown -----------------------------------------------------------------------
    def summary_table(self) -> str:
        """The headline table (Markdown)."""
        head = ("| scheme | bytes | EER normal | EER stolen-token | FNMR@FMR 1e-3 stolen-token | "
                "D_sys (D_null) | inversion type I / II @FMR 0.1% | renewed match | protect µs | "
                "1:N ms |")
        rows = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in self.records:
            if r["status"] != "ok":
                rows.append(f"| {r['label']} | {r.get('bytes_per_template') or '–'} | "
                            f"skipped: {r.get('reason', '')} ||||||||")
                continue
            st = r["stolen_token"]
            unl = r["unlinkability"]
            inv = r.get("inversion_success")
            inv_s = (f"{_pct(inv['0.001']['type1'], 1)} / {_pct(inv['0.001']['type2'], 1)}" if inv
                     else ("IND-CPA" if r["scheme"] == "he" else "n/a"))
            unl_s = (f"{_num(unl['d_sys'])} ({_num(unl['d_null'])})" if "d_sys" in unl
                     else ("IND-CPA" if r["scheme"] == "he" else "n/a"))
            ren = r.get("renewability") or {}
            sp = r.get("speed") or {}
            gallery = ((f" ({sp['n_gallery'] // 1000}k)" if sp["n_gallery"] >= 1000 else f" ({sp['n_gallery']})")
                       if sp else "")
            rows.append(
                f"| {r['label']} | {r['bytes_per_template']} | {_pct(r['eer'])} | {_pct(r['eer_stolen_token'])} | "
                f"{_pct(st['fnmr_at_fmr']['0.001'])}{'' if st['fmr_resolvable']['0.001'] else '†'} | "
                f"{unl_s} | {inv_s} | "
                f"{_pct(ren.get('match_rate'), 2) if ren.get('status') == 'ok' else 'n/a'} | "
                f"{_num(sp.get('protect_us_single', (sp.get('protect_probe_ms') or 0) * 1e3), 1) if sp else '–'} | "
                f"{_match_ms(sp, gallery)} |")
        return "\n".join(rows)

    def to_markdown(self, plots: list[str] | None = None) -> str:
        ds = self.dataset
        lines = ["# Veilface evaluation report", ""]
        if ds.get("synthetic"):
            m = ds.get("measured", {})
            lines += ["> **SYNTHETIC DATA.** These embeddings were generated (identities as clusters on the "
                      "unit hypersphere), not measured on faces. Use them to compare schemes with each other, "
                      "not as the accuracy of any real face model. "
                      f"Genuine cosine {m.get('genuine_cosine_mean')} ± {m.get('genuine_cosine_sd')}, "
                      f"impostor {m.get('impostor_cosine_mean')} ± {m.get('impostor_cosine_sd')}.", ""]
        lines += [f"Data: `{ds['source']}` — {ds['n_embeddings']} embeddings of {ds['n_subjects']} subjects "
                  f"(d = {ds['dim']}, {ds['samples_per_subject']['min']}–{ds['samples_per_subject']['max']} "
                  f"samples each). Comparisons: {self.config['pairs']['genuine']} genuine, "
                  f"{self.config['pairs']['impostor']} impostor"
                  f"{' (random subset)' if self.config['pairs']['impostor_sampled'] else ''}"
                  f"{self._listed_note()}, "
                  f"{self.config['pairs']['mated_linkage']} mated linkage pairs. Seed {self.config['seed']}; "
                  f"run time {self.seconds:.1f} s.", ""]
        if ds.get("failed"):
            lines += [f"{len(ds['failed'])} photos could not be embedded and were skipped.", ""]
        lines += ["## Summary", "", self.summary_table(), "",
                  "EER/FNMR: lower is better. D_sys ∈ [0, 1]: 0 = unlinkable, 1 = fully linkable; compare with "
                  "D_null (small-sample bias). Inversion: fraction of reconstructions accepted by the unprotected "
                  "system (lower is better). Renewed match: old template vs re-keyed enrolment at the stolen-token "
                  "threshold for FMR 0.1% (impostor level ≈ 0.1%). † FMR target below the resolution of the "
                  "number of impostor comparisons (< 3/FMR).", "", PROTOCOL_MD, ""]
        lines += self._accuracy_md() + self._folds_md() + self._privacy_md() + self._attacks_md() + self._speed_md()
        skipped = [r for r in self.records if r["status"] != "ok"]
        if skipped:
            lines += ["## Skipped", ""] + [f"* `{r['factory']}`: {r.get('reason')}" for r in skipped]
            for r in skipped:
                for part in ("unlinkability", "inversion"):
                    note = (r.get(part) or {}).get("note")
                    if note:
                        lines.append(f"  * {part}: {note}")
            lines.append("")
        if plots:
            lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
        return "\n".join(lines)

    def _listed_note(self) -> str:
        pairs = self.config["pairs"]
        if pairs.get("source") != "listed":
            return ""
        listed = self.dataset.get("n_listed_pairs")
        used = pairs["genuine"] + pairs["impostor"]
        dropped = f"; {listed - used} listed pairs dropped (image not embedded)" if listed and listed > used else ""
        folds = f", {pairs['folds']} folds" if pairs.get("folds") else ""
        return f" (exactly the pairs listed in the file{folds}{dropped})"

    def _folds_md(self) -> list[str]:
        rows = [r for r in self._ok() if r.get("folds")]
        if not rows:
            return []
        n = rows[0]["folds"]["normal"]["n_folds"]
        out = [f"## Pairs-file protocol: {n}-fold accuracy (LFW)", "",
               f"Per fold, the threshold with the best accuracy on the other {n - 1} folds; accuracy = "
               "(genuine accepted + impostors rejected) / pairs of the fold. Mean ± standard deviation over folds "
               "(standard error = sd / √folds).", "",
               "| scheme | scenario | accuracy mean ± sd | standard error | min / max fold |", "|---|---|--:|--:|--:|"]
        for r in rows:
            for scen in ("normal", "stolen_token"):
                f = r["folds"][scen]
                out.append(f"| {r['label']} | {scen.replace('_', '-')} | {_pct(f['mean'])} ± {_pct(f['std'])} | "
                           f"{_pct(f['std_error'])} | {_pct(min(f['accuracy']))} / {_pct(max(f['accuracy']))} |")
                if r["normal"] == r["stolen_token"]:
                    break
        return out + [""]

    def _ok(self):
        return [r for r in self.records if r["status"] == "ok"]

    def _accuracy_md(self) -> list[str]:
        out = ["## Accuracy (ISO/IEC 19795-1)", "",
               "| scheme | scenario | EER | FNMR@FMR 1e-2 | FNMR@FMR 1e-3 | FNMR@FMR 1e-4 | thr@FMR 1e-3 | genuine / impostor pairs |",
               "|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in self._ok():
            for scen in ("normal", "stolen_token"):
                a = r[scen]
                f = a["fnmr_at_fmr"]
                mark = {k: "" if a["fmr_resolvable"][k] else "†" for k in f}
                out.append(f"| {r['label']} | {scen.replace('_', '-')} | {_pct(a['eer'])} | "
                           + " | ".join(f"{_pct(f[k])}{mark[k]}" for k in ("0.01", "0.001", "0.0001"))
                           + f" | {_num(a['threshold_at_fmr']['0.001'], 4)} | {a['n_genuine']} / {a['n_impostor']} |")
                if r["scheme"] == "unprotected":
                    break
        return out + [""]

    def _privacy_md(self) -> list[str]:
        out = ["## Privacy (ISO/IEC 24745, ISO/IEC 30136)", "", "### Unlinkability", "",
               "| scheme | D_sys | D_null mean (p95) | D_null i.i.d. | mated / non-mated scores | subjects | bins |",
               "|---|--:|--:|--:|--:|--:|--:|"]
        for r in self._ok():
            u = r["unlinkability"]
            if "d_sys" not in u:
                out.append(f"| {r['label']} | {u.get('note', 'n/a')} ||||||")
                continue
            out.append(f"| {r['label']} | {_num(u['d_sys'])} | {_num(u['d_null'])} ({_num(u['d_null_p95'])}) | "
                       f"{_num(u['d_null_iid'])} | {u['n_mated']} / {u['n_nonmated']} | {u['n_subjects']} | "
                       f"{u['bins']} |")
        thr = self.config.get("unprotected_thresholds", {})
        out += ["", "### Irreversibility (full disclosure: template + key)", "",
                "Unprotected cosine thresholds: " + ", ".join(
                    f"FMR {k}: {v:.4f}{'' if self.config['pairs']['impostor'] >= 3 / float(k) else '†'}"
                    for k, v in thr.items()), "",
                "| scheme | attack | templates | mean cos | type I @0.1% [95% CI] | type II @0.1% [95% CI] | "
                "type I @0.01% | type II @0.01% |", "|---|---|--:|--:|--:|--:|--:|--:|"]
        for r in self._ok():
            inv = r.get("inversion") or {}
            if inv.get("status") != "ok":
                continue
            a, b = inv["0.001"], inv["0.0001"]
            ci = lambda d: f"{_pct(d['rate'], 1)} [{_pct(d['ci95'][0], 1)}, {_pct(d['ci95'][1], 1)}]"  # noqa: E731
            out.append(f"| {r['label']} | {inv['method']}{' (±x̂: 2 attempts)' if inv['candidates'] == 2 else ''} | "
                       f"{inv['n_attacked']} | {_num(inv['mean_cosine_type1'])} | {ci(a['type1'])} | "
                       f"{ci(a['type2'])} | {_pct(b['type1']['rate'], 1)} | {_pct(b['type2']['rate'], 1)} |")
        out += ["", "### Renewability (old template vs re-keyed enrolment)", "",
                "| scheme | match rate [95% CI] | same capture | impostor rate normal / stolen-token | genuine rate | D_sys old↔new |",
                "|---|--:|--:|--:|--:|--:|"]
        for r in self._ok():
            n = r.get("renewability") or {}
            if n.get("status") != "ok":
                continue
            out.append(f"| {r['label']} | {_pct(n['match_rate'])} [{_pct(n['match_rate_ci95'][0])}, "
                       f"{_pct(n['match_rate_ci95'][1])}] | {_pct(n['match_rate_same_capture'])} | "
                       f"{_pct(n['impostor_rate_normal'], 3)} / {_pct(n['impostor_rate_stolen_token'], 3)} | "
                       f"{_pct(n['genuine_rate'])} | {_num(n['d_sys_old_vs_new'])} |")
        return out + [""]

    def _attacks_md(self) -> list[str]:
        """keysvc: the protocol-attacks table."""
        pa = self.protocol_attacks
        if pa is None:
            return []
        if not hasattr(pa, "records"):
            return ["## Protocol attacks", "", f"Not run: {getattr(pa, 'note', pa)}", ""]
        out = ["## Protocol attacks (against the running services)", "",
               "Each attack runs against a key service and a matcher on loopback (real gRPC), with the device SDK "
               "and the attacker's own code. *control* rows re-create the old protocol's weakness in the same run, "
               "so a *current* row at chance is the defence, not a weak attack. Success rates with Clopper-Pearson "
               "95% intervals; *chance* is what a guess achieves. Settings: "
               + ", ".join(f"{k} {v}" for k, v in pa.settings.items()) + f"; {pa.seconds:.0f} s.", "",
               r"| attack | scheme | protocol | success [95% CI] | n | chance | mean \|cos\| | criterion | notes |",
               "|---|---|---|--:|--:|--:|--:|---|---|"]
        for r in pa.records:
            cos = (f"{_num(r.mean_abs_cos)} (chance {_num(r.chance_mean_abs_cos)})" if r.mean_abs_cos is not None
                   else "–")
            out.append(f"| {r.attack} | `{r.scheme}` | {r.protocol} | {_pct(r.success, 1)} "
                       f"[{_pct(r.ci_low, 1)}, {_pct(r.ci_high, 1)}] | {r.n} | {_pct(r.chance, 2)} | {cos} | "
                       f"{r.criterion} | {r.note} |")
        return out + [""]

    def _speed_md(self) -> list[str]:
        out = ["## Speed and size (this machine, medians)", "",
               "| scheme | bytes | protect µs (single) | protect µs (batched) | key expansion ms | compare µs | "
               "1:N ms (1 query) | 1:N ms/query (16) | templates/s |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in self._ok():
            s = r.get("speed")
            if not s or "protect_us_single" not in s:
                continue
            out.append(f"| {r['label']} | {r['bytes_per_template']} | {_num(s['protect_us_single'], 1)} | "
                       f"{_num(s['protect_us_batched'], 2)} | {_num(s['key_expansion_ms'], 2)} | "
                       f"{_num(s['compare_us'], 1)} | {_num(s['search_1n_ms'], 2)} | "
                       f"{_num(s['search_1n_ms_per_query_batch16'], 2)} | "
                       f"{s['search_1n_templates_per_s']:.3g} |")
        if any((r.get("speed") or {}).get("protect_us_single") for r in self._ok()):
            n = next(r["speed"]["n_gallery"] for r in self._ok() if (r.get("speed") or {}).get("protect_us_single"))
            out += ["", f"1:N: native gallery (engine.gallery) of {n} templates, top-10."]
        for r in self._ok():
            s = r.get("speed") or {}
            if "enrol_ms_per_template_block" in s:
                e = r.get("decryption_error", {})
                match = (f"encrypted 1:N over {s['n_gallery']} templates {_num(s['search_1n_ms'], 1)} ms "
                         f"({_num(s['search_1n_templates_per_s'], 0)} templates/s, search only, decryption excluded)"
                         if s.get("search_1n_ms") is not None else f"encrypted 1:1 verify {_num(s.get('verify_ms'), 2)} ms")
                out += ["", f"**{r['label']}** (encrypted): enrol {_num(s['enrol_ms_per_template_block'], 2)} ms/template "
                        f"(block encryption), probe encryption {s['protect_probe_ms']:.1f} ms, {match}; "
                        f"decrypted vs plaintext scores: max |error| "
                        f"{e.get('max_abs', float('nan')):.2e}, mean {e.get('mean_abs', float('nan')):.2e}; "
                        f"plaintext EER on the same pairs {_pct(r['plaintext_same_pairs']['eer'])}."]
        return out + [""]

    # -- files --------------------------------------------------------------------------
    def save(self, out: str | Path, plots: bool = True) -> list[str]:
        """Write ``report.json``, ``report.md``, ``scores.npz`` (every score array, keyed
        ``"<label>|genuine"``, ``"|impostor_normal"``, ``"|impostor_stolen"``, ``"|mated"``,
        ``"|nonmated"``, ``"|renewed"``; float32) and (with ``plots``) the PNGs into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        pngs = self.plot(out) if plots else []
        (out / "report.json").write_text(self.to_json() + "\n")
        (out / "report.md").write_text(self.to_markdown(pngs) + "\n")
        arrays = {f"{r.record.label}|{k}": np.asarray(v, dtype=np.float32)
                  for r in self.results for k, v in r.arrays.items()}
        np.savez_compressed(out / "scores.npz", **arrays)
        self.files = [str(out / "report.json"), str(out / "report.md"), str(out / "scores.npz"), *pngs]
        return self.files

    def plot(self, out: str | Path) -> list[str]:
        """DET curves, genuine/impostor histograms, unlinkability plots -> PNG paths."""
        from .plots import plot_all
        return plot_all(self.results, bool(self.dataset.get("synthetic")), out)
