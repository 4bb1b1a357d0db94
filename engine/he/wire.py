"""VFHE blobs: the versioned wire format of every HE object (contexts, templates, probes, results,
gallery snapshots).

Layout (little endian, the shared Veilface frame of :mod:`engine.framing`)::

    b"VFHE" | format version (u8) | header length (u32) | canonical-JSON header | parts

The header names the blob ``kind``, mode, parameters, tenant, epoch and the context fingerprint
(SHA-256 of the parameters and the public key) plus the byte length of each SEAL-serialised part.
Nothing here touches SEAL: a blob can be routed and checked without loading a ciphertext.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..framing import pack_frame, unpack_frame
from ..template import Template
from .errors import HEFormatError, HEPrivateContext

MAGIC = b"VFHE"
FORMAT_VERSION = 1
MAX_BLOB_BYTES = 1 << 30


def pack_blob(kind: str, header: dict, parts: Sequence[bytes]) -> bytes:
    """Frame ``parts`` (SEAL serialisations) under ``header`` as a blob of ``kind``."""
    return pack_frame(MAGIC, FORMAT_VERSION, dict(header, kind=kind, parts=[len(p) for p in parts]), parts)


def unpack_blob(buf, kinds: str | Sequence[str] | None = None) -> tuple[dict, list[bytes]]:
    """Parse a blob; ``kinds`` restricts the accepted kinds. Raises :class:`HEFormatError`
    (:class:`HEPrivateContext` for a secret context where a public kind was expected)."""
    if isinstance(buf, np.ndarray):
        buf = buf.tobytes()
    h, payload = unpack_frame(buf, MAGIC, FORMAT_VERSION, error=HEFormatError, what="HE blob",
                              max_bytes=MAX_BLOB_BYTES)
    try:
        sizes = [int(s) for s in h["parts"]]
        kind = str(h["kind"])
    except (ValueError, KeyError, TypeError) as exc:
        raise HEFormatError(f"corrupt HE blob header: {exc}") from None
    if kinds is not None:
        allowed = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if kind not in allowed:
            if kind == "secret_context":
                raise HEPrivateContext("refusing a context that contains the secret key")
            raise HEFormatError(f"expected an HE blob of kind {'/'.join(allowed)}, got {kind!r}")
    if any(s < 0 for s in sizes) or sum(sizes) != len(payload):
        raise HEFormatError("HE blob payload does not match its header")
    parts, off = [], 0
    for s in sizes:
        parts.append(payload[off:off + s])
        off += s
    return h, parts


def blob_header(buf) -> dict:
    """The header of a blob (kind, mode, tenant, epoch, fingerprint, ...), without loading SEAL data."""
    return unpack_blob(buf)[0]


def blob_of(x) -> bytes:
    """The blob bytes of an ``he`` :class:`~engine.template.Template`, a uint8 array or bytes."""
    if isinstance(x, Template):
        if x.spec.name != "he":
            raise HEFormatError(f"expected an he template, got scheme {x.spec.name!r}")
        return x.data.tobytes()
    if isinstance(x, np.ndarray):
        return x.tobytes()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    raise HEFormatError(f"expected HE blob bytes or a Template, got {type(x).__name__}")


__all__ = ["MAGIC", "FORMAT_VERSION", "MAX_BLOB_BYTES", "pack_blob", "unpack_blob", "blob_header", "blob_of"]
