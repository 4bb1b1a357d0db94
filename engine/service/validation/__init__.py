"""The validation layer: every byte string and field that arrives from the wire passes it before
anything is written (and stored rows pass it again at startup, :mod:`..usecases.recovery`).

* :mod:`.templates` -- protected templates and probes: the frame (bounded header), the scheme,
  code values per scheme (finite, bounded magnitude / norm, indices in range), and for ``he`` the
  blob structure (exact part count for the kind and mode, part sizes, no trailing bytes);
* :mod:`.he` -- HE blob structure and public HE contexts (header fields, exact parts, no secret
  key material, re-serialised by SEAL: only what SEAL parsed is stored);
* :mod:`.fields` -- times (finite, not in the future, not absurdly old), key versions, and the
  token-like vocabularies of free-text fields (notice version, guardian relationship);
* :mod:`.page_tokens` -- opaque, authenticated, range-checked page tokens.

A refusal is a :class:`~engine.service.status.StatusError` (typed status code + machine-readable
reason): nothing is stored, nothing is half-done.
"""
from __future__ import annotations

from .fields import (
    CLOCK_SKEW_S,
    check_key_version,
    check_notice_version,
    check_relationship,
    check_time,
    normalise_label,
)
from .he import check_he_blob, check_public_context, seal_part_size
from .page_tokens import PageTokens
from .templates import check_code_values, check_wire_template

__all__ = ["CLOCK_SKEW_S", "check_key_version", "check_notice_version", "check_relationship", "check_time",
           "normalise_label", "check_he_blob", "check_public_context", "seal_part_size", "PageTokens",
           "check_code_values", "check_wire_template"]
