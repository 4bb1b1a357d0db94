"""dlib MMOD CNN face detector (``cnn_face_detection_model_v1``) on onnxruntime.

Reproduces dlib's pipeline around the network:

1. optional up-sampling of the image (``pyramid_up`` with ``pyramid_down<2>``, what the
   ``upsample_num_times`` argument of dlib/face_recognition does);
2. ``input_rgb_image_pyramid<pyramid_down<6>>``: the normalised image ``(p - mean)/256``
   and all its 5/6-scaled copies tiled into one tensor (padding 10, outer padding 11),
   each level bilinearly resized from the previous one;
3. the CNN (ONNX) -> one score map; every location scoring above ``adjust_threshold`` is
   an 80x80 window mapped back through the conv strides and the pyramid level;
4. greedy non-maximum suppression with dlib's ``test_box_overlap`` (IoU measured against
   the *bounding box* of the two rectangles, threshold from the model file) and
   ``percent_covered`` 1.0;
5. mapping boxes back to the original image when up-sampled.
"""
from __future__ import annotations

import math

import numpy as np

from . import geometry as g

# -- pyramid_down<6> helpers -------------------------------------------------------------

def _pyr_n_rate(n: int) -> float:
    return (n - 1.0) / n


def _pyr_n_point_up(p, levels: int, n: int):
    p = np.asarray(p, np.float64)
    ratio = n / (n - 1.0)
    for _ in range(levels):
        p = p * ratio + 0.3
    return p


def tiled_pyramid_rects(nr: int, nc: int, n: int = 6, padding: int = 10, outer: int = 11):
    """dlib ``impl::compute_tiled_image_pyramid_details``: list of (l, t, r, b) and the
    tiled image size (rows, cols)."""
    if nr * nc == 0:
        return [], 0, 0
    rate = _pyr_n_rate(n)
    sizes = [(nr, nc)]
    while True:
        nr = int(math.floor(rate * nr))
        nc = int(math.floor(rate * nc))
        if nr * nc == 0 or nr < 5:
            break
        sizes.append((nr, nc))
    # rects as (l, t, r, b) with width nc, height nr located at origin
    rects = [[0, 0, c - 1, r - 1] for r, c in sizes]
    total_height = sum(r + padding for r, _ in sizes) - padding * 2
    height = 0
    prev_width = 0
    w0 = sizes[0][1]
    h0 = sizes[0][0]
    for r, c in sizes:
        if c <= w0 - prev_width - padding and (height - h0) * 2 >= (total_height - h0):
            break
        height += r + padding
        prev_width = c
    height -= padding
    width = w0
    out_nr = height + outer * 2
    out_nc = width + outer * 2
    y = outer
    i = 0
    while y < height + outer and i < len(rects):
        r, c = sizes[i]
        rects[i] = [outer, y, outer + c - 1, y + r - 1]
        y += r + padding
        i += 1
    y -= padding
    r0 = rects[0]
    while i < len(rects):
        r, c = sizes[i]
        p1 = (outer + width - 1, y - 1)
        # rectangle(p1, p1 - br_corner) -> corners sorted
        p2 = (p1[0] - (c - 1), p1[1] - (r - 1))
        rect = [min(p1[0], p2[0]), min(p1[1], p2[1]), max(p1[0], p2[0]), max(p1[1], p2[1])]
        inter = (max(rect[0], r0[0]), max(rect[1], r0[1]), min(rect[2], r0[2]), min(rect[3], r0[3]))
        if inter[0] <= inter[2] and inter[1] <= inter[3]:
            break
        rects[i] = rect
        y -= r + padding
        i += 1
    return [tuple(rc) for rc in rects[:i]], out_nr, out_nc


def _bilinear_grid(h: int, w: int, out_h: int, out_w: int):
    """dlib's resize sampling grid: source rows/cols either side and float64 fractions."""
    y = np.arange(out_h, dtype=np.float64) * ((h - 1) / max(out_h - 1, 1))
    x = np.arange(out_w, dtype=np.float64) * ((w - 1) / max(out_w - 1, 1))
    top = np.floor(y).astype(np.int64)
    left = np.floor(x).astype(np.int64)
    return top, np.minimum(top + 1, h - 1), left, np.minimum(left + 1, w - 1), y - top, x - left


def resize_bilinear_float(src: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """dlib ``resize_image`` (bilinear) for float planes (..., H, W) -> (..., out_h, out_w)."""
    top, bottom, left, right, fy, fx = _bilinear_grid(*src.shape[-2:], out_h, out_w)
    # dlib interpolates float images in float32
    tb = fy.astype(np.float32)[:, None]
    lr = fx.astype(np.float32)[None, :]
    tl = src[..., top[:, None], left[None, :]]
    tr = src[..., top[:, None], right[None, :]]
    bl = src[..., bottom[:, None], left[None, :]]
    br = src[..., bottom[:, None], right[None, :]]
    one = np.float32(1)
    out = ((one - tb) * (one - lr)) * tl + ((one - tb) * lr) * tr + (tb * (one - lr)) * bl + (tb * lr) * br
    return out.astype(np.float32)


def resize_bilinear_uint8(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """dlib ``resize_image`` (bilinear) for uint8 images (H, W, C), in float64 then clipped."""
    top, bottom, left, right, fy, fx = _bilinear_grid(*img.shape[:2], out_h, out_w)
    tb = fy[:, None, None]
    lr = fx[None, :, None]
    im = img.astype(np.float64)
    out = (1 - tb) * ((1 - lr) * im[top][:, left] + lr * im[top][:, right]) + \
        tb * ((1 - lr) * im[bottom][:, left] + lr * im[bottom][:, right])
    return np.clip(out, 0, 255).astype(np.uint8)


def pyramid_up2(img: np.ndarray) -> np.ndarray:
    """dlib ``pyramid_up(img)`` (pyramid_down<2>): output size from ``rect_up``."""
    h, w = img.shape[:2]
    tl = g.pyr2_point_up((0, 0))
    br = g.pyr2_point_up((w - 1, h - 1))
    rect = g.round_half_up([tl[0], tl[1], br[0], br[1]])
    return resize_bilinear_uint8(img, int(rect[3]) + 1, int(rect[2]) + 1)


def build_tiled_input(img: np.ndarray, avg, n: int = 6, padding: int = 10, outer: int = 11):
    """Normalised tiled pyramid tensor (1, 3, R, C) float32 and the level rectangles."""
    h, w = img.shape[:2]
    rects, R, C = tiled_pyramid_rects(h, w, n, padding, outer)
    data = np.zeros((3, R, C), np.float32)
    if not rects:
        return data[None], rects
    mean = np.asarray(avg, np.float32).reshape(3, 1, 1)
    planar = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)
    l, t, r, b = rects[0]
    data[:, t:b + 1, l:r + 1] = ((planar - mean) / np.float32(256.0))
    for i in range(1, len(rects)):
        pl, pt, pr, pb = rects[i - 1]
        l, t, r, b = rects[i]
        data[:, t:b + 1, l:r + 1] = resize_bilinear_float(data[:, pt:pb + 1, pl:pr + 1], b - t + 1, r - l + 1)
    return data[None], rects


def _nearest_rect(rects, p) -> int:
    best, idx = math.inf, 0
    for i, (l, t, r, b) in enumerate(rects):
        if l <= p[0] <= r and t <= p[1] <= b:
            return i
        q = (min(max(p[0], l), r), min(max(p[1], t), b))
        d = math.hypot(q[0] - p[0], q[1] - p[1])
        if d < best:
            best, idx = d, i
    return idx


def _rect_area(r):
    return max(0, r[2] - r[0] + 1) * max(0, r[3] - r[1] + 1)


def boxes_overlap(a, b, iou_thresh: float, covered_thresh: float) -> bool:
    """dlib ``test_box_overlap`` (outer = bounding box of a and b)."""
    inter = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    inner = _rect_area(inter) if inter[0] <= inter[2] and inter[1] <= inter[3] else 0
    if inner == 0:
        return False
    outer = _rect_area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    return (inner / outer > iou_thresh or inner / _rect_area(a) > covered_thresh
            or inner / _rect_area(b) > covered_thresh)


class MMODDetector:
    """Runs the converted MMOD network; ``detect(image) -> (n, 5)`` rows of
    (left, top, right, bottom, confidence) in image pixels (inclusive dlib rectangles)."""

    def __init__(self, onnx_path: str, meta: dict, threads: int | None = None):
        from .runtime import make_session
        self.session = make_session(onnx_path, threads)
        self.meta = meta
        self.input_name = self.session.get_inputs()[0].name

    def _candidates(self, img: np.ndarray, adjust_threshold: float):
        meta = self.meta
        tensor, rects = build_tiled_input(img, meta["avg"], meta["pyramid_n"],
                                          meta["pyramid_padding"], meta["pyramid_outer_padding"])
        if not rects:
            return []
        scores = self.session.run(None, {self.input_name: tensor})[0][0, 0]
        rr, cc = np.nonzero(scores > adjust_threshold)
        win_w, win_h = meta["window"]
        out = []
        for r, c in zip(rr.tolist(), cc.tolist()):
            p = np.array([c, r], np.float64)
            for stride, pad, k in reversed(meta["conv_map"]):
                p = p * stride - pad + k // 2
            dr = g.centered_drect(p, win_w, win_h)
            cen = g.round_half_up(g.d_center(dr))
            lvl = _nearest_rect(rects, cen)
            ol, ot = rects[lvl][0], rects[lvl][1]
            tl = _pyr_n_point_up((dr[0] - ol, dr[1] - ot), lvl, meta["pyramid_n"])
            br = _pyr_n_point_up((dr[2] - ol, dr[3] - ot), lvl, meta["pyramid_n"])
            out.append((float(scores[r, c]), (tl[0], tl[1], br[0], br[1])))
        out.sort(key=lambda t: -t[0])
        return out

    def detect(self, image: np.ndarray, upsample: int = 0, adjust_threshold: float = 0.0) -> np.ndarray:
        img = np.ascontiguousarray(image)
        for _ in range(upsample):
            img = pyramid_up2(img)
        cands = self._candidates(img, adjust_threshold)
        final: list[tuple] = []
        for score, dr in cands:
            rect = tuple(int(v) for v in g.round_half_up(dr))
            if any(boxes_overlap(f[0], rect, self.meta["nms_iou"], self.meta["nms_percent_covered"])
                   for f in final):
                continue
            final.append((rect, score))
        rows = []
        for rect, score in final:
            dr = np.asarray(rect, np.float64)
            for _ in range(upsample):
                a = g.pyr2_point_down(dr[:2])
                b = g.pyr2_point_down(dr[2:])
                dr = np.array([a[0], a[1], b[0], b[1]])
            rows.append([*g.round_half_up(dr).tolist(), score])
        return np.asarray(rows, np.float64).reshape(-1, 5)
