"""The Stripe webhook receiver (Starlette on uvicorn).

An event is verified with stripe-python against every configured secret of its
endpoint, committed to the inbox, and only then answered 2xx. Concurrent
requests share one commit (group commit, domain/inbox.py's InboxWriter): a
request waits for the commit that holds its row, so no 200 ever goes out before
the row is durable. Task messages are published after the answer (tasks/events.py's
Publisher); if the broker is down the sweeper enqueues the stored events later.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import psycopg
import stripe
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from config import ConfigError, Settings, get_settings
from domain import inbox, jobs
from domain.inbox import InboxWriter, InvalidEvent, StorageUnavailable, UnstorablePayload, parse_event
from models import Endpoint
from worker import tracing

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter("webhook_events_received", "Webhook requests received", ["endpoint"], registry=r)
        self.stored = Counter("webhook_events_stored", "Events stored in the inbox", ["endpoint"], registry=r)
        self.duplicate = Counter("webhook_events_duplicate", "Deliveries of an event already stored", ["endpoint"], registry=r)
        self.ignored = Counter("webhook_events_ignored", "Authentic events recorded as ignored", ["endpoint", "reason"], registry=r)
        self.rejected = Counter("webhook_events_rejected", "Requests refused", ["endpoint", "reason"], registry=r)
        self.enqueued = Counter("webhook_events_enqueued", "Task messages published", registry=r)
        self.enqueue_failed = Counter("webhook_events_enqueue_failed", "Stored events whose message could not be published", registry=r)
        self.backlog = Gauge("inbox_events", "Inbox events by status", ["status"], registry=r)
        self.job_last_ok = Gauge(
            "job_last_success_timestamp_seconds", "When each scheduled job last finished ok", ["job"], registry=r
        )
        # The alerts' thresholds and the signals the worker cannot see from inside a task.
        self.job_period = Gauge("job_period_seconds", "Each scheduled job's period", ["job"], registry=r)
        self.backlog_age = Gauge(
            "inbox_oldest_waiting_age_seconds", "Age of the oldest event still to be applied (0: none)", registry=r
        )
        self.unacknowledged = Gauge(
            "reconcile_discrepancies_unacknowledged", "Open discrepancies nobody has acknowledged", registry=r
        )


METRICS = Metrics()


def _reject(endpoint: Endpoint, reason: str, status: int = 400) -> JSONResponse:
    METRICS.rejected.labels(endpoint, reason).inc()
    return JSONResponse({"error": reason}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused as soon as it passes `limit` (not after reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _verified(body: str, header: str, secrets: list[str], tolerance: int) -> bool:
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, tolerance)
            return True
        except stripe.SignatureVerificationError:
            continue
    return False


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or get_settings()
    tracing.setup_tracing("marketplace-receiver")
    tracing.setup_error_reports(settings)
    secrets_by_endpoint = {
        Endpoint.PLATFORM: [s.get_secret_value() for s in settings.stripe_webhook_secrets],
        Endpoint.CONNECT: [s.get_secret_value() for s in settings.stripe_connect_webhook_secrets],
    }
    state: dict = {}

    async def receive(request: Request, endpoint: Endpoint) -> Response:
        METRICS.received.labels(endpoint).inc()
        try:
            raw = await _read_body(request, settings.webhook_max_body_bytes)
        except BodyTooLarge:
            return _reject(endpoint, "body too large", 413)
        header = request.headers.get("stripe-signature")
        if not header:
            return _reject(endpoint, "missing signature")
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _reject(endpoint, "body is not UTF-8")
        if not _verified(body, header, secrets_by_endpoint[endpoint], settings.webhook_tolerance_seconds):
            # Wrong secret, forged, or older than the tolerance: Stripe's own check decides.
            return _reject(endpoint, "invalid or expired signature")
        try:
            event = parse_event(body, endpoint, livemode=settings.stripe_livemode)
        except InvalidEvent as error:
            return _reject(endpoint, f"not an event: {error}")
        except (ValueError, RecursionError):
            return _reject(endpoint, "body is not JSON")
        try:
            stored = await state["writer"].store(event)
        except UnstorablePayload:
            return _reject(endpoint, "body is not storable JSON")
        except StorageUnavailable:
            METRICS.rejected.labels(endpoint, "database unavailable").inc()
            return JSONResponse({"error": "temporarily unavailable"}, status_code=503)
        if not stored:
            METRICS.duplicate.labels(endpoint).inc()
            return JSONResponse({"status": "duplicate", "id": event.id})
        if event.ignored_reason:
            METRICS.ignored.labels(endpoint, event.ignored_reason).inc()
            return JSONResponse({"status": "ignored", "id": event.id, "reason": event.ignored_reason})
        METRICS.stored.labels(endpoint).inc()
        tracing.carrying(event.id)
        state["publisher"].submit([event.id])
        return JSONResponse({"status": "stored", "id": event.id})

    async def platform(request: Request) -> Response:
        return await receive(request, Endpoint.PLATFORM)

    async def connect(request: Request) -> Response:
        return await receive(request, Endpoint.CONNECT)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = await asyncio.to_thread(_readiness, settings)
        ok = all(checks.values())
        return JSONResponse(
            {name: "ok" if good else "unreachable" for name, good in checks.items()},
            status_code=200 if ok else 503,
        )

    async def metrics(request: Request) -> Response:
        await asyncio.to_thread(_refresh_backlog, settings)
        return PlainTextResponse(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from tasks.events import Publisher, enqueue_events
        from worker import get_app

        get_app()  # the app the publisher sends through, built before the first request
        writer = InboxWriter(settings.libpq_database_url)
        state["writer"] = writer
        state["publisher"] = Publisher(
            tracing.publishing(enqueue_events), on_published=METRICS.enqueued.inc, on_failed=METRICS.enqueue_failed.inc
        )
        writer.start()
        # Everything loaded so far (Celery, the Stripe SDK, ...) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it on the request
        # path (it took 35-70 ms every half second under load at c64, the whole p99).
        gc.freeze()
        try:
            yield
        finally:
            await writer.stop()
            await asyncio.to_thread(state["publisher"].close)

    return Starlette(
        routes=[
            Route("/webhooks/stripe", platform, methods=["POST"]),
            Route("/webhooks/stripe/connect", connect, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        middleware=tracing.middleware(),
    )


def _readiness(settings: Settings) -> dict[str, bool]:
    checks = {"database": inbox.database_answers(settings.libpq_database_url)}
    try:
        from worker import get_app

        with get_app().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = True
    except Exception:
        checks["broker"] = False
    return checks


def _refresh_backlog(settings: Settings) -> None:
    from domain.connect.discrepancies import count_unacknowledged
    from models.db import session_scope
    from worker.schedule import JOBS

    for job in JOBS:
        METRICS.job_period.labels(job.name).set(job.cadence(settings).period)
    try:
        with psycopg.connect(settings.libpq_database_url, connect_timeout=3) as conn:
            backlog = inbox.backlog(conn)
            backlog_age = inbox.backlog_age_seconds(conn)
            last_ok = jobs.last_successes(conn, [job.name for job in JOBS])
    except Exception:
        return
    for status, count in backlog.items():
        METRICS.backlog.labels(status).set(count)
    METRICS.backlog_age.set(backlog_age)
    for job, finished in last_ok.items():
        METRICS.job_last_ok.labels(job).set(finished.timestamp())
    try:
        with session_scope(settings.database_url) as session:
            METRICS.unacknowledged.set(count_unacknowledged(session))
    except Exception:  # the gauge keeps its last value, as the backlog's do
        pass


def serve(host: str, port: int, processes: int | None = None) -> None:
    import uvicorn

    settings = get_settings()
    if not settings.stripe_webhook_secrets:
        raise ConfigError("configuration error: STRIPE_WEBHOOK_SECRETS is not set")
    processes = processes or settings.webhook_processes
    options = dict(host=host, port=port, log_level="warning", access_log=False, log_config=None)
    if processes == 1:
        # log_config=None: uvicorn's records go through the process's handler (worker/logging_setup.py).
        uvicorn.run(create_app(settings), **options)
        return
    # Several processes accept on one shared socket, each with its own connection and group
    # commit; uvicorn's supervisor restarts one that dies. Each is spawned afresh, so it sets up
    # its own logging (create_app_in_process).
    uvicorn.run("worker.receiver:create_app_in_process", factory=True, workers=processes, **options)


def create_app_in_process() -> Starlette:
    """The app of one of several receiver processes (a spawned interpreter: logging set up anew)."""
    from worker.logging_setup import configure_logging

    configure_logging()
    return create_app()
