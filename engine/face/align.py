"""dlib-exact face-chip alignment (``get_face_chip_details`` + ``extract_image_chip``),
and 5-point similarity alignment for ArcFace-style models."""
from __future__ import annotations

import math

import numpy as np

from . import geometry as g

# dlib's 5-point template (get_face_chip_details), fractions of the chip.
DLIB_5PT_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])

# The usual ArcFace / InsightFace 112x112 template: left eye, right eye, nose, mouth
# left, mouth right (image coordinates).
ARCFACE_112_TEMPLATE = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])


def chip_details(points: np.ndarray, size: int = 150, padding: float = 0.25):
    """dlib ``get_face_chip_details`` for 5 landmarks -> (drect, angle, rows, cols)."""
    pts = np.asarray(points, np.float64).reshape(5, 2)
    tmpl = (padding + DLIB_5PT_TEMPLATE) / (2 * padding + 1) * size
    m = g.find_similarity_transform(tmpl, pts)
    p = m[:, :2] @ np.array([1.0, 0.0])
    angle = math.atan2(p[1], p[0])
    scale = math.hypot(p[0], p[1])
    c = g.apply_affine(m, np.array([[size / 2.0, size / 2.0]]))[0]
    rect = g.centered_drect(c, size * scale, size * scale)
    return rect, angle, size, size


def extract_chip(image: np.ndarray, rect, angle: float, rows: int, cols: int) -> np.ndarray:
    """dlib ``extract_image_chip`` with bilinear interpolation (uint8 RGB in/out),
    including its ``pyramid_down<2>`` pre-shrinking for large source regions."""
    h, w = image.shape[:2]
    size = rows * cols
    # depth of the pyramid and the cropped bounding box (as extract_image_chips)
    depth = 0
    grow = 2.0
    r = g.pyr2_rect_down(rect)
    while g.d_area(r) > size:
        r = g.pyr2_rect_down(r)
        depth += 1
        grow = grow * 2 + 2
    cent = g.d_center(rect)
    corners = [(rect[0], rect[1]), (rect[2], rect[1]), (rect[0], rect[3]), (rect[2], rect[3])]
    rot = np.array([g.rotate_point(cent, c, angle) for c in corners])
    gr = (rot[:, 0].min() - grow, rot[:, 1].min() - grow, rot[:, 0].max() + grow, rot[:, 1].max() + grow)
    # intersect with the image rectangle (0, 0, w-1, h-1), then round to a rectangle
    gr = (max(gr[0], 0.0), max(gr[1], 0.0), min(gr[2], w - 1.0), min(gr[3], h - 1.0))
    bl, bt, br, bb = (int(v) for v in g.round_half_up(gr))
    if bl > br or bt > bb:
        return np.zeros((rows, cols) + image.shape[2:], np.uint8)
    sub = image[bt:bb + 1, bl:br + 1]
    levels = []
    if depth > 0:
        levels.append(g.pyramid_down2_rgb(sub))
        for _ in range(1, depth):
            levels.append(g.pyramid_down2_rgb(levels[-1]))
    level = -1
    rr = (rect[0] - bl, rect[1] - bt, rect[2] - bl, rect[3] - bt)
    while g.d_area(g.pyr2_rect_down(rr)) > size:
        level += 1
        rr = g.pyr2_rect_down(rr)
    c2 = g.d_center(rr)
    frm = np.array([[0, 0], [cols - 1, 0], [0, rows - 1]], np.float64)
    to = np.array([g.rotate_point(c2, (rr[0], rr[1]), angle),
                   g.rotate_point(c2, (rr[2], rr[1]), angle),
                   g.rotate_point(c2, (rr[0], rr[3]), angle)])
    m = g.find_affine_transform(frm, to)
    src = sub if level == -1 else levels[level]
    return g.transform_image_bilinear(src, (rows, cols), m)


def dlib_face_chip(image: np.ndarray, points: np.ndarray, size: int = 150,
                   padding: float = 0.25) -> np.ndarray:
    """The chip dlib's ``face_recognition_model_v1`` embeds: (size, size, 3) uint8."""
    rect, angle, rows, cols = chip_details(points, size, padding)
    return extract_chip(np.ascontiguousarray(image), rect, angle, rows, cols)


def similarity_chip(image: np.ndarray, points: np.ndarray, template: np.ndarray,
                    size: tuple[int, int]) -> np.ndarray:
    """Generic 5-point similarity warp (ArcFace-style alignment), bilinear, uint8."""
    m_img_to_chip = g.find_similarity_transform(np.asarray(points, np.float64), template)
    a = np.vstack([m_img_to_chip, [0, 0, 1]])
    inv = np.linalg.inv(a)[:2]
    return g.transform_image_bilinear(np.ascontiguousarray(image), size, inv)
