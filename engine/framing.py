"""The versioned binary frame shared by templates and HE blobs.

Layout (little endian)::

    magic | format version (u8) | header length (u32) | canonical JSON header | payload

Parsing checks size, magic, version and the header before anything else is trusted; every
failure raises the caller's error type with a plain message, nothing is guessed.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

_HEAD = struct.Struct("<BI")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pack_frame(magic: bytes, version: int, header: dict, payload: bytes | Sequence[bytes]) -> bytes:
    """Frame ``header`` (JSON-serialisable) and ``payload`` (bytes or a sequence of parts)."""
    hb = canonical_json(header)
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    return b"".join([magic, _HEAD.pack(version, len(hb)), hb, *parts])


def unpack_frame(buf, magic: bytes, version: int, *, error: type[Exception], what: str,
                 max_bytes: int) -> tuple[dict, bytes]:
    """Split a frame into ``(header, payload)``; raise ``error`` if it is not a valid one."""
    buf = bytes(buf)
    if len(buf) > max_bytes:
        raise error(f"{what} of {len(buf)} bytes exceeds {max_bytes}")
    start = len(magic) + _HEAD.size
    if len(buf) < start or buf[:len(magic)] != magic:
        raise error(f"not a Veilface {what} (bad magic)")
    fmt, hlen = _HEAD.unpack_from(buf, len(magic))
    if fmt != version:
        raise error(f"unknown {what} format version {fmt}")
    if start + hlen > len(buf):
        raise error(f"truncated {what} header")
    try:
        header = json.loads(buf[start:start + hlen])
    except ValueError as exc:
        raise error(f"corrupt {what} header: {exc}") from None
    if not isinstance(header, dict):
        raise error(f"corrupt {what} header: not an object")
    return header, buf[start + hlen:]
