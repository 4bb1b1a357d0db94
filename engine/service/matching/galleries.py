"""Gallery types per scheme, and the cache of scheme objects by spec key.

Cancellable schemes use :func:`engine.gallery.make_gallery` with the configured backend.
A scheme whose comparisons run on encrypted data (``scheme.encrypted``, e.g. the ``he``
scheme) must provide its own gallery, either through a ``make_gallery()`` method on the
scheme or by registering a factory here with :func:`register_gallery_factory`. A cancellable
gallery has the :class:`engine.gallery.Gallery` interface (``add_codes``, ``remove``,
``verify``, ``search``, ``__len__``, ``__contains__``); an encrypted one the ``engine.he``
gallery interface (``add(subject, template)``, ``remove``, ``verify(subject, probe) -> blob``,
``search(probe) -> blob``, ``__len__``), built for the *public* ``context`` of its tenant epoch.
An identify-mode encrypted gallery that also has ``snapshot() -> bytes`` and
``load_snapshot(bytes)`` is persisted in the store and restored from it on start
(``engine/service/README.md``, "Restart: gallery snapshots").
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from ...errors import UnknownScheme
from ...schemes import make_scheme
from ...template import SchemeSpec
from ..status import PreconditionFailed

_FACTORIES: dict[str, Callable] = {}


def register_gallery_factory(scheme_name: str, factory: Callable) -> None:
    """``factory(scheme, backend) -> gallery`` for templates of ``scheme_name`` (encrypted
    schemes: ``factory(scheme, backend, context=..., shards=...)``)."""
    _FACTORIES[scheme_name] = factory


def has_gallery_type(scheme) -> bool:
    """Whether :func:`new_gallery` can build a gallery for ``scheme``."""
    return scheme.name in _FACTORIES or not getattr(scheme, "encrypted", False) or hasattr(scheme, "make_gallery")


def new_gallery(scheme, backend: str = "native", context=None, shards: int = 1):
    """A gallery for ``scheme``; encrypted schemes get their public ``context`` (and ``shards``)."""
    factory = _FACTORIES.get(scheme.name)
    if factory is not None:
        if context is not None:
            return factory(scheme, backend, context=context, shards=shards)
        return factory(scheme, backend)
    if getattr(scheme, "encrypted", False):
        hook = getattr(scheme, "make_gallery", None)
        if hook is None:
            raise PreconditionFailed(f"no gallery type registered for encrypted scheme {scheme.name!r}",
                                     reason="SCHEME_NOT_SUPPORTED")
        if context is None:
            return hook()
        if shards > 1 and getattr(scheme, "mode", "") == "identify":
            return hook(context, shards=shards)
        return hook(context)
    from ...gallery import make_gallery
    if backend != "native" and scheme.metric not in ("hamming", "ip_f32"):
        backend = "native"  # faiss has no IoM / int8 kernels
    return make_gallery(scheme, backend)


class SchemeCache:
    """Scheme objects by canonical spec key (thread-safe; built once per spec)."""

    def __init__(self) -> None:
        self._by_key: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, spec_key: str):
        """The cached scheme of ``spec_key``, or None."""
        with self._lock:
            return self._by_key.get(spec_key)

    def of(self, spec: SchemeSpec):
        """The scheme of ``spec`` (made and cached on first use). ``UnknownScheme`` for a name
        without a scheme, or an encrypted scheme this service has no gallery type for."""
        key = spec.key()
        scheme = self.get(key)
        if scheme is None:
            scheme = make_scheme(spec)
            if not has_gallery_type(scheme):
                raise UnknownScheme(f"scheme {scheme.name!r} has no gallery type in this service")
            scheme = self.remember(key, scheme)
        return scheme

    def remember(self, spec_key: str, scheme):
        """Cache ``scheme`` unless one is cached already; returns the cached one."""
        with self._lock:
            return self._by_key.setdefault(spec_key, scheme)
