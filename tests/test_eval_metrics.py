"""Metric code on cases with known answers."""
import numpy as np
import pytest
from scipy.stats import norm

from engine.errors import InvalidParameter
from engine.evaluation import metrics as M


def test_eer_separable_is_zero_and_identical_is_half():
    assert M.eer([0.8, 0.9, 1.0], [0.1, 0.2, 0.7])[0] == 0.0
    assert M.eer([2.0], [1.0])[0] == 0.0
    assert M.eer([0.0, 1.0], [0.0, 1.0])[0] == pytest.approx(0.5)
    r = np.random.default_rng(0)
    same = r.normal(0, 1, 20000)
    assert M.eer(same[:10000], same[10000:])[0] == pytest.approx(0.5, abs=0.02)


def test_eer_gaussian_matches_closed_form():
    r = np.random.default_rng(1)
    g, i = r.normal(2.0, 1.0, 20000), r.normal(0.0, 1.0, 200000)
    e, t = M.eer(g, i)
    assert e == pytest.approx(norm.cdf(-1.0), abs=0.006)
    assert t == pytest.approx(1.0, abs=0.03)


def test_error_rates_and_threshold_at_fmr_exact():
    imp = np.arange(1000) / 1000.0          # 0.000 ... 0.999
    gen = np.array([0.95, 0.9985, 0.9995, 1.5])
    t = M.threshold_at_fmr(imp, 1e-2)
    assert np.mean(imp >= t) == pytest.approx(0.01)
    assert 0.989 < t <= 0.990 + 1e-12
    t3 = M.threshold_at_fmr(imp, 1e-3)
    assert np.mean(imp >= t3) == pytest.approx(0.001)
    assert M.fnmr_at_fmr(gen, imp, 1e-3) == pytest.approx(0.25)   # only 0.95 < t3 (~0.999)
    assert M.fnmr_at_fmr(gen, imp, 1e-4) == pytest.approx(0.50)   # target below resolution: above max
    r = M.error_rates(gen, imp)
    assert np.all(np.diff(r.fmr) <= 0) and np.all(np.diff(r.fnmr) >= 0)
    assert r.fmr[-1] == 0 and r.fnmr[-1] == 1
    s = M.accuracy_summary(gen, imp)
    assert s["fmr_resolvable"] == {"0.01": True, "0.001": False, "0.0001": False}
    with pytest.raises(InvalidParameter):
        M.eer([], [1.0])
    with pytest.raises(InvalidParameter):
        M.eer([np.nan], [1.0])


def test_dsys_identical_distributions_is_at_null_level():
    r = np.random.default_rng(2)
    pool = r.normal(0, 1, 300000)
    mated, nonmated = pool[:3000], pool[3000:103000]
    lk = M.linkability(mated, nonmated)
    null = M.d_sys_null(nonmated, len(mated), len(nonmated), repeats=10, rng=3)
    assert lk.d_sys < 0.08
    assert abs(lk.d_sys - null["mean"]) < 4 * null["sd"] + 0.01
    # the bias shrinks with the sample size
    small = M.d_sys_null(nonmated, 200, 5000, repeats=10, rng=4)["mean"]
    assert small > null["mean"]


def test_dsys_disjoint_distributions_is_one_and_partial_overlap_in_between():
    r = np.random.default_rng(3)
    assert M.linkability(r.normal(10, 1, 4000), r.normal(0, 1, 50000)).d_sys == pytest.approx(1.0)
    mid = M.linkability(r.normal(1.5, 1, 4000), r.normal(0, 1, 50000)).d_sys
    assert 0.2 < mid < 0.8


def test_dlocal_definition():
    # two bins: mated 3/4 in bin 2, non-mated 1/4 there -> LR = 3 -> D = 2*3/4 - 1 = 0.5
    mated = np.array([0.1, 0.9, 0.9, 0.9])
    nonmated = np.array([0.1, 0.1, 0.1, 0.9])
    lk = M.linkability(mated, nonmated, bins=2, score_range=(0.0, 1.0))
    np.testing.assert_allclose(lk.d_local, [0.0, 0.5])
    assert lk.d_sys == pytest.approx(0.75 * 0.5)


def test_histogram_edges_align_to_discrete_scores():
    s = np.arange(100, 161) / 256.0            # Hamming-type lattice
    e = M.histogram_edges(s, bins=100)
    counts = np.histogram(s, e)[0]
    assert counts.min() == counts.max() == 1    # one lattice level per bin, no aliasing
    e2 = M.histogram_edges(s, bins=20)
    counts2 = np.histogram(s, e2)[0]
    assert counts2.sum() == len(s) and counts2.max() - counts2[:-1].min() == 0


def test_bootstrap_ci():
    v = np.r_[np.ones(30), np.zeros(70)]
    m, lo, hi = M.bootstrap_ci(v, rng=0)
    assert m == pytest.approx(0.3) and lo < 0.3 < hi and hi - lo < 0.25
    assert M.bootstrap_ci(np.ones(10), rng=0) == (1.0, 1.0, 1.0)
