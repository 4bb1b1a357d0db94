"""dlib ``shape_predictor`` (ensemble of regression trees, Kazemi & Sullivan 2014) in numpy.

Bit-for-bit the same arithmetic as ``dlib/image_processing/shape_predictor.h``: float32
shapes, similarity transform between the mean shape and the current shape, feature
pixels sampled at integer (rounded) positions with ``(r+g+b)/3`` intensities, trees
evaluated as ``pixel[idx1] - pixel[idx2] > thresh -> left``.  Returns integer points,
as dlib's ``full_object_detection`` does.
"""
from __future__ import annotations

import numpy as np

from . import geometry as g
from .dlib_format import ShapePredictorModel


def _unnormalizing_tform(rect) -> np.ndarray:
    l, t, r, b = rect
    frm = np.array([[0, 0], [1, 0], [1, 1]], np.float64)
    to = np.array([[l, t], [r, t], [r, b]], np.float64)
    return g.find_affine_transform(frm, to)


def gray_intensity(image: np.ndarray) -> np.ndarray:
    """dlib ``get_pixel_intensity`` for rgb_pixel: integer (r + g + b) / 3."""
    if image.ndim == 2:
        return image.astype(np.float32)
    s = image[..., 0].astype(np.int32) + image[..., 1] + image[..., 2]
    return (s // 3).astype(np.float32)


class ShapePredictor:
    """Callable: ``predict(image, rect) -> (parts, 2) int64`` (x, y) landmarks."""

    def __init__(self, model: ShapePredictorModel):
        self.m = model
        sp = model.splits
        self.idx1 = sp[..., 0].astype(np.int64)
        self.idx2 = sp[..., 1].astype(np.int64)
        self.thresh = sp[..., 2].astype(np.float32)
        self.nsplits = sp.shape[2]
        self.initial = model.initial_shape.reshape(-1, 2).astype(np.float32)

    @classmethod
    def from_npz(cls, path) -> ShapePredictor:
        with np.load(path) as z:
            return cls(ShapePredictorModel(**{k: z[k] for k in
                                              ("initial_shape", "splits", "leaves", "anchor_idx", "deltas")}))

    def predict(self, image: np.ndarray, rect, gray: np.ndarray | None = None) -> np.ndarray:
        """``rect`` = (left, top, right, bottom) inclusive integer box."""
        if gray is None:
            gray = gray_intensity(image)
        h, w = gray.shape
        m = self.m
        shape = self.initial.copy()                       # (P, 2) float32
        to_img = _unnormalizing_tform(rect)
        for it in range(m.splits.shape[0]):
            sim = g.find_similarity_transform(self.initial, shape)
            tform = sim[:, :2].astype(np.float32)
            anchors = shape[m.anchor_idx[it]]             # (F, 2) float32
            # tform*delta in float32 (dlib: matrix<float,2,2> * vector<float,2>)
            d = m.deltas[it]
            rel = np.empty_like(d)
            rel[:, 0] = tform[0, 0] * d[:, 0] + tform[0, 1] * d[:, 1]
            rel[:, 1] = tform[1, 0] * d[:, 0] + tform[1, 1] * d[:, 1]
            rel = rel + anchors
            p = g.apply_affine(to_img, rel.astype(np.float64))
            px = g.round_half_up(p)
            inside = (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < w) & (px[:, 1] < h)
            feats = np.zeros(len(px), np.float32)
            feats[inside] = gray[px[inside, 1], px[inside, 0]]
            # evaluate all trees of this cascade level at once
            n_trees = self.idx1.shape[1]
            node = np.zeros(n_trees, np.int64)
            ar = np.arange(n_trees)
            while True:
                active = node < self.nsplits
                if not active.any():
                    break
                nd = np.where(active, node, 0)
                diff = feats[self.idx1[it, ar, nd]] - feats[self.idx2[it, ar, nd]]
                go_left = diff > self.thresh[it, ar, nd]
                node = np.where(active, np.where(go_left, 2 * node + 1, 2 * node + 2), node)
            leaves = m.leaves[it, ar, node - self.nsplits]   # (T, 2P) float32
            acc = np.concatenate([shape.reshape(1, -1), leaves], axis=0)
            shape = np.cumsum(acc, axis=0, dtype=np.float32)[-1].reshape(-1, 2)
        pts = g.apply_affine(to_img, shape.astype(np.float64))
        return g.round_half_up(pts)
