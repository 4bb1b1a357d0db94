"""Protected templates and probes from the wire (Enroll, Verify, Identify) -- and stored ones at startup.

Order of the checks (each a typed refusal): presence and size; the frame and header
(:meth:`engine.template.Template.from_bytes`: bounded, typed, ranged); the header is the
canonical encoding of what was parsed (no duplicate keys, no ``128.0`` for ``128``: one meaning
per byte string); the scheme is known and allowed; the key version; then per scheme the values:

* rotation, float32: finite and unit norm (a code is an orthonormal rotation of a unit
  embedding: ``|1 - ||c||| <= 1e-3``), so no "wolf" (all 1e30) can dominate inner products;
* rotation, int8: no -128 and a norm no larger than ``scale`` plus the rounding of every
  component (``0.5 * sqrt(dim)``), not zero;
* IoM: every index below ``q``; BioHash: any bits are a valid code;
* ``he``: the blob structure (:func:`.he.check_he_blob`: exact part count, sizes, no trailing bytes).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ...errors import VeilfaceError
from ...framing import canonical_json, frame_header_bytes
from ...template import MAGIC, MAX_TEMPLATE_BYTES, Template
from ..status import BadRequest, Throttled
from .fields import check_key_version
from .he import HE_MAGIC, check_he_blob

#: allowed deviation of a float32 rotation code's norm from 1 (float32 rounding is ~1e-6)
UNIT_NORM_TOLERANCE = 1e-3


def check_code_values(scheme, codes: np.ndarray) -> None:
    """Value checks of a stack of codes ``(n, *code_shape)`` that passed ``scheme.check_codes``."""
    metric = getattr(scheme, "metric", "")
    with np.errstate(all="ignore"):      # NaN / overflow are what is being checked for, not warnings
        _check_values(scheme, metric, codes)


def _check_values(scheme, metric: str, codes: np.ndarray) -> None:
    if metric == "ip_f32":
        c = np.asarray(codes, dtype=np.float64)
        if not np.isfinite(c).all():
            raise BadRequest("template holds NaN or infinity", reason="TEMPLATE_NOT_FINITE")
        norms = np.linalg.norm(c.reshape(len(c), -1), axis=1)
        if np.any(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE):
            raise BadRequest("a rotation code must have unit norm (it rotates a unit embedding)",
                             reason="TEMPLATE_OUT_OF_RANGE")
    elif metric == "ip_int8":
        c = np.asarray(codes)
        if (c == -128).any():
            raise BadRequest("int8 rotation codes lie in [-127, 127]", reason="TEMPLATE_OUT_OF_RANGE")
        flat = c.reshape(len(c), -1).astype(np.float64)
        norms = np.linalg.norm(flat, axis=1)
        bound = float(scheme.scale) + 0.5 * math.sqrt(flat.shape[1]) + 1e-6
        if np.any(norms > bound) or np.any(norms == 0):
            raise BadRequest(f"an int8 rotation code's norm must lie in (0, {bound:.1f}]", reason="TEMPLATE_OUT_OF_RANGE")
    # iom: indices < q are checked by scheme.check_codes; hamming (BioHash): every bit string is a code


def _scheme(scheme_of: Callable, spec):
    """The scheme of a parsed spec; a constructor that chokes on a parameter of the wrong type
    (``scale: "uint8"``) is a typed refusal too (found by fuzz/fuzz_template.py)."""
    try:
        return scheme_of(spec)
    except VeilfaceError:
        raise
    except (TypeError, ValueError, OverflowError, ArithmeticError) as exc:
        raise BadRequest(f"bad scheme parameters: {str(exc)[:120]}", reason="BAD_SCHEME_PARAMS") from None


def check_wire_template(blob: bytes, what: str, scheme_of: Callable, check_allowed: Callable) -> tuple:
    """``(template, scheme, spec_key, he_header | None)`` of template bytes from the wire.

    ``what``: "template" (Enroll) or "probe" (Verify / Identify); ``scheme_of(spec)``: the scheme
    object (``UnknownScheme`` otherwise); ``check_allowed(spec, spec_key)``: ``allowed_schemes``.
    """
    if not blob:
        raise BadRequest(f"{what} is required", reason="MISSING_TEMPLATE")
    if len(blob) > MAX_TEMPLATE_BYTES:
        raise Throttled(f"{what} of {len(blob)} bytes is too large", reason="TEMPLATE_TOO_LARGE")
    t = Template.from_bytes(blob)                          # TemplateFormatError -> INVALID_ARGUMENT
    if frame_header_bytes(t.to_bytes(), MAGIC) != frame_header_bytes(blob, MAGIC):
        raise BadRequest(f"{what} header is not canonical JSON (sorted keys, no spaces, one encoding per value)",
                         reason="MALFORMED_TEMPLATE")
    spec_key = t.spec.key()
    scheme = _scheme(scheme_of, t.spec)                    # UnknownScheme -> FAILED_PRECONDITION
    check_allowed(t.spec, spec_key)
    check_key_version(t.key_version)
    if getattr(scheme, "encrypted", False):
        data = t.data.tobytes()
        h = check_he_blob(data, kind="template" if what == "template" else "probe", scheme=scheme,
                          key_version=t.key_version)
        if frame_header_bytes(data, HE_MAGIC) != canonical_json(h):
            raise BadRequest(f"HE {what} header is not canonical JSON", reason="HE_MALFORMED")
        return t, scheme, spec_key, h
    check_code_values(scheme, scheme.codes_of(t))          # shape / dtype / indices, then values
    return t, scheme, spec_key, None


def check_stored_template(blob: bytes, scheme_of: Callable) -> tuple:
    """``(template, scheme)`` of a stored template (startup): the same frame and value checks as
    the wire; for ``he`` the structure of a template blob (whose epoch is its key version)."""
    t = Template.from_bytes(blob)
    scheme = _scheme(scheme_of, t.spec)
    check_key_version(t.key_version)
    if getattr(scheme, "encrypted", False):
        check_he_blob(t.data.tobytes(), kind="template", scheme=scheme, key_version=t.key_version)
    else:
        check_code_values(scheme, scheme.codes_of(t))
    return t, scheme
