"""Traces from a webhook to what it changed, and error reports: both optional (the
`observability` extra), both off unless configured. Nothing here imports OpenTelemetry or
sentry-sdk until the setting that enables it is read, so a process without them pays nothing.

What a trace is. A webhook crosses two processes and a batching step: the receiver commits
the event and answers, its publisher thread sends the ids of several requests in one
`process_events` message (tasks/events.py, `Publisher`), and a worker applies that message's
events in one transaction. So:

- the receiver's request span (`POST /webhooks/stripe`) is a trace of its own and records the
  event id (`stripe.event_id`);
- each message the publisher sends starts a trace: its `publish events` span is linked (span
  links) to the request span of every event it carries and lists their ids;
- Celery's instrumentation puts the message's span in its headers, so the worker's
  `run/tasks.events.process_events` span is a child of the publish (through Celery's
  `apply_async/...` span), and every SQL statement the task runs (the UPDATE of
  `marketplace.transactions` among them) is a span under that.

From a request, follow its link to the publish trace; from an event id, search either trace
by `stripe.event_id(s)`. A request span cannot be the parent of a batch carrying other
requests' events too, hence the links. Log lines written while a span is active carry its
`trace_id` and `span_id` (worker/logging_setup.py), so the task's log lines name the publish
trace.

Enabled by OTEL_EXPORTER_OTLP_ENDPOINT (or TRACING_ENABLED=true with the exporter's other
OTEL_* settings); spans go out over OTLP/HTTP in batches from a background thread. Error
reports: SENTRY_DSN; every event is redacted as the logs are before it leaves the process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from config import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from starlette.middleware import Middleware

log = logging.getLogger(__name__)

PUBLISH_SPAN = "publish events"
EVENT_ID = "stripe.event_id"
EVENT_IDS = "stripe.event_ids"

# The request span of each stored event, until the publisher sends its id: at most this many
# (the publisher sends every id it is given within moments; the bound only guards the memory
# of a process whose broker is down for long).
_CARRIED_MAX = 10_000

_provider: TracerProvider | None = None
_carried: OrderedDict[str, Any] = OrderedDict()
# The event loop adds to it and the publisher thread takes from it.
_carried_lock = threading.Lock()
_errors_on = False


def _settings() -> Settings | None:
    try:
        return get_settings()
    except ConfigError:
        return None


def tracing_configured(settings: Settings | None) -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or (settings is not None and settings.tracing_enabled))


def setup_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> bool:
    """Trace this process (once; later calls do nothing): a tracer provider exporting in
    batches, Celery's publishes and task runs, the process's SQLAlchemy engine. Does nothing
    unless tracing is configured (or a test hands its own `exporter`) and the extra is
    installed. True when the process is traced."""
    global _provider
    if _provider is not None:
        return True
    if exporter is None and not tracing_configured(_settings()):
        return False
    try:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, timeout: the OTEL_EXPORTER_OTLP_* variables
    except ImportError as error:
        log.warning("tracing is configured but the observability extra is not installed (%s)", error.name)
        return False
    from models.db import get_engine

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    CeleryInstrumentor().instrument(tracer_provider=provider)
    # The engine every session of this process uses (models/db.py makes one per process, after
    # the fork in a worker); it is created before any statement runs, so it is instrumented
    # here by name rather than by wrapping create_engine.
    # skip_dep_check: the instrumentation declares SQLAlchemy below 2.1, and the engine events it
    # listens to are the same in 2.1 (tests/test_tracing.py sees the UPDATE spans).
    SQLAlchemyInstrumentor().instrument(tracer_provider=provider, engine=get_engine(), skip_dep_check=True)
    _provider = provider
    return True


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def shutdown_tracing() -> None:
    """Undo setup_tracing (tests): export what is left, stop instrumenting."""
    global _provider
    if _provider is None:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    CeleryInstrumentor().uninstrument()
    SQLAlchemyInstrumentor().uninstrument()
    _provider.shutdown()
    _provider = None
    _carried.clear()


# --- the receiver ---------------------------------------------------------------------------


# Probes and scrapes: every few seconds, nothing to follow.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestSpans:
    """ASGI middleware: one server span per HTTP request, named by its route
    (`POST /webhooks/stripe`), current while the endpoint runs."""

    def __init__(self, app: Callable, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer(__name__)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        from opentelemetry import trace

        method = scope["method"]
        status: list[int] = []

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        with self.tracer.start_as_current_span(
            method, kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            try:
                await self.app(scope, receive, sending)
            finally:
                # The router names the matched route in the scope it was given (this one).
                route = getattr(scope.get("route"), "path", None)
                if route is not None:
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(trace.StatusCode.ERROR)


def middleware() -> list[Middleware]:
    """The receiver's middleware for tracing: none unless this process is traced."""
    if _provider is None:
        return []
    from starlette.middleware import Middleware

    return [Middleware(RequestSpans, provider=_provider)]


def carrying(event_id: str) -> None:
    """The request being served stored `event_id`: its span records the id, and the publish
    that carries the id will link to it."""
    if _provider is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    context = span.get_span_context()
    if not context.is_valid:
        return
    span.set_attribute(EVENT_ID, event_id)
    with _carried_lock:
        _carried[event_id] = context
        while len(_carried) > _CARRIED_MAX:
            _carried.popitem(last=False)


def publishing(enqueue: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`enqueue` (tasks.events.enqueue_events, given to the receiver's Publisher), each call in
    a `publish events` span of its own trace, linked to the requests whose events it sends."""
    if _provider is None:
        return enqueue
    from opentelemetry import context as otel_context, trace

    tracer = _provider.get_tracer(__name__)

    def traced(event_ids: list[str]) -> None:
        links = []
        for event_id in event_ids:
            with _carried_lock:
                request = _carried.pop(event_id, None)
            if request is not None:
                links.append(trace.Link(request, {EVENT_ID: event_id}))
        with tracer.start_as_current_span(
            PUBLISH_SPAN, context=otel_context.Context(), kind=trace.SpanKind.PRODUCER, links=links,
            attributes={EVENT_IDS: list(event_ids), "messaging.batch.message_count": len(event_ids)},
        ):
            enqueue(event_ids)

    return traced


# --- error reports --------------------------------------------------------------------------


def setup_error_reports(settings: Settings | None = None) -> bool:
    """Sentry, when SENTRY_DSN is set and sentry-sdk is installed (once per process): errors
    and error log lines of Celery tasks and of the receiver, no personal data, no local
    variables (they hold payloads), every event redacted like a log line. True when on."""
    global _errors_on
    if _errors_on:
        return True
    settings = settings or _settings()
    if settings is None or settings.sentry_dsn is None:
        return False
    try:
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
        from sentry_sdk.integrations.starlette import StarletteIntegration
    except ImportError:
        log.warning("SENTRY_DSN is set but the observability extra is not installed")
        return False
    from worker.logging_setup import Redactor, configured_secrets

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        integrations=[CeleryIntegration(), StarletteIntegration()],
        send_default_pii=False,
        include_local_variables=False,
        before_send=redacting(Redactor(configured_secrets(settings))),
        environment=settings.sentry_environment,
    )
    _errors_on = True
    return True


def redacting(redact: Callable[[str], str]) -> Callable[[dict, Any], dict]:
    """A Sentry `before_send` that passes every string of the event through `redact`."""

    def before_send(event: dict, hint: Any) -> dict:
        return _redacted(event, redact)

    return before_send


def _redacted(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: _redacted(item, redact) for key, item in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, bytes | bytearray):
        return [_redacted(item, redact) for item in value]
    return value
