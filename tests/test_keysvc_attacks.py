"""keysvc: the protocol-attacks study of ``veilface eval`` -- its statistics, the linkage and
device-state analyses on their own, one quick run against the real services (every current row
at chance or refused, every control succeeding), and its place in report.json / report.md."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.evaluation.studies import protocol_attacks as pa

REQUIRED = {"attack", "scheme", "success", "ci_low", "ci_high", "n", "chance"}


def test_clopper_pearson_and_the_chance_cosine():
    assert pa.clopper_pearson(0, 20) == (0.0, pytest.approx(1 - 0.025 ** (1 / 20)))
    assert pa.clopper_pearson(20, 20) == (pytest.approx(0.025 ** (1 / 20)), 1.0)
    lo, hi = pa.clopper_pearson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.01)
    t = pa.chance_cosine(128)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((60_000, 128))
    v = rng.standard_normal(128)
    cos = np.abs(u @ v) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v))
    assert abs(float((cos >= t).mean()) - pa.ALPHA) < 5e-4
    assert 3.0 / math.sqrt(128) < t < 3.6 / math.sqrt(128)


def test_probe_pairs_link_versions_and_single_probes_do_not():
    from engine.keys import KeyDeriver
    from engine.schemes import make_scheme
    scheme = make_scheme("biohash:bits=256,dim=64")
    kd = KeyDeriver(bytes(range(32)), "t")
    rng = np.random.default_rng(1)
    n = 30
    x = rng.standard_normal((n, 64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(n)
    k1, k2 = (kd.derive("group.p", v, scheme.spec) for v in (1, 2))
    old = {f"old{i}": scheme.protect(k1, x[i], key_version=1).to_bytes() for i in range(n)}
    new = {f"new{perm[i]}": scheme.protect(k2, x[i], key_version=2).to_bytes() for i in range(n)}
    pairs, singles = [], []
    for _ in range(60):
        i = int(rng.integers(n))
        c = x[i] + 0.2 * rng.standard_normal(64) / 8
        pairs += [("d", scheme.protect(k1, c, key_version=1).to_bytes()), ("d", scheme.protect(k2, c, key_version=2).to_bytes())]
        singles += [("d", scheme.protect(k2, c, key_version=2).to_bytes())]
    def rank1(probes):
        links = pa.link_by_probe_pairs(scheme, probes, old, new)
        return sum(links[f"new{perm[i]}"] == f"old{i}" for i in range(n)) / n
    assert rank1(pairs) > 0.8
    assert rank1(singles) < 0.25


def test_device_secrets_are_found_in_its_files(tmp_path):
    secret = bytes(range(32))
    (tmp_path / "keystore.json").write_text(json.dumps({"master_secret": secret.hex()}))
    (tmp_path / "blob.bin").write_bytes(b"\xff\x00" + secret + b"\x01")
    found = pa._secrets_in(tmp_path)
    assert secret in found and secret.hex().encode() in found


@pytest.fixture(scope="module")
def quick_run():
    pytest.importorskip("tenseal")
    pytest.importorskip("scipy")
    from engine.evaluation.data import load
    from engine.evaluation.protocol import Options
    from engine.evaluation.scores import ScoreContext
    opts = Options(**Options.QUICK)
    ds = load(None, subjects=40, samples=3, dim=128, seed=0).with_min_samples(2)
    return pa.run(ScoreContext(ds, opts), subjects=12, quick=True)


def test_quick_run_against_the_services(quick_run):
    recs = quick_run.records
    rows = {(r.attack, r.protocol.split(":")[0]): r for r in recs}
    for r in recs:
        assert 0 <= r.ci_low <= r.success <= r.ci_high <= 1 and r.n > 0 and 0 <= r.chance <= 1
    attacks = {r.attack for r in recs}
    assert attacks >= {"he_verify_divide_out", "he_verify_score_oracle", "he_identify_gallery_dump",
                       "he_identify_score_leak", "device_compromise_offline", "device_compromise_online",
                       "version_linkage", "cross_tenant_linkage", "forged_decision", "replayed_decision",
                       "replayed_grant", "self_reported_decision", "lockout_lift"}
    # refused outright: no successes at all
    for a in ("he_identify_score_leak", "forged_decision", "replayed_decision", "replayed_grant",
              "self_reported_decision", "lockout_lift"):
        assert rows[(a, "current")].successes == 0, a
    # recoveries at chance now, and the attack has the power to succeed against the old behaviour
    for a in ("he_verify_divide_out", "he_identify_gallery_dump", "device_compromise_offline"):
        assert rows[(a, "current")].successes <= 1, a
        assert rows[(a, "control")].success >= 0.9, a
    assert rows[("he_verify_divide_out", "current")].mean_abs_cos < 0.2
    assert rows[("he_verify_divide_out", "control")].mean_abs_cos > 0.99
    for a in ("version_linkage", "cross_tenant_linkage"):
        assert rows[(a, "control")].success >= 0.8, a
        assert rows[(a, "current")].success <= rows[(a, "control")].success - 0.4, a
    assert "refused by the key service's norm check" in rows[("he_verify_score_oracle", "current")].note


def test_the_study_lands_in_report_json_and_md(quick_run, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from engine.evaluation import evaluate
    monkeypatch.setattr(pa, "run", lambda ctx, subjects, quick: quick_run)
    rep = evaluate(schemes=["rotation"], subjects=10, samples=3, dim=32, quick=True, plots=False, progress=False,
                   protocol_attacks=True, out=tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["protocol_attacks"] and all(REQUIRED <= set(r) for r in doc["protocol_attacks"])
    assert {"current"} <= {r["protocol"] for r in doc["protocol_attacks"]}
    md = (tmp_path / "report.md").read_text()
    assert "## Protocol attacks" in md and "he_verify_divide_out" in md
    off = evaluate(schemes=["rotation"], subjects=10, samples=3, dim=32, quick=True, plots=False, progress=False)
    assert "protocol_attacks" not in off.to_dict()
    del rep
