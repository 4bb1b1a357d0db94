"""Structure of HE wire blobs, checked before SEAL parses anything.

A VFHE blob (``engine.he``) is the shared frame (:mod:`engine.framing`) whose payload is SEAL
serialisations back to back, their sizes listed in the header's ``parts``. SEAL itself ignores
bytes after an object and loads whatever number of parts it is handed, so this layer fixes what
a request may carry:

* templates and probes: exactly the header fields the SDK writes, exactly **one** part (both
  modes), a part no larger than a fresh ciphertext of the parameter set, and a SEAL header whose
  size field is the part's length (no trailing bytes);
* public contexts: the same, with 1 part (public key) or, as ``eval_keys`` says, 3 (+
  relinearisation and Galois keys; verify mode's Galois key is the ``X -> X^-1`` one of the probe
  norm, issue 9); no secret-key material
  (a ``secret_context``, a secret-looking header field, bytes appended after a SEAL object, an
  extra part); then SEAL parses it and the context
  is serialised again -- only that re-serialisation is stored, and it must equal what was sent.

The part count is read from the header before any part is split off or parsed: a probe with
thousands of parts costs one JSON parse, not thousands of ciphertext loads.
"""
from __future__ import annotations

import re
import struct

from ...errors import VeilfaceError
from ...framing import unpack_frame
from ..status import BadRequest, PreconditionFailed
from .fields import MAX_KEY_VERSION

HE_MAGIC, HE_FORMAT = b"VFHE", 1
MAX_HE_HEADER_BYTES = 64 * 1024
BLOB_KEYS = frozenset({"kind", "parts", "mode", "params", "tenant", "epoch", "fp"})
CONTEXT_KEYS = BLOB_KEYS | {"eval_keys"}
#: parts of a blob sent by a device, per kind (the same in both modes)
PARTS = {"template": 1, "probe": 1}
_SEAL = struct.Struct("<HBBBBHQ")    # SEALHeader: magic, header size, version major/minor, compression, reserved, size
_SEAL_MAGIC = 0xA15E
_FP = re.compile(r"^[0-9a-f]{32}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_SECRET_FIELDS = ("secret", "sk", "private")


def _malformed(message: str) -> BadRequest:
    return BadRequest(message, reason="HE_MALFORMED")


class _Malformed(BadRequest):
    """The frame parser's error type for HE blobs."""
    code, reason = "INVALID_ARGUMENT", "HE_MALFORMED"


def seal_part_size(part: bytes) -> None:
    """Check one SEAL serialisation: a SEAL header whose size field is exactly the part's length
    (``HE_TRAILING_BYTES`` when bytes follow the object: SEAL would silently ignore them)."""
    if len(part) < _SEAL.size:
        raise _malformed("an HE part is shorter than a SEAL header")
    magic, hsize, _major, _minor, compression, reserved, size = _SEAL.unpack_from(part)
    if magic != _SEAL_MAGIC or hsize != _SEAL.size or compression > 2 or reserved:
        raise _malformed("an HE part is not a SEAL serialisation")
    if size < len(part):
        raise BadRequest(f"{len(part) - size} bytes follow a SEAL object in an HE part", reason="HE_TRAILING_BYTES")
    if size > len(part):
        raise _malformed("a SEAL object is truncated")


def _parts(h: dict, payload_len: int, want: int) -> list[int]:
    sizes = h.get("parts")
    if not isinstance(sizes, list):
        raise _malformed("HE blob header without a parts list")
    if len(sizes) != want:
        raise BadRequest(f"this HE blob must hold exactly {want} part(s), it declares {len(sizes)}",
                         reason="HE_PART_COUNT")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes) or sum(sizes) != payload_len:
        raise _malformed("HE blob part sizes do not match its payload")
    return sizes


def _split(payload: bytes, sizes: list[int]) -> list[bytes]:
    out, off = [], 0
    for s in sizes:
        out.append(payload[off:off + s])
        off += s
    return out


def _epoch(h: dict) -> int:
    e = h.get("epoch")
    if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= MAX_KEY_VERSION:
        raise _malformed(f"HE epoch must be an integer in [1, {MAX_KEY_VERSION}]")
    return e


def _max_part_bytes(params: dict) -> int:
    """A fresh ciphertext (2 polynomials over every prime) plus SEAL's header and compression slack."""
    raw = 2 * int(params["poly_degree"]) * len(params["moduli"]) * 8
    return raw + raw // 64 + 4096


def check_he_blob(buf: bytes, *, kind: str, scheme, key_version: int) -> dict:
    """The header of an HE ``template`` / ``probe`` blob of ``scheme`` (an ``he`` scheme object),
    after checking its whole structure; raises a typed refusal otherwise. Nothing is parsed by SEAL."""
    h, payload = unpack_frame(buf, HE_MAGIC, HE_FORMAT, error=_Malformed, what="HE blob", max_bytes=len(buf) + 1,
                              max_header_bytes=MAX_HE_HEADER_BYTES)
    if h.get("kind") != kind:
        raise BadRequest(f"expected an HE {kind} blob, got {str(h.get('kind'))[:32]!r} (probes use protect_probe)",
                         reason="HE_WRONG_KIND")
    sizes = _parts(h, len(payload), PARTS[kind])
    if set(h) != BLOB_KEYS:
        raise _malformed(f"HE {kind} header fields: unknown {sorted(set(h) - BLOB_KEYS)[:4]}, "
                         f"missing {sorted(BLOB_KEYS - set(h))}")
    params = scheme.he_params.as_dict()
    if h["mode"] != scheme.mode or h["params"] != params:
        raise _malformed(f"the HE {kind} is not of {scheme.spec.key()}")
    if _epoch(h) != key_version:
        raise _malformed("template key_version does not match the ciphertext's epoch")
    if not isinstance(h["tenant"], str) or not _TENANT.fullmatch(h["tenant"]):
        raise _malformed("HE blob tenant must be a tenant id")
    if not isinstance(h["fp"], str) or not _FP.fullmatch(h["fp"]):
        raise _malformed("HE blob fingerprint must be 32 hex digits")
    limit = _max_part_bytes(params)
    for part in _split(payload, sizes):
        if len(part) > limit:
            raise _malformed(f"an HE part of {len(part)} bytes is larger than any ciphertext of {scheme.spec.key()}")
        seal_part_size(part)
    return h


def _refuse_secret(h: dict) -> None:
    if h.get("kind") == "secret_context" or any(any(m in str(k).lower() for m in _SECRET_FIELDS) for k in h):
        raise PreconditionFailed("refusing a private HE context: the matcher must never receive the secret key; "
                                 "send KeyHolder.public_context(eval_keys=True).to_bytes()", reason="HE_PRIVATE_CONTEXT")


def check_public_context(body: bytes, tenant: str, max_bytes: int):
    """``(PublicContext, stored bytes)`` of an uploaded public context, or a typed refusal.

    Structure first (fields, types, part count, SEAL sizes), then SEAL parses it
    (``PublicContext.from_bytes``: parameters, fingerprint of the public key, keys), then it is
    serialised again from the parsed SEAL objects: the bytes to store. Those must equal ``body``
    (``HE_NOT_CANONICAL`` otherwise), so what is stored is exactly what SEAL understood.
    """
    h, payload = unpack_frame(body, HE_MAGIC, HE_FORMAT, error=_Malformed, what="HE context", max_bytes=max_bytes,
                              max_header_bytes=MAX_HE_HEADER_BYTES)
    _refuse_secret(h)
    if h.get("kind") != "public_context":
        raise BadRequest(f"expected an HE public context, got a blob of kind {str(h.get('kind'))[:32]!r}",
                         reason="HE_NOT_A_CONTEXT")
    eval_keys = h.get("eval_keys")
    if not isinstance(eval_keys, bool):
        raise _malformed("HE context header eval_keys must be true or false")
    mode = h.get("mode")
    # the public key, plus the evaluation keys: relinearisation + Galois keys (keysvc: verify mode too)
    sizes = _parts(h, len(payload), 3 if eval_keys else 1)
    if set(h) != CONTEXT_KEYS:
        raise _malformed(f"HE context header fields: unknown {sorted(set(h) - CONTEXT_KEYS)[:4]}, "
                         f"missing {sorted(CONTEXT_KEYS - set(h))}")
    from ...he import HEParams, PublicContext
    mode, params = h["mode"], h["params"]
    if not isinstance(params, dict) or not isinstance(mode, str) or params.get("mode") != mode:
        raise _malformed("HE context parameters must be a table naming its mode")
    dim = params.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise _malformed("HE context parameters need an integer dim")
    try:
        expected = HEParams.for_mode(mode, dim).as_dict()
    except VeilfaceError as exc:
        raise _malformed(f"HE context parameters: {exc}") from None
    if params != expected:
        raise _malformed("HE context parameters are not a supported parameter set")
    _epoch(h)
    if not isinstance(h["tenant"], str) or not _TENANT.fullmatch(h["tenant"]):
        raise _malformed("HE context tenant must be a tenant id")
    if h["tenant"] != tenant:
        raise PreconditionFailed(f"the context is for tenant {h['tenant']!r}, the request for {tenant!r}",
                                 reason="HE_TENANT_MISMATCH")
    if not isinstance(h["fp"], str) or not _FP.fullmatch(h["fp"]):
        raise _malformed("HE context fingerprint must be 32 hex digits")
    if mode == "identify" and not eval_keys:
        raise BadRequest("an identify-mode context needs its evaluation keys (KeyHolder.public_context(eval_keys=True))",
                         reason="HE_EVAL_KEYS_REQUIRED")
    for part in _split(payload, sizes):
        seal_part_size(part)
    ctx = PublicContext.from_bytes(body)        # SEAL: HEFormatError -> INVALID_ARGUMENT HE_MALFORMED
    fresh = PublicContext(ctx.params, ctx.tenant, ctx.epoch, ctx.fingerprint, ctx.public_key, ctx.relin_keys,
                          ctx.galois_keys)
    stored = fresh.to_bytes()
    if stored != bytes(body):
        raise BadRequest("the HE context is not in the form SEAL serialises it (re-encoded parts differ)",
                         reason="HE_NOT_CANONICAL")
    return fresh, stored
