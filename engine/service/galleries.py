"""Pluggable gallery types per scheme.

Cancellable schemes use :func:`engine.gallery.make_gallery` with the configured backend.
A scheme whose comparisons run on encrypted data (``scheme.encrypted``, e.g. the ``he``
scheme) must provide its own gallery, either through a ``make_gallery()`` method on the
scheme or by registering a factory here with :func:`register_gallery_factory`. A cancellable
gallery has the :class:`engine.gallery.Gallery` interface (``add_codes``, ``remove``,
``verify``, ``search``, ``__len__``, ``__contains__``); an encrypted one the
:class:`engine.he.EncryptedGallery` interface (``add(subject, template)``, ``remove``,
``verify(subject, probe) -> blob``, ``search(probe) -> blob``, ``__len__``), built for the
*public* ``context`` of its tenant epoch. An identify-mode encrypted gallery that also has
``snapshot() -> bytes`` and ``load_snapshot(bytes)`` (``EncryptedGallery``,
``ShardedEncryptedGallery``) is persisted in the store's ``he_snapshots`` table and restored from it
on start (engine/service/README.md, "Restart: gallery snapshots").
"""
from __future__ import annotations

from collections.abc import Callable

from .status import PreconditionFailed

_FACTORIES: dict[str, Callable] = {}


def register_gallery_factory(scheme_name: str, factory: Callable) -> None:
    """``factory(scheme, backend) -> gallery`` for templates of ``scheme_name`` (encrypted
    schemes: ``factory(scheme, backend, context=..., shards=...)``)."""
    _FACTORIES[scheme_name] = factory


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
    from ..gallery import make_gallery
    if backend != "native" and scheme.metric not in ("hamming", "ip_f32"):
        backend = "native"  # faiss has no IoM / int8 kernels
    return make_gallery(scheme, backend)
