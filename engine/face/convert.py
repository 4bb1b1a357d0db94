"""dlib DNN -> intermediate op list -> ONNX graph (and a plain numpy forward pass).

The parsed network (:mod:`engine.face.dlib_format`) is a bottom-up list of computational
layers plus the top-down list of ``add_layer`` / ``add_tag_layer`` / ``add_skip_layer``
headers.  Tags and skips carry no id in the file, so they are resolved with the
convention every dlib ResNet uses (``dnn_face_recognition_ex.cpp``)::

    residual      = add_prev1<block<tag1<x>>>
    residual_down = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<tag1<x>>>>>>

i.e. bottom-up, a lone tag header is ``tag1``; two consecutive tag/skip headers are
``tag2`` then ``skip1``; ``add_prev`` adds the most recent tag.  ``add_prev`` zero-pads
the smaller operand (channels and rows/columns, at the end) before adding, as
``dlib::cpu::add`` does for tensors of different shapes.

The op list (``Op``) is consumed by :func:`numpy_forward` (reference, used by the tests)
and :func:`build_onnx`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._optional import require
from .dlib_format import Network


@dataclass
class Op:
    kind: str                      # input, conv, affine, relu, maxpool, avgpool, gavgpool, add, fc, tag, skip
    args: dict[str, Any] = field(default_factory=dict)


def network_to_ops(net: Network) -> list[Op]:
    """Resolve the dlib layer stack into a bottom-up list of ops (see module doc)."""
    # Bottom-up sequence of headers; a header of version 1 is a tag or a skip layer.
    hdrs = list(reversed(net.headers))
    comp = iter(net.layers)
    ops: list[Op] = [Op("input", dict(net.input.params, kind=net.input.kind))]
    i = 0
    while i < len(hdrs):
        if hdrs[i] == 1:
            if i + 1 < len(hdrs) and hdrs[i + 1] == 1:
                ops.append(Op("tag", {"id": 2}))
                ops.append(Op("skip", {"id": 1}))
                i += 2
            else:
                ops.append(Op("tag", {"id": 1}))
                i += 1
            continue
        layer = next(comp)
        p = layer.params
        if layer.kind.startswith("con_"):
            ops.append(Op("conv", {"w": p["filters"], "b": p["biases"] if p["use_bias"] else None,
                                   "stride": (p["stride_y"], p["stride_x"]),
                                   "pad": (p["padding_y"], p["padding_x"])}))
        elif layer.kind == "affine_":
            ops.append(Op("affine", {"gamma": p["gamma"], "beta": p["beta"]}))
        elif layer.kind == "relu_":
            ops.append(Op("relu"))
        elif layer.kind in ("max_pool_2", "avg_pool_2"):
            if p["nr"] == 0 and p["nc"] == 0:
                ops.append(Op("gavgpool" if layer.kind == "avg_pool_2" else "gmaxpool"))
            else:
                ops.append(Op("maxpool" if layer.kind == "max_pool_2" else "avgpool",
                              {"k": (p["nr"], p["nc"]), "stride": (p["stride_y"], p["stride_x"]),
                               "pad": (p["padding_y"], p["padding_x"])}))
        elif layer.kind == "add_prev_":
            ops.append(Op("add"))
        elif layer.kind == "fc_2":
            ops.append(Op("fc", {"w": p["weights"], "b": p["bias"] if p["bias_mode"] == 0 else None}))
        else:  # pragma: no cover - dlib_format rejects unknown layers first
            raise ValueError(f"unsupported layer {layer.kind}")
        i += 1
    return ops


# ---------------------------------------------------------------------------------------
# numpy reference
# ---------------------------------------------------------------------------------------

def _pad_to(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape == tuple(shape):
        return x
    out = np.zeros(shape, dtype=x.dtype)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def _conv(x: np.ndarray, w: np.ndarray, b, stride, pad) -> np.ndarray:
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    sy, sx = stride
    py, px = pad
    if py or px:
        x = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)))
    oh = (x.shape[2] - kh) // sy + 1
    ow = (x.shape[3] - kw) // sx + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    win = win[:, :, ::sy, ::sx][:, :, :oh, :ow]          # n, c, oh, ow, kh, kw
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    out = cols.astype(np.float64) @ w.reshape(o, -1).T.astype(np.float64)
    if b is not None:
        out += b
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)


def _pool(x: np.ndarray, k, stride, pad, mode: str) -> np.ndarray:
    kh, kw = k
    sy, sx = stride
    py, px = pad
    fill = -np.inf if mode == "max" else 0.0
    if py or px:
        x = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)), constant_values=fill)
    oh = (x.shape[2] - kh) // sy + 1
    ow = (x.shape[3] - kw) // sx + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    win = win[:, :, ::sy, ::sx][:, :, :oh, :ow]
    return win.max(axis=(4, 5)) if mode == "max" else win.mean(axis=(4, 5))


def numpy_forward(ops: list[Op], x: np.ndarray) -> np.ndarray:
    """Straightforward float64 forward pass of ``ops`` on an already normalised input
    tensor ``x`` (n, 3, rows, cols).  Returns float64 output."""
    cur = np.asarray(x, dtype=np.float64)
    tags: dict[int, np.ndarray] = {}
    for op in ops:
        a = op.args
        if op.kind == "input":
            continue
        if op.kind == "conv":
            cur = _conv(cur, a["w"], a["b"], a["stride"], a["pad"])
        elif op.kind == "affine":
            cur = cur * a["gamma"].reshape(1, -1, 1, 1) + a["beta"].reshape(1, -1, 1, 1)
        elif op.kind == "relu":
            cur = np.maximum(cur, 0)
        elif op.kind == "maxpool":
            cur = _pool(cur, a["k"], a["stride"], a["pad"], "max")
        elif op.kind == "avgpool":
            cur = _pool(cur, a["k"], a["stride"], a["pad"], "avg")
        elif op.kind == "gavgpool":
            cur = cur.mean(axis=(2, 3), keepdims=True)
        elif op.kind == "tag":
            tags[a["id"]] = cur
        elif op.kind == "skip":
            cur = tags[a["id"]]
        elif op.kind == "add":
            other = tags[max(tags)]
            shape = tuple(max(s, t) for s, t in zip(cur.shape, other.shape))
            cur = _pad_to(cur, shape) + _pad_to(other, shape)
            tags.pop(max(tags))
        elif op.kind == "fc":
            flat = cur.reshape(cur.shape[0], -1)
            cur = flat @ a["w"].astype(np.float64)
            if a["b"] is not None:
                cur = cur + a["b"]
        else:
            raise ValueError(op.kind)
        if op.kind == "add":
            # a residual block ends here: forget its tag1 as well
            tags.pop(1, None)
    return cur


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------

def _static_shapes(ops: list[Op], in_shape: tuple[int, int, int, int]) -> list[tuple[int, ...]]:
    """Output shape after every op, for a fixed input shape (computed with tiny numpy
    stand-ins, so the rules are the same as :func:`numpy_forward`)."""
    shapes = []
    cur = in_shape
    tags: dict[int, tuple] = {}

    def conv_out(h, k, s, p):
        return (h + 2 * p - k) // s + 1

    for op in ops:
        a = op.args
        n, c, h, w = cur if len(cur) == 4 else (*cur, 1, 1)[:4]
        if op.kind == "conv":
            o, _, kh, kw = a["w"].shape
            cur = (n, o, conv_out(h, kh, a["stride"][0], a["pad"][0]),
                   conv_out(w, kw, a["stride"][1], a["pad"][1]))
        elif op.kind in ("maxpool", "avgpool"):
            cur = (n, c, conv_out(h, a["k"][0], a["stride"][0], a["pad"][0]),
                   conv_out(w, a["k"][1], a["stride"][1], a["pad"][1]))
        elif op.kind == "gavgpool":
            cur = (n, c, 1, 1)
        elif op.kind == "tag":
            tags[a["id"]] = cur
        elif op.kind == "skip":
            cur = tags[a["id"]]
        elif op.kind == "add":
            other = tags.pop(max(tags))
            cur = tuple(max(s, t) for s, t in zip(cur, other))
            tags.pop(1, None)
        elif op.kind == "fc":
            cur = (n, a["w"].shape[1])
        shapes.append(cur)
    return shapes


def build_onnx(ops: list[Op], *, name: str, input_name: str = "input",
               output_name: str = "output", fixed_hw: tuple[int, int] | None = None,
               normalise: bool = True, opset: int = 17):
    """Build an ONNX ``ModelProto`` for ``ops``.

    The graph input is float32 (N, 3, H, W) **raw RGB pixel values 0..255**; when
    ``normalise`` the graph applies dlib's ``(pixel - channel_mean) / 256``.  With
    ``fixed_hw`` the spatial size is fixed (needed to resolve ``add_prev`` zero-padding
    statically); otherwise H and W are symbolic (fine for networks without ``add``).
    """
    onnx = require("onnx", feature="the face-model conversion (engine.face)")
    from onnx import TensorProto, helper, numpy_helper

    inits: list = []
    nodes: list = []
    counter = [0]

    def uniq(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(arr, prefix="c") -> str:
        nm = uniq(prefix)
        inits.append(numpy_helper.from_array(np.asarray(arr), nm))
        return nm

    shapes = None
    if fixed_hw is not None:
        shapes = _static_shapes(ops, (1, 3, *fixed_hw))

    hdim: Any = fixed_hw[0] if fixed_hw else "H"
    wdim: Any = fixed_hw[1] if fixed_hw else "W"
    graph_in = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, hdim, wdim])
    cur = input_name
    tags: dict[int, tuple[str, int]] = {}
    for idx, op in enumerate(ops):
        a = op.args
        if op.kind == "input":
            if normalise:
                mean = np.asarray(a["avg"], np.float32).reshape(1, 3, 1, 1)
                t = uniq("centered")
                nodes.append(helper.make_node("Sub", [cur, const(mean, "mean")], [t]))
                t2 = uniq("normalised")
                nodes.append(helper.make_node("Mul", [t, const(np.float32(1 / 256.0), "scale")], [t2]))
                cur = t2
            continue
        out = uniq(op.kind)
        if op.kind == "conv":
            w = a["w"].astype(np.float32)
            ins = [cur, const(w, "W")]
            if a["b"] is not None:
                ins.append(const(a["b"].astype(np.float32), "B"))
            py, px = a["pad"]
            nodes.append(helper.make_node("Conv", ins, [out], kernel_shape=list(w.shape[2:]),
                                          strides=list(a["stride"]), pads=[py, px, py, px]))
        elif op.kind == "affine":
            g = a["gamma"].astype(np.float32).reshape(1, -1, 1, 1)
            b = a["beta"].astype(np.float32).reshape(1, -1, 1, 1)
            t = uniq("scaled")
            nodes.append(helper.make_node("Mul", [cur, const(g, "gamma")], [t]))
            nodes.append(helper.make_node("Add", [t, const(b, "beta")], [out]))
        elif op.kind == "relu":
            nodes.append(helper.make_node("Relu", [cur], [out]))
        elif op.kind in ("maxpool", "avgpool"):
            py, px = a["pad"]
            nodes.append(helper.make_node("MaxPool" if op.kind == "maxpool" else "AveragePool",
                                          [cur], [out], kernel_shape=list(a["k"]),
                                          strides=list(a["stride"]), pads=[py, px, py, px]))
        elif op.kind == "gavgpool":
            nodes.append(helper.make_node("GlobalAveragePool", [cur], [out]))
        elif op.kind == "tag":
            tags[a["id"]] = (cur, idx - 1)
            continue
        elif op.kind == "skip":
            cur = tags[a["id"]][0]
            # keep the shape bookkeeping of the skipped-to tensor
            continue
        elif op.kind == "add":
            if shapes is None:
                raise ValueError("networks with add_prev need fixed_hw")
            other, other_idx = tags.pop(max(tags))
            tags.pop(1, None)
            target = shapes[idx]
            ins = []
            for nm, src_shape in ((cur, _shape_of(ops, shapes, idx - 1)),
                                  (other, shapes[other_idx])):
                if tuple(src_shape[1:]) != tuple(target[1:]):
                    pads = [0, 0, 0, 0, 0, target[1] - src_shape[1], target[2] - src_shape[2],
                            target[3] - src_shape[3]]
                    padded = uniq("zeropad")
                    nodes.append(helper.make_node("Pad", [nm, const(np.asarray(pads, np.int64), "pads")],
                                                  [padded], mode="constant"))
                    nm = padded
                ins.append(nm)
            nodes.append(helper.make_node("Add", ins, [out]))
        elif op.kind == "fc":
            flat = uniq("flat")
            nodes.append(helper.make_node("Flatten", [cur], [flat], axis=1))
            w = a["w"].astype(np.float32)
            if a["b"] is not None:
                nodes.append(helper.make_node("Gemm", [flat, const(w, "fcW"),
                                                       const(a["b"].astype(np.float32), "fcB")], [out]))
            else:
                nodes.append(helper.make_node("MatMul", [flat, const(w, "fcW")], [out]))
        else:
            raise ValueError(op.kind)
        cur = out
    nodes.append(helper.make_node("Identity", [cur], [output_name]))
    last = ops[-1]
    if last.kind == "fc":
        out_info = helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                                 ["N", int(last.args["w"].shape[1])])
    else:
        out_info = helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                                 ["N", None, None, None])
    graph = helper.make_graph(nodes, name, [graph_in], [out_info], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="veilface-dlib-converter")
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def _shape_of(ops, shapes, idx):
    return shapes[idx]


def normalise_input(pixels: np.ndarray, avg) -> np.ndarray:
    """dlib's input layer: planar RGB, (pixel - mean) / 256 (float32)."""
    x = np.asarray(pixels, dtype=np.float32)
    mean = np.asarray(avg, np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / np.float32(256.0)).astype(np.float32)
