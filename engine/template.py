"""Protected templates and their stable, versioned binary form.

Wire format (little endian)::

    b"VFT" | format version (u8, currently 1) | header length (u32) | header | payload

``header`` is canonical JSON (sorted keys, no spaces) with the scheme name, scheme version,
parameters, key version, payload dtype and shape; ``payload`` is the raw C-order array.
Anything else -- a truncated buffer, an unknown format version, a payload that does not fit
its header -- raises :class:`TemplateFormatError`; nothing is guessed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import SchemeMismatch, TemplateFormatError
from .framing import canonical_json, pack_frame, unpack_frame

MAGIC = b"VFT"
FORMAT_VERSION = 1
MAX_TEMPLATE_BYTES = 1 << 20  # 1 MiB: far above any cancellable template; guards the parser
_ALLOWED_DTYPES = {"uint8", "uint16", "int8", "float32"}


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
        h, payload = unpack_frame(buf, MAGIC, FORMAT_VERSION, error=TemplateFormatError,
                                  what="template", max_bytes=MAX_TEMPLATE_BYTES)
        try:
            spec = SchemeSpec(str(h["scheme"]), int(h["version"]), dict(h["params"]))
            dtype, shape, key_version = h["dtype"], tuple(int(s) for s in h["shape"]), int(h["key_version"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TemplateFormatError(f"corrupt template header: {exc}") from None
        if dtype not in _ALLOWED_DTYPES or any(s < 0 for s in shape):
            raise TemplateFormatError(f"bad payload description {dtype}{list(shape)}")
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(payload) != expected:
            raise TemplateFormatError(f"payload is {len(payload)} bytes, header says {expected}")
        data = np.frombuffer(payload, dtype=dtype).reshape(shape).copy()
        return cls(spec, data, key_version)

    def require(self, spec: SchemeSpec) -> Template:
        """Return self if it was made with ``spec``; raise :class:`SchemeMismatch` otherwise."""
        if self.spec != spec:
            raise SchemeMismatch(f"template made with {self.spec.key()}, expected {spec.key()}")
        return self
