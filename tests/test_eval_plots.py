"""Plots: labelled axes, FMR axis limited to what the impostor count resolves, a note where a
curve has no errors."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from engine.evaluation import evaluate, plots  # noqa: E402

FAST = dict(attack_templates=4, attack_steps=20, null_repeats=3, n_gallery=100, speed_repeats=2, bootstrap=100,
            he_probes=3, he_gallery=32, progress=False)


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plotting code saves, kept open for inspection."""
    import matplotlib.pyplot as plt
    saved = {}

    def keep(plt_, fig, path):
        saved[path.name] = fig
        return str(path)

    monkeypatch.setattr(plots, "_save", keep)
    yield saved
    for fig in saved.values():
        plt.close(fig)


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.axison]


def test_every_axis_is_labelled(tmp_path, figures):
    rep = evaluate(schemes=["biohash:bits=64", "he"], subjects=20, samples=3, dim=32, seed=0, plots=False, **FAST)
    plots.plot_all(rep.results, True, tmp_path)
    assert set(figures) == {"det.png", "scores.png", "unlinkability.png"}
    for name, fig in figures.items():
        for ax in _visible_axes(fig):
            twin = name == "unlinkability.png" and ax.get_ylabel().startswith("local")  # shares the x axis
            assert ax.get_xlabel() or twin, name
            assert ax.get_ylabel(), (name, ax.get_title())


def test_det_fmr_axis_starts_at_one_impostor_and_notes_error_free_curves(tmp_path, figures):
    from scipy.stats import norm

    from engine.evaluation.data import Dataset
    from tests.conftest import clustered

    x = clustered(np.random.default_rng(0), 12, 3, 32, noise=0.3).reshape(36, 32)
    ds = Dataset(x, np.repeat(np.arange(12), 3), [f"s{i}" for i in range(12)], "well-separated clusters")
    rep = evaluate(ds, ["rotation"], seed=0, plots=False, **FAST)
    n_imp = rep.record("unprotected")["normal"]["n_impostor"]
    plots.plot_all(rep.results, True, tmp_path)
    left, right = _visible_axes(figures["det.png"])
    for ax in (left, right):
        lo = norm.cdf(ax.get_xlim()[0])
        assert 0.5 / n_imp < lo <= 1.0 / n_imp                      # not below what the data resolve
        ticks = [float(t.get_text()) for t in ax.get_xticklabels() if t.get_text()]
        assert min(ticks) >= 1.0 / n_imp
        assert f"1/{n_imp:,} impostor" in ax.get_xlabel() and ax.get_ylabel().startswith("FNMR")
    # well separated clusters: no error at some threshold
    assert rep.record("unprotected")["eer"] == 0.0
    notes = [t.get_text() for t in left.texts]
    assert any("no errors" in t and ("unprotected" in t or "every curve" in t) for t in notes), notes


def test_error_free_detection():
    assert plots.error_free(np.array([0.9, 0.8]), np.array([0.1, 0.2]))
    assert not plots.error_free(np.array([0.9, 0.15]), np.array([0.1, 0.2]))
