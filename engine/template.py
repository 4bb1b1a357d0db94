"""Protected templates and their stable, versioned binary form.

Wire format (little endian)::

    b"VFT" | format version (u8, currently 1) | header length (u32) | header | payload

``header`` is canonical JSON (sorted keys, no spaces) with the scheme name, scheme version,
parameters, key version, payload dtype and shape; ``payload`` is the raw C-order array.
Anything else -- a truncated buffer, an unknown format version, a payload that does not fit
its header -- raises :class:`TemplateFormatError`; nothing is guessed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import SchemeMismatch, TemplateFormatError
from .framing import canonical_json, pack_frame, unpack_frame

MAGIC = b"VFT"
FORMAT_VERSION = 1
MAX_TEMPLATE_BYTES = 1 << 20  # 1 MiB: far above any cancellable template; guards the parser
MAX_HEADER_BYTES = 4096       # a template header is ~150 bytes
MAX_KEY_VERSION = 2**31 - 1   # key versions travel as int32 in the proto
_ALLOWED_DTYPES = {"uint8", "uint16", "int8", "float32"}
_HEADER_KEYS = frozenset({"scheme", "version", "params", "key_version", "dtype", "shape"})
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_MAX_PARAMS, _MAX_PARAM_TEXT, _MAX_DIMS = 16, 64, 4


def _int(h: dict, key: str, lo: int, hi: int) -> int:
    v = h[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise TemplateFormatError(f"template header {key} must be an integer in [{lo}, {hi}], got {str(v)[:32]!r}")
    return v


def _params(p) -> dict:
    """Scheme parameters: a small flat table of names to scalars (nothing nested can ride along)."""
    if not isinstance(p, dict) or len(p) > _MAX_PARAMS:
        raise TemplateFormatError("template header params must be a table of at most 16 scalars")
    for k, v in p.items():
        if not _NAME.fullmatch(k):
            raise TemplateFormatError(f"bad parameter name {k[:32]!r}")
        ok = (isinstance(v, (bool, int)) or (isinstance(v, float) and math.isfinite(v))
              or (isinstance(v, str) and len(v) <= _MAX_PARAM_TEXT))
        if not ok:
            raise TemplateFormatError(f"parameter {k} must be a short scalar")
    return dict(p)


def read_header(h: dict) -> tuple[SchemeSpec, str, tuple[int, ...], int]:
    """``(spec, dtype, shape, key_version)`` of a parsed template header: exactly the known keys,
    each of its type and in range (a header is attacker bytes until it passes this)."""
    if set(h) != _HEADER_KEYS:
        extra, missing = sorted(set(h) - _HEADER_KEYS), sorted(_HEADER_KEYS - set(h))
        raise TemplateFormatError(f"template header fields: unknown {extra[:4]}, missing {missing}")
    scheme, dtype, shape = h["scheme"], h["dtype"], h["shape"]
    if not isinstance(scheme, str) or not _NAME.fullmatch(scheme):
        raise TemplateFormatError("template header scheme must be a short lower-case name")
    if not isinstance(dtype, str) or dtype not in _ALLOWED_DTYPES:
        raise TemplateFormatError(f"template dtype must be one of {sorted(_ALLOWED_DTYPES)}")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_DIMS
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_TEMPLATE_BYTES for s in shape)):
        raise TemplateFormatError(f"template shape must be 1-{_MAX_DIMS} sizes in [0, {MAX_TEMPLATE_BYTES}]")
    if math.prod(shape) * np.dtype(dtype).itemsize > MAX_TEMPLATE_BYTES:
        raise TemplateFormatError(f"template shape {shape} exceeds {MAX_TEMPLATE_BYTES} bytes")
    spec = SchemeSpec(scheme, _int(h, "version", 1, 1000), _params(h["params"]))
    return spec, dtype, tuple(shape), _int(h, "key_version", 0, MAX_KEY_VERSION)


@dataclass(frozen=True)
class SchemeSpec:
    """What a template was made with: scheme name, algorithm version, parameters."""

    name: str
    version: int
    params: dict = field(default_factory=dict)

    def key(self) -> str:
        """A canonical string identifying the spec (usable as a dict/database key)."""
        return f"{self.name}/v{self.version}:" + canonical_json(self.params).decode()

    def __hash__(self) -> int:
        return hash(self.key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SchemeSpec) and self.key() == other.key()


@dataclass(frozen=True, eq=False)
class Template:
    """A protected template: the array a scheme produced plus the spec that made it.

    ``data`` holds one template (shape = the scheme's ``code_shape``). ``key_version`` is the
    version of the subject's transform key (not the key itself).
    """

    spec: SchemeSpec
    data: np.ndarray
    key_version: int = 1

    def to_bytes(self) -> bytes:
        data = np.ascontiguousarray(self.data)
        if data.dtype.name not in _ALLOWED_DTYPES:
            raise TemplateFormatError(f"dtype {data.dtype} cannot be serialised")
        header = {
            "scheme": self.spec.name, "version": self.spec.version, "params": self.spec.params,
            "key_version": int(self.key_version), "dtype": data.dtype.name,
            "shape": list(data.shape),
        }
        return pack_frame(MAGIC, FORMAT_VERSION, header, data.tobytes())

    @classmethod
    def from_bytes(cls, buf: bytes) -> Template:
        """Parse a template frame. Every header field is type- and range-checked (see
        :func:`read_header`); the payload must fill the declared shape exactly."""
        h, payload = unpack_frame(buf, MAGIC, FORMAT_VERSION, error=TemplateFormatError, what="template",
                                  max_bytes=MAX_TEMPLATE_BYTES, max_header_bytes=MAX_HEADER_BYTES)
        spec, dtype, shape, key_version = read_header(h)
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if len(payload) != expected:
            raise TemplateFormatError(f"payload is {len(payload)} bytes, header says {expected}")
        data = np.frombuffer(payload, dtype=dtype).reshape(shape).copy()
        return cls(spec, data, key_version)

    def require(self, spec: SchemeSpec) -> Template:
        """Return self if it was made with ``spec``; raise :class:`SchemeMismatch` otherwise."""
        if self.spec != spec:
            raise SchemeMismatch(f"template made with {self.spec.key()}, expected {spec.key()}")
        return self
