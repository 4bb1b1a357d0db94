"""The versioned binary frame shared by templates and HE blobs.

Layout (little endian)::

    magic | format version (u8) | header length (u32) | canonical JSON header | payload

Parsing checks size, magic, version and the header before anything else is trusted; every
failure raises the caller's error type with a plain message, nothing is guessed. The header is
attacker-controlled bytes, so the JSON parser is bounded: strict UTF-8, no ``NaN`` /
``Infinity`` / overflowing numbers (``1e999``), integers within 64 bits, bounded nesting depth
and (when the caller says so) a bounded header length. A deep nesting that would exhaust the
parser's recursion raises the caller's error, never ``RecursionError``.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

_HEAD = struct.Struct("<BI")
#: deepest nesting of arrays/objects a header may have (templates need 2, HE score tables 4)
MAX_HEADER_DEPTH = 8
#: largest integer a header may hold (signed 64-bit: what every store and proto field can keep)
MAX_HEADER_INT = 2**63 - 1


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pack_frame(magic: bytes, version: int, header: dict, payload: bytes | Sequence[bytes]) -> bytes:
    """Frame ``header`` (JSON-serialisable) and ``payload`` (bytes or a sequence of parts)."""
    hb = canonical_json(header)
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    return b"".join([magic, _HEAD.pack(version, len(hb)), hb, *parts])


class _Refused(ValueError):
    """A header the bounded parser refuses (converted to the caller's error type)."""


def _no_constant(name: str):
    raise _Refused(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Refused(f"number {text[:32]} overflows")
    return v


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise _Refused(f"integer of {len(text)} digits")
    v = int(text)
    if not -MAX_HEADER_INT <= v <= MAX_HEADER_INT:
        raise _Refused(f"integer {v} out of the 64-bit range")
    return v


def _depth(obj: Any, limit: int) -> None:
    """Raise if ``obj`` nests deeper than ``limit`` (iterative: no recursion of our own)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            raise _Refused(f"nested deeper than {limit}")
        stack.extend((c, d + 1) for c in children)


def parse_header(hb: bytes, *, max_depth: int = MAX_HEADER_DEPTH) -> dict:
    """Bounded JSON parse of a frame header; raises ``ValueError`` with a plain message."""
    try:
        text = bytes(hb).decode("utf-8", errors="strict")
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth}") from None
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    try:
        _depth(obj, max_depth)
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    return obj


def unpack_frame(buf, magic: bytes, version: int, *, error: type[Exception], what: str,
                 max_bytes: int, max_header_bytes: int | None = None,
                 max_depth: int = MAX_HEADER_DEPTH) -> tuple[dict, bytes]:
    """Split a frame into ``(header, payload)``; raise ``error`` if it is not a valid one.

    ``max_header_bytes``: refuse a longer header before parsing it (None: bounded by ``max_bytes``).
    """
    buf = bytes(buf)
    if len(buf) > max_bytes:
        raise error(f"{what} of {len(buf)} bytes exceeds {max_bytes}")
    start = len(magic) + _HEAD.size
    if len(buf) < start or buf[:len(magic)] != magic:
        raise error(f"not a Veilface {what} (bad magic)")
    fmt, hlen = _HEAD.unpack_from(buf, len(magic))
    if fmt != version:
        raise error(f"unknown {what} format version {fmt}")
    if max_header_bytes is not None and hlen > max_header_bytes:
        raise error(f"{what} header of {hlen} bytes exceeds {max_header_bytes}")
    if start + hlen > len(buf):
        raise error(f"truncated {what} header")
    try:
        header = parse_header(buf[start:start + hlen], max_depth=max_depth)
    except ValueError as exc:
        raise error(f"corrupt {what} header: {exc}") from None
    return header, buf[start + hlen:]


def frame_header_bytes(buf, magic: bytes) -> bytes | None:
    """The raw header bytes of a frame (None if ``buf`` is too short or not of ``magic``), for
    checks that need them verbatim (e.g. that a header is canonical JSON)."""
    buf = memoryview(bytes(buf))
    start = len(magic) + _HEAD.size
    if len(buf) < start or bytes(buf[:len(magic)]) != magic:
        return None
    _, hlen = _HEAD.unpack_from(buf, len(magic))
    if start + hlen > len(buf):
        return None
    return bytes(buf[start:start + hlen])
