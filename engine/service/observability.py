"""Metrics, tracing and per-request logs of the matcher (docs/operations.md).

* **Request ids and access log** -- :class:`ObservabilityInterceptor` wraps every RPC: it takes
  the caller's ``x-request-id`` (or makes one), returns it in the trailing metadata, opens the
  :mod:`.request_context` the audit entry reads it from, and writes one access-log line (method,
  status code, reason, latency, request id, principal -- never a template, probe or score) to the
  ``veilface.access`` logger.
* **Prometheus** (``metrics_port``; ``prometheus-client``, a private registry per server) --
  RPC counts and latency histograms by method and status code, updated by the same interceptor;
  gallery sizes, persons stored, intrusion alerts and audit chain length read at scrape time.
  Served on 127.0.0.1 only: put a scraper or a proxy on the host.
* **OpenTelemetry** (``tracing = "otlp" | "console"``; the optional ``veilface[tracing]``
  extra) -- the standard gRPC server instrumentation, with the request id on the span.
* :func:`setup_logging` -- text or JSON lines for ``veilface serve``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from collections.abc import Callable

import grpc

from .._optional import require
from ..errors import REASON_KEY
from . import request_context as rc
from .status import BadRequest

log = logging.getLogger("veilface.service")
access_log = logging.getLogger("veilface.access")

SERVICE_PREFIX = "/veilface.v1.Matcher/"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def method_label(full_method: str) -> str:
    """``Enroll`` for the matcher's own methods, ``grpc.health.v1.Health/Check`` for others."""
    if full_method.startswith(SERVICE_PREFIX):
        return full_method[len(SERVICE_PREFIX):]
    return full_method.lstrip("/")


# -- logging ---------------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``msg`` -- or, for
    access-log records, their fields instead of ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def setup_logging(fmt: str = "text", stream=None) -> None:
    """Configure the root logger for ``veilface serve``: INFO, text or JSON lines on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


# -- metrics ---------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one server, in a private registry (several servers per process in tests).

    ``state`` is read at scrape time: ``state()`` returns ``{"galleries": [(labels dict, size)],
    "persons": int, "intrusion_alerts": int, "audit_entries": int}``.
    """

    def __init__(self, state: Callable[[], dict] | None = None) -> None:
        require("prometheus_client", "server", "Prometheus metrics (metrics_port)")
        from prometheus_client import CollectorRegistry, Counter, Histogram
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("veilface_rpc_requests", "RPCs handled, by method and status code",
                                ("method", "code"), registry=self.registry)
        self.latency = Histogram("veilface_rpc_latency_seconds", "RPC latency (server side), by method and status code",
                                 ("method", "code"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self._state = state
        if state is not None:
            self.registry.register(_StateCollector(state))
        self._server = None
        self.port = 0

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method, code).observe(seconds)

    def serve(self, port: int) -> int:
        """Serve ``/metrics`` on 127.0.0.1:``port`` (0 = any free port); returns the port."""
        from prometheus_client import start_http_server
        try:
            self._server, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as exc:
            raise BadRequest(f"cannot serve metrics on 127.0.0.1:{port} ({exc.strerror}): "
                             "choose another --metrics-port", reason="PORT_IN_USE") from None
        self.port = self._server.server_port
        return self.port

    def render(self) -> bytes:
        """The exposition text (what a scrape returns)."""
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _StateCollector:
    """Gauges read from the running matcher at scrape time (no bookkeeping on the request path)."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self.state = state

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        try:
            s = self.state()
        except Exception:  # noqa: BLE001 - a scrape must not fail the server
            log.exception("metrics: could not read the matcher state")
            return
        g = GaugeMetricFamily("veilface_gallery_templates", "Templates (samples) held by each in-memory gallery",
                              labels=("tenant", "purpose", "scheme", "key_version", "gallery"))
        for labels, size in s.get("galleries", ()):
            g.add_metric([labels["tenant"], labels["purpose"], labels["scheme"], str(labels["key_version"]),
                          labels["gallery"]], size)
        yield g
        yield GaugeMetricFamily("veilface_persons_stored", "Distinct persons with a searchable template",
                                value=s.get("persons", 0))
        yield CounterMetricFamily("veilface_intrusion_alerts", "INTRUSION_ALERT entries in the audit log",
                                  value=s.get("intrusion_alerts", 0))
        yield GaugeMetricFamily("veilface_audit_chain_length", "Entries in the hash-chained audit log",
                                value=s.get("audit_entries", 0))


def app_state(app) -> Callable[[], dict]:
    """The scrape-time state of a :class:`~engine.service.app.MatcherApp`."""
    def state() -> dict:
        backend = app.index.backend
        galleries = [({"tenant": k.tenant, "purpose": k.purpose, "scheme": k.scheme, "key_version": k.key_version,
                       "gallery": getattr(k, "gallery", "")}, backend.size(k)) for k in backend.keys()]
        return {"galleries": galleries, "persons": app.index.persons(),
                "intrusion_alerts": app.store.count_audit_action("INTRUSION_ALERT"),
                "audit_entries": app.store.audit_head()[0]}
    return state


# -- tracing ---------------------------------------------------------------------------------------
class Tracing:
    """The OpenTelemetry gRPC server interceptor with its own tracer provider (not the global one)."""

    def __init__(self, kind: str, endpoint: str = "", exporter=None) -> None:
        feature = f'tracing = "{kind}"'
        for module in ("opentelemetry.sdk.trace", "opentelemetry.instrumentation.grpc"):
            require(module, "tracing", feature)
        from opentelemetry.instrumentation.grpc import server_interceptor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
        self.provider = TracerProvider(resource=Resource.create({"service.name": "veilface-matcher"}))
        if exporter is not None:                 # tests: an in-memory exporter
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        elif kind == "console":
            self.provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            require("opentelemetry.exporter.otlp.proto.grpc", "tracing", feature)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or None)))
        self.interceptor = server_interceptor(tracer_provider=self.provider)

    def close(self) -> None:
        self.provider.shutdown()         # flushes what is batched


#: tests replace this to capture spans (an ``InMemorySpanExporter``)
span_exporter_override = None


def _tag_span(info: rc.RequestInfo) -> str:
    """Put the request id on the current span (when tracing); returns its trace id ("" if none)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return ""
    span = trace.get_current_span()
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return ""
    span.set_attribute("veilface.request_id", info.request_id)
    return format(ctx.trace_id, "032x")


# -- the interceptor ---------------------------------------------------------------------------------
class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request id, access log and RPC metrics around every call (see the module docstring)."""

    def __init__(self, metrics: Metrics | None = None, access: bool = True, tracing: bool = False) -> None:
        self.metrics, self.access, self.tracing = metrics, access, tracing

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = method_label(handler_call_details.method or "")

        def wrap(fn, streaming_response: bool):
            if fn is None:
                return None
            if streaming_response:
                def run_stream(req, ctx):
                    info, token, t0, trace_id = self._begin(method, ctx)
                    code = "OK"
                    try:
                        yield from fn(req, ctx)
                    except BaseException:
                        code = _code_of(ctx, error=True)
                        raise
                    finally:
                        self._end(info, token, t0, ctx, code, trace_id)
                return run_stream

            def run(req, ctx):
                info, token, t0, trace_id = self._begin(method, ctx)
                code = "OK"
                try:
                    return fn(req, ctx)
                except BaseException:
                    code = _code_of(ctx, error=True)
                    raise
                finally:
                    self._end(info, token, t0, ctx, code, trace_id)
            return run

        return handler._replace(unary_unary=wrap(handler.unary_unary, False),
                                unary_stream=wrap(handler.unary_stream, True),
                                stream_unary=wrap(handler.stream_unary, False),
                                stream_stream=wrap(handler.stream_stream, True))

    def _begin(self, method: str, ctx):
        info = rc.RequestInfo(rc.request_id_from(ctx.invocation_metadata()), method)
        token = rc.begin(info)
        trace_id = _tag_span(info) if self.tracing else ""
        return info, token, time.perf_counter(), trace_id

    def _end(self, info: rc.RequestInfo, token, t0: float, ctx, code: str, trace_id: str) -> None:
        seconds = time.perf_counter() - t0
        rc.end(token)
        _return_request_id(ctx, info.request_id)
        if code == "OK":
            code = _code_of(ctx, error=False)
        if self.metrics is not None:
            self.metrics.observe(info.method, code, seconds)
        if self.access:
            reason = _reason_of(ctx) if code != "OK" else ""
            fields = {"event": "rpc", "method": info.method, "code": code, "reason": reason,
                      "latency_ms": round(seconds * 1000, 3), "request_id": info.request_id,
                      "principal": info.principal or "anonymous"}
            if trace_id:
                fields["trace_id"] = trace_id
            access_log.info("%s %s%s %.1f ms request_id=%s principal=%s", info.method, code,
                            f" {reason}" if reason else "", seconds * 1000, info.request_id, fields["principal"],
                            extra={"fields": fields})


def _return_request_id(ctx, request_id: str) -> None:
    """Add the request id to the trailing metadata (next to ``veilface-reason``). Trailing, not
    initial: headers sent early would commit the call, and gRPC would no longer retry it on
    another replica when this one dies mid-call."""
    try:
        md = tuple(ctx.trailing_metadata() or ())
        if not any(k == rc.METADATA_KEY for k, _ in md):
            ctx.set_trailing_metadata((*md, (rc.METADATA_KEY, request_id)))
    except Exception:  # noqa: BLE001 - the id is still logged and audited
        pass


def _code_of(ctx, error: bool) -> str:
    try:
        code = ctx.code()
    except Exception:  # noqa: BLE001 - a context without code(): older grpcio
        code = None
    if code is None:
        return "UNKNOWN" if error else "OK"
    return getattr(code, "name", str(code))


def _reason_of(ctx) -> str:
    try:
        for k, v in ctx.trailing_metadata() or ():
            if k == REASON_KEY:
                return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001
        pass
    return ""


# -- wiring ------------------------------------------------------------------------------------------
def check_dependencies(cfg) -> None:
    """Raise one clear error now if the configured metrics / tracing need a package that is missing."""
    if cfg.metrics_port >= 0:
        require("prometheus_client", "server", "Prometheus metrics (metrics_port)")
    if cfg.tracing:
        for module in ("opentelemetry.sdk.trace", "opentelemetry.instrumentation.grpc"):
            require(module, "tracing", f'tracing = "{cfg.tracing}"')
        if cfg.tracing == "otlp":
            require("opentelemetry.exporter.otlp.proto.grpc", "tracing", 'tracing = "otlp"')



class Observability:
    """What a :class:`~engine.service.server.VeilfaceServer` adds for observability: the
    interceptors (tracing first, then ours) and the metrics endpoint."""

    def __init__(self, cfg, app) -> None:
        self.cfg = cfg
        self.metrics = Metrics(app_state(app)) if cfg.metrics_port >= 0 else None
        self.tracing = Tracing(cfg.tracing, cfg.tracing_endpoint, span_exporter_override) if cfg.tracing else None
        self.interceptor = ObservabilityInterceptor(self.metrics, cfg.access_log, tracing=self.tracing is not None)

    def interceptors(self) -> list:
        """Outermost first: the span is open while our interceptor and the auth check run."""
        return ([self.tracing.interceptor] if self.tracing else []) + [self.interceptor]

    @property
    def metrics_port(self) -> int:
        return self.metrics.port if self.metrics is not None else -1

    def start(self) -> None:
        if self.metrics is not None:
            self.metrics.serve(self.cfg.metrics_port)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tracing is not None:
            self.tracing.close()
