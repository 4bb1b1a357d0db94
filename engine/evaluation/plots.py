"""PNG plots of an evaluation: DET curves, genuine/impostor histograms, unlinkability.

Every axis is labelled. DET axes start at what the data resolve: FMR at ``1 / impostor
comparisons`` and FNMR at ``1 / genuine comparisons`` (an error rate below one comparison is
not measured; a zero rate is drawn on the axis edge); a curve with no error at some threshold
lies on the axes' lower and left edges, so the panel says so in words instead of showing an
apparently empty plot.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import det_points, error_rates

_TICKS = np.array([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 5e-2, 0.2, 0.5])
_TOP = 0.6


def _grid(plt, n: int):
    cols = min(3, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[n:]:
        ax.axis("off")
    return fig, list(axes[:n])


def _save(plt, fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def error_free(genuine: np.ndarray, impostor: np.ndarray) -> bool:
    """True when some threshold makes no error at all (FMR = FNMR = 0)."""
    r = error_rates(genuine, impostor)
    return bool(np.any((r.fmr == 0) & (r.fnmr == 0)))


def _det_panel(ax, results, scen: str, title: str, norm) -> None:
    ppf = lambda v: norm.ppf(np.clip(v, 1e-9, 1 - 1e-9))  # noqa: E731
    n_imp = max(len(r.arrays[scen]) for r in results)
    n_gen = max(len(r.arrays["genuine"]) for r in results)
    x_lo, y_lo = 1.0 / n_imp, 1.0 / n_gen
    clean = []
    for r in results:
        gen, imp = r.arrays["genuine"], r.arrays[scen]
        fmr, fnmr = det_points(gen, imp)
        # a zero error rate is drawn on the axis edge (the axis ends at what the counts resolve)
        fmr, fnmr = np.maximum(fmr, x_lo * 0.8), np.maximum(fnmr, y_lo * 0.8)
        label = r.record.label
        style = dict(color="k", lw=2.2, ls="--") if r.record.scheme == "unprotected" else dict(lw=1.6)
        ax.plot(ppf(fmr), ppf(fnmr), label=label, **style)
        if error_free(gen, imp):
            clean.append(label)
    xt, yt = _TICKS[(_TICKS >= x_lo * 0.999) & (_TICKS <= _TOP)], _TICKS[(_TICKS >= y_lo * 0.999) & (_TICKS <= _TOP)]
    ax.set_xticks(ppf(xt))
    ax.set_xticklabels([f"{t:g}" for t in xt])
    ax.set_yticks(ppf(yt))
    ax.set_yticklabels([f"{t:g}" for t in yt])
    ax.set_xlim(ppf(x_lo * 0.8), ppf(_TOP))
    ax.set_ylim(ppf(y_lo * 0.8), ppf(_TOP))
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(f"FMR (false match rate; axis from 1/{n_imp:,} impostor comparisons)")
    ax.set_ylabel(f"FNMR (false non-match rate; from 1/{n_gen:,} genuine)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    if clean:
        everyone = len(clean) == len(results)
        who = "every curve" if everyone else ", ".join(clean)
        ax.text(0.5, 0.5, f"no errors for {who}: at some threshold every genuine pair\nmatches and no impostor "
                          "does (FMR = FNMR = 0);\nsuch a curve runs along the lower and left edges",
                transform=ax.transAxes, fontsize=8, va="center", ha="center",
                bbox=dict(boxstyle="round", fc="lightyellow", ec="0.6"))


def plot_all(results: list, synthetic: bool, out: str | Path) -> list[str]:
    """Write ``det.png``, ``scores.png`` and ``unlinkability.png`` into ``out``; their paths.

    ``results``: :class:`~engine.evaluation.records.SchemeResult` with score arrays."""
    from .._optional import require
    matplotlib = require("matplotlib", feature="the evaluation plots (--no-plots skips them)")
    require("scipy", feature="the evaluation plots (--no-plots skips them)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    out = Path(out)
    ok = [r for r in results if r.record.status == "ok" and r.arrays]
    if not ok:
        return []
    linked = [r for r in ok if r.linkage is not None]
    tag = " [SYNTHETIC DATA]" if synthetic else ""
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.4))
    _det_panel(axes[0], ok, "impostor_normal", f"DET, normal (secret key){tag}", norm)
    _det_panel(axes[1], ok, "impostor_stolen", f"DET, stolen token{tag}", norm)
    fig.tight_layout()
    files.append(_save(plt, fig, out / "det.png"))

    fig, axes = _grid(plt, len(ok))
    for ax, r in zip(axes, ok):
        a, rec = r.arrays, r.record
        lo = min(a["genuine"].min(), a["impostor_normal"].min(), a["impostor_stolen"].min())
        hi = max(a["genuine"].max(), a["impostor_normal"].max(), a["impostor_stolen"].max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 80)
        ax.hist(a["impostor_normal"], bins, density=True, alpha=0.45, color="tab:red", label="impostor, normal")
        if a["impostor_stolen"] is not a["impostor_normal"]:  # keyless and HE rows: one scenario
            ax.hist(a["impostor_stolen"], bins, density=True, histtype="step", lw=1.6,
                    color="tab:orange", label="impostor, stolen token")
        ax.hist(a["genuine"], bins, density=True, alpha=0.45, color="tab:green", label="genuine")
        eer_n, eer_s = rec.normal.eer, rec.stolen_token.eer
        ax.set_title(f"{rec.label}  EER {100 * eer_n:.2f}% / {100 * eer_s:.2f}%", fontsize=9)
        ax.set_xlabel("similarity (higher = more alike)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle(f"Genuine and impostor scores{tag}")
    fig.tight_layout()
    files.append(_save(plt, fig, out / "scores.png"))

    if linked:
        fig, axes = _grid(plt, len(linked))
        for ax, r in zip(axes, linked):
            lk, a = r.linkage, r.arrays
            ax.hist(a["nonmated"], lk.bin_edges, density=True, alpha=0.45, color="tab:red", label="non-mated")
            ax.hist(a["mated"], lk.bin_edges, density=True, alpha=0.45, color="tab:green", label="mated")
            ax2 = ax.twinx()
            ax2.plot(lk.bin_centers, lk.d_local, color="tab:blue", lw=1.8, label="D↔(s)")
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("local linkability D↔(s)", fontsize=8)
            u = r.record.unlinkability
            ax.set_title(f"{r.record.label}  D_sys {u.d_sys:.3f} (null {u.d_null:.3f})", fontsize=9)
            ax.set_xlabel("linkage score (A vs B templates)")
            ax.set_ylabel("density")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
        fig.suptitle(f"Unlinkability: application A vs B templates{tag}")
        fig.tight_layout()
        files.append(_save(plt, fig, out / "unlinkability.png"))
    return files
