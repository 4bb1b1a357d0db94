"""Pluggable gallery types per scheme.

Cancellable schemes use :func:`engine.gallery.make_gallery` with the configured backend.
A scheme whose comparisons run on encrypted data (``scheme.encrypted``, e.g. the ``he``
scheme) must provide its own gallery, either through a ``make_gallery()`` method on the
scheme or by registering a factory here with :func:`register_gallery_factory`. The factory
must return an object with the :class:`engine.gallery.Gallery` interface (``add_codes``,
``remove``, ``verify``, ``search``, ``__len__``, ``__contains__``).
"""
from __future__ import annotations

from typing import Callable

from .status import PreconditionFailed

_FACTORIES: dict[str, Callable] = {}


def register_gallery_factory(scheme_name: str, factory: Callable) -> None:
    """``factory(scheme, backend) -> gallery`` for templates of ``scheme_name``."""
    _FACTORIES[scheme_name] = factory


def new_gallery(scheme, backend: str = "native"):
    factory = _FACTORIES.get(scheme.name)
    if factory is not None:
        return factory(scheme, backend)
    if getattr(scheme, "encrypted", False):
        hook = getattr(scheme, "make_gallery", None)
        if hook is None:
            raise PreconditionFailed(f"no gallery type registered for encrypted scheme {scheme.name!r}",
                                     reason="SCHEME_NOT_SUPPORTED")
        return hook()
    from ..gallery import make_gallery
    if backend != "native" and scheme.metric not in ("hamming", "ip_f32"):
        backend = "native"  # faiss has no IoM / int8 kernels
    return make_gallery(scheme, backend)
