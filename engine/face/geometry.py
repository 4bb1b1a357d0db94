"""Small re-implementations of dlib geometry / image helpers needed to be pixel-exact.

Conventions follow dlib: rectangles are inclusive (``width = right - left + 1``), a
``drectangle`` is (l, t, r, b) floats with the same convention, points are (x, y).
"""
from __future__ import annotations

import math

import numpy as np


def round_half_up(v):
    """dlib's double -> long conversion for points/rectangles: floor(v + 0.5)."""
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5).astype(np.int64)


def find_affine_transform(from_pts: np.ndarray, to_pts: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine ``M`` with ``to ~= M @ [from; 1]`` (dlib semantics)."""
    f = np.asarray(from_pts, np.float64)
    t = np.asarray(to_pts, np.float64)
    P = np.vstack([f.T, np.ones(len(f))])      # 3 x n
    Q = t.T                                    # 2 x n
    return Q @ np.linalg.pinv(P)


def find_similarity_transform(from_pts: np.ndarray, to_pts: np.ndarray) -> np.ndarray:
    """Umeyama least-squares similarity (dlib ``find_similarity_transform``), 2x3."""
    f = np.asarray(from_pts, np.float64)
    t = np.asarray(to_pts, np.float64)
    mf, mt = f.mean(0), t.mean(0)
    df, dt = f - mf, t - mt
    sigma_from = (df ** 2).sum() / len(f)
    cov = (dt.T @ df) / len(f)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    det_cov = np.linalg.det(cov)
    if det_cov < 0 or (det_cov == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        if d[1] < d[0]:
            s[1, 1] = -1
        else:
            s[0, 0] = -1
    r = u @ s @ vt
    c = 1.0
    if sigma_from != 0:
        c = 1.0 / sigma_from * np.trace(np.diag(d) @ s)
    tr = mt - c * r @ mf
    return np.hstack([c * r, tr[:, None]])


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64)
    return pts @ m[:, :2].T + m[:, 2]


# -- drectangle helpers (l, t, r, b) -------------------------------------------------------

def d_width(r):
    return 0.0 if r[0] > r[2] else r[2] - r[0] + 1


def d_height(r):
    return 0.0 if r[1] > r[3] else r[3] - r[1] + 1


def d_area(r):
    return d_width(r) * d_height(r)


def d_center(r):
    return np.array([(r[0] + r[2]) / 2.0, (r[1] + r[3]) / 2.0])


def centered_drect(p, width, height):
    width -= 1
    height -= 1
    return (p[0] - width / 2.0, p[1] - height / 2.0, p[0] + width / 2.0, p[1] + height / 2.0)


def pyr2_point_down(p):
    """pyramid_down<2>::point_down."""
    return np.asarray(p, np.float64) / 2.0 - np.array([1.25, 0.75])


def pyr2_point_up(p):
    return (np.asarray(p, np.float64) + np.array([1.25, 0.75])) * 2.0


def pyr2_rect_down(r):
    a = pyr2_point_down((r[0], r[1]))
    b = pyr2_point_down((r[2], r[3]))
    return (a[0], a[1], b[0], b[1])


def rotate_point(center, p, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    x, y = p[0] - center[0], p[1] - center[1]
    return np.array([center[0] + ca * x - sa * y, center[1] + sa * x + ca * y])


# -- image operations ---------------------------------------------------------------------

def pyramid_down2_rgb(img: np.ndarray) -> np.ndarray:
    """dlib ``pyramid_down<2>`` on an 8-bit image (H, W, C): 5x5 [1 4 6 4 1] binomial
    filter, keep every other pixel, integer arithmetic with truncating /256."""
    h, w = img.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0) + img.shape[2:], img.dtype)
    ow, oh = (w - 3) // 2, (h - 3) // 2
    x = img.astype(np.int32)
    # row filter on columns 2c .. 2c+4
    cols = [x[:, k:k + 2 * ow:2] for k in range(5)]
    tmp = cols[0] + 4 * cols[1] + 6 * cols[2] + 4 * cols[3] + cols[4]
    rows = [tmp[k:k + 2 * oh:2] for k in range(5)]
    out = rows[0] + 4 * rows[1] + 6 * rows[2] + 4 * rows[3] + rows[4]
    return (out // 256).astype(img.dtype)


def transform_image_bilinear(img: np.ndarray, out_shape: tuple[int, int], m: np.ndarray) -> np.ndarray:
    """dlib ``transform_image(img, out, interpolate_bilinear(), affine m)`` for uint8 RGB
    (or gray): each output pixel (c, r) samples ``img`` at ``m @ (c, r, 1)``; samples whose
    2x2 neighbourhood leaves the image are black; values truncate to uint8."""
    oh, ow = out_shape
    cc, rr = np.meshgrid(np.arange(ow, dtype=np.float64), np.arange(oh, dtype=np.float64))
    xs = m[0, 0] * cc + m[0, 1] * rr + m[0, 2]
    ys = m[1, 0] * cc + m[1, 1] * rr + m[1, 2]
    left = np.floor(xs).astype(np.int64)
    top = np.floor(ys).astype(np.int64)
    h, w = img.shape[:2]
    ok = (left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)
    l = np.clip(left, 0, max(w - 2, 0))
    t = np.clip(top, 0, max(h - 2, 0))
    lr = (xs - left)
    tb = (ys - top)
    im = img.astype(np.float64)
    if im.ndim == 2:
        im = im[..., None]
    lr = lr[..., None]
    tb = tb[..., None]
    tl = im[t, l]
    tr_ = im[t, l + 1]
    bl = im[t + 1, l]
    br = im[t + 1, l + 1]
    val = (1 - tb) * ((1 - lr) * tl + lr * tr_) + tb * ((1 - lr) * bl + lr * br)
    val = np.clip(val, 0, 255)
    out = val.astype(np.uint8)  # truncation, as dlib's assign_pixel(uchar, double)
    out[~ok] = 0
    if img.ndim == 2:
        out = out[..., 0]
    return out
