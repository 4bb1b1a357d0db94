"""Inversion attacks under full disclosure (the attacker knows the algorithm *and* the key).

ISO/IEC 24745 irreversibility is evaluated against the strongest realistic attacker: one who
stole a subject's protected template together with its transform key (token). Each attack
returns unit-norm estimates ``x_hat`` of the original embeddings; success is judged by the
unprotected system (cosine >= threshold), see :func:`inversion_success`.

* rotation:  exact inverse ``R^T y`` (:meth:`engine.schemes.Rotation.invert`).
* biohash:   ``x_hat = W (2b - 1)`` (the least-squares/"centre of the cone" estimate for the
  orthonormal projection ``W``), then refinement: gradient descent on a logistic loss of the
  sign constraints ``(2b_i - 1) w_i . x > 0`` on the unit sphere.
* iom (GRP): start from ``sum_i (w_{i,c_i} - mean_j w_{i,j})`` and maximise the softmax
  likelihood of the observed argmax indices, ``sum_i log softmax(beta W_i^T x)[c_i]`` (a smooth
  version of the margin constraints ``w_{i,c_i} . x >= w_{i,j} . x``), on the unit sphere.
* iom (URP): the same likelihood through the product-of-permuted-entries features, from the
  best of several random starts. For even ``p`` the code is invariant under ``x -> -x``: the
  attack can only recover ``+-x``; we keep the sign found by the optimiser (no oracle).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..schemes import Scheme
from .metrics import bootstrap_ci


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _ascend(x: np.ndarray, grad_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
            steps: int, lr: float) -> np.ndarray:
    """Riemannian gradient ascent on the unit sphere with Adam-style step scaling."""
    x = _unit(x)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    b1, b2 = 0.9, 0.999
    for t in range(1, steps + 1):
        _, g = grad_fn(x)
        g = g - np.sum(g * x, axis=1, keepdims=True) * x  # tangent component
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-12)
        x = _unit(x + lr * step / np.sqrt(x.shape[1]))
    return x


def invert_rotation(scheme, key: bytes, codes: np.ndarray, **_) -> np.ndarray:
    return _unit(np.asarray(scheme.invert(key, codes), dtype=np.float64))


def invert_biohash(scheme, key: bytes, codes: np.ndarray, steps: int = 150, **_) -> np.ndarray:
    w = np.asarray(scheme._material(key), dtype=np.float64)        # (dim, bits)
    s = np.unpackbits(np.asarray(codes, dtype=np.uint8), axis=1)[:, :scheme.bits] * 2.0 - 1.0
    x0 = s @ w.T                                                  # Q (2b - 1)
    beta = 4.0 * np.sqrt(scheme.dim)                              # w.x ~ 1/sqrt(dim) for unit x

    def grad(x):
        z = beta * s * (x @ w)                                    # margins, want > 0
        sig = 1.0 / (1.0 + np.exp(np.clip(z, -50, 50)))           # d/dz log sigmoid(z)
        return None, (beta * s * sig) @ w.T

    return _ascend(x0, grad, steps, lr=0.05)


def _iom_grp_grad(w3: np.ndarray, onehot: np.ndarray, beta: float):
    dim, m, q = w3.shape
    wf = w3.reshape(dim, m * q)

    def grad(x):
        y = (x @ wf).reshape(len(x), m, q) * beta
        y -= y.max(axis=2, keepdims=True)
        p = np.exp(y)
        p /= p.sum(axis=2, keepdims=True)
        return None, (beta * (onehot - p)).reshape(len(x), m * q) @ wf.T

    return grad


def invert_iom(scheme, key: bytes, codes: np.ndarray, steps: int = 200,
               rng: np.random.Generator | None = None, restarts: int = 4, **_) -> np.ndarray:
    codes = np.asarray(codes).astype(np.int64)
    n, m, q = len(codes), scheme.m, scheme.q
    onehot = np.zeros((n, m, q))
    np.put_along_axis(onehot, codes[:, :, None], 1.0, axis=2)
    mat = scheme._material(key)
    if scheme.variant == "grp":
        w3 = np.asarray(mat, dtype=np.float64).reshape(scheme.dim, m, q)
        centred = w3 - w3.mean(axis=2, keepdims=True)
        x0 = np.einsum("dmq,nmq->nd", centred, onehot)
        # projections of a unit x have sd ~ 1/sqrt(dim) * |w| ~ 1: beta sets the softmax sharpness
        return _ascend(x0, _iom_grp_grad(w3, onehot, beta=4.0), steps, lr=0.05)
    # URP: y[n, i, j] = prod_k x[n, perm[i, k, j]]
    perms = np.asarray(mat, dtype=np.int64)                       # (m, p, q)
    rng = np.random.default_rng(0) if rng is None else rng
    scale = float(np.sqrt(scheme.dim)) ** scheme.p                # products of unit-x entries are tiny

    def loglik_grad(x):
        xs = x[:, perms]                                          # (n, m, p, q)
        y = np.prod(xs, axis=2) * scale * 4.0
        y0 = y - y.max(axis=2, keepdims=True)
        p = np.exp(y0)
        p /= p.sum(axis=2, keepdims=True)
        ll = np.sum(np.log(np.maximum(np.sum(p * onehot, axis=2), 1e-300)), axis=1)
        gy = (onehot - p) * scale * 4.0                           # (n, m, q)
        g = np.zeros_like(x)
        for k in range(scheme.p):
            others = np.prod(np.delete(xs, k, axis=2), axis=2)    # (n, m, q)
            contrib = (gy * others).reshape(n, -1)
            idx = perms[:, k, :].reshape(-1)
            for r in range(n):
                g[r] += np.bincount(idx, weights=contrib[r], minlength=scheme.dim)
        return ll, g

    best, best_ll = None, None
    for _ in range(max(1, restarts)):
        x = _ascend(rng.standard_normal((n, scheme.dim)), loglik_grad, steps, lr=0.05)
        ll, _g = loglik_grad(x)
        if best is None:
            best, best_ll = x, ll
        else:
            better = ll > best_ll
            best[better], best_ll[better] = x[better], ll[better]
    return best


ATTACKS: dict[str, Callable[..., np.ndarray]] = {
    "rotation": invert_rotation,
    "biohash": invert_biohash,
    "iom": invert_iom,
}

ATTACK_DESCRIPTIONS = {
    "rotation": "exact inverse R^T y with the stolen key",
    "biohash": "x = W(2b-1), then gradient refinement of the sign constraints on the unit sphere",
    "iom": "maximum-likelihood (softmax relaxation of the argmax margin constraints) on the unit sphere",
}


def has_attack(scheme: Scheme) -> bool:
    return scheme.name in ATTACKS and not scheme.encrypted


def sign_ambiguous(scheme: Scheme) -> bool:
    """True when ``x`` and ``-x`` give the same code (IoM-URP with even ``p``)."""
    return scheme.name == "iom" and scheme.params.get("variant") == "urp" and scheme.params.get("p", 1) % 2 == 0


def invert(scheme: Scheme, key: bytes, codes: np.ndarray, **options) -> np.ndarray:
    """Reconstruct unit embeddings ``(n, dim)`` float64 from ``codes`` made with ``key``."""
    try:
        fn = ATTACKS[scheme.name]
    except KeyError:
        raise NotImplementedError(f"no inversion attack for scheme {scheme.name!r}") from None
    return fn(scheme, key, scheme.check_codes(codes), **options)


def candidates(scheme: Scheme, key: bytes, codes: np.ndarray, **options) -> np.ndarray:
    """Reconstructions ``(n, c, dim)``: one per template, or ``+-x_hat`` (c = 2) when the code
    cannot tell the sign; the attacker then presents both (two attempts)."""
    x = invert(scheme, key, codes, **options)
    return np.stack([x, -x], axis=1) if sign_ambiguous(scheme) else x[:, None, :]


def inversion_success(x_hat: np.ndarray, originals: np.ndarray, others: list[np.ndarray],
                      thresholds: dict[str, float], n_boot: int = 2000,
                      rng: np.random.Generator | int | None = 0) -> dict:
    """Success rates of reconstructions at the unprotected system's thresholds.

    * type I: ``cos(x_hat_k, x_k) >= t`` -- the reconstruction matches the very embedding
      it came from;
    * type II: ``cos(x_hat_k, x') >= t`` for the *other* samples ``x'`` of the same subject
      (``others[k]``, ``(n_k, dim)``): the reconstruction passes as a fresh capture. Per
      attacked template the fraction over its other samples, then averaged.

    ``x_hat`` is ``(n, dim)`` or ``(n, c, dim)`` candidates (success if any candidate matches;
    cosines reported for the best candidate).

    ``thresholds``: ``{"0.001": t, ...}`` cosine thresholds of the unprotected embedding.
    95% CIs by percentile bootstrap over attacked templates.
    """
    x_hat = _unit(np.asarray(x_hat, dtype=np.float64))
    if x_hat.ndim == 2:
        x_hat = x_hat[:, None, :]
    originals = _unit(np.asarray(originals, dtype=np.float64))
    cos1 = np.einsum("ncd,nd->nc", x_hat, originals).max(axis=1)
    cos2 = [(_unit(np.asarray(o, np.float64)) @ x_hat[k].T).max(axis=1) if len(o) else np.empty(0)
            for k, o in enumerate(others)]
    out: dict = {"n_attacked": int(len(x_hat)),
                 "mean_cosine_type1": float(cos1.mean()),
                 "mean_cosine_type2": float(np.mean(np.concatenate(cos2))) if any(len(c) for c in cos2) else None}
    for name, t in thresholds.items():
        s1 = (cos1 >= t).astype(float)
        rate1, lo1, hi1 = bootstrap_ci(s1, n_boot, rng=rng)
        per = np.array([np.mean(c >= t) for c in cos2 if len(c)])
        rate2, lo2, hi2 = bootstrap_ci(per, n_boot, rng=rng)
        out[name] = {"threshold": float(t),
                     "type1": {"rate": rate1, "ci95": [lo1, hi1]},
                     "type2": {"rate": rate2, "ci95": [lo2, hi2], "n_templates": int(len(per))}}
    return out
