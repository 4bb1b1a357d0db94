"""Protection schemes, chosen by name + parameters (like faiss' index factory).

>>> s = make_scheme("biohash:bits=256,dim=512")
>>> s.spec.name, s.params["bits"]
('biohash', 256)

Factory strings are ``name`` or ``name:key=value,key=value``; keyword arguments override.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import InvalidParameter, UnknownScheme
from ..template import SchemeSpec
from .base import METRICS, CodeMatching, EncryptedMatching, Protector, Scheme
from .biohash import BioHash
from .iom import IoMHash
from .rotation import Rotation

_REGISTRY: dict[str, type[Protector]] = {}
# Schemes whose modules pull in heavy dependencies are imported on first use.
_LAZY: dict[str, str] = {"he": "engine.he.scheme"}


def register_scheme(cls: type[Protector]) -> type[Protector]:
    """Class decorator: make ``cls`` available to :func:`make_scheme` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (BioHash, IoMHash, Rotation):
    register_scheme(_cls)


def available_schemes() -> list[str]:
    """Names accepted by :func:`make_scheme`."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def scheme_class(name: str) -> type[Protector]:
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownScheme(f"unknown scheme {name!r}; available: {', '.join(available_schemes())}") from None


def _parse_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_factory(desc: str) -> tuple[str, dict]:
    """``"iom:m=256,q=16"`` -> ``("iom", {"m": 256, "q": 16})``."""
    name, _, rest = desc.strip().partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise InvalidParameter(f"bad scheme parameter {item!r} in {desc!r} (want key=value)")
        params[k.strip()] = _parse_value(v.strip())
    return name.strip(), params


def make_scheme(desc: str | SchemeSpec, **overrides: Any) -> Protector:
    """Build a scheme from a factory string or a template's :class:`SchemeSpec`.

    Unknown names raise :class:`UnknownScheme`; unknown or out-of-range parameters raise
    :class:`InvalidParameter`; a spec whose algorithm version this build does not implement
    raises :class:`UnknownScheme`.
    """
    if isinstance(desc, SchemeSpec):
        name, params = desc.name, dict(desc.params)
        cls = scheme_class(name)
        if desc.version != cls.version:
            raise UnknownScheme(f"{name} version {desc.version} is not supported (this build: {cls.version})")
    else:
        name, params = parse_factory(desc)
        cls = scheme_class(name)
    params.update(overrides)
    try:
        scheme = cls(**params)
    except TypeError as exc:
        raise InvalidParameter(f"bad parameters for scheme {name!r}: {exc}") from None
    return scheme


__all__ = ["Protector", "CodeMatching", "EncryptedMatching", "Scheme", "METRICS", "BioHash", "IoMHash", "Rotation", "make_scheme",
           "register_scheme", "available_schemes", "scheme_class", "parse_factory"]
