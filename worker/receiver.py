"""The Stripe webhook receiver (Starlette on uvicorn).

An event is verified with stripe-python against every configured secret of its
endpoint, committed to the inbox, and only then answered 2xx. Concurrent
requests share one commit (group commit): a request waits for the commit that
holds its row, so no 200 ever goes out before the row is durable. Task messages
are published after the answer; if the broker is down the sweeper enqueues the
stored events later.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
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

from config import Settings, get_settings
from domain.inbox import INSERT_EVENTS_SQL, IncomingEvent, InvalidEvent, insert_params, parse_event

log = logging.getLogger(__name__)

MAX_BATCH = 500


class StorageUnavailable(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class UnstorablePayload(Exception):
    """Authentic JSON that Postgres's jsonb refuses (e.g. a lone UTF-16 surrogate)."""


class InboxWriter:
    """One connection, one INSERT and one commit per batch of concurrent requests."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.queue: asyncio.Queue[tuple[IncomingEvent, asyncio.Future]] = asyncio.Queue()
        self.conn: psycopg.AsyncConnection | None = None
        self.task: asyncio.Task | None = None

    async def store(self, event: IncomingEvent) -> bool:
        """True when stored now, False for a duplicate; raises StorageUnavailable."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((event, future))
        return await future

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                inserted = await self._insert([event for event, _ in batch])
            except psycopg.errors.DataError:
                # A value the database refuses (jsonb's unicode rules): store the batch row by
                # row so only the offending event is refused, not its neighbours.
                await self._drop_connection()
                inserted = await self._insert_one_by_one(batch)
                if inserted is None:
                    continue
            except Exception as error:  # any database failure: Stripe gets 503 and retries
                log.error("inbox unavailable: %s", type(error).__name__)
                await self._drop_connection()
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StorageUnavailable())
                continue
            for event, future in batch:
                if not future.done():
                    # The first request carrying an id stored it; any other is a duplicate.
                    future.set_result(event.id in inserted)
                    inserted.discard(event.id)

    async def _insert(self, events: list[IncomingEvent]) -> set[str]:
        if self.conn is None or self.conn.closed:
            # A stuck database must turn into 503s (Stripe retries), not into requests that hang.
            self.conn = await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=5, options="-c statement_timeout=10000"
            )
        async with self.conn.transaction():
            cursor = await self.conn.execute(INSERT_EVENTS_SQL, insert_params(events))
            return {row[0] for row in await cursor.fetchall()}

    async def _insert_one_by_one(self, batch) -> set[str] | None:
        inserted: set[str] = set()
        for event, future in batch:
            try:
                inserted |= await self._insert([event])
            except psycopg.errors.DataError:
                await self._drop_connection()
                future.set_exception(UnstorablePayload())
            except Exception:
                await self._drop_connection()
                for _, pending in batch:
                    if not pending.done():
                        pending.set_exception(StorageUnavailable())
                return None
        return inserted

    async def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            except Exception:
                pass
        self.conn = None


# How long the first stored id waits for others before its message goes out. A worker applies
# a message's events in one transaction, several times cheaper per event than one by one, and
# when requests come one at a time each commit holds a single id: gathering for this long turns
# 500 requests/s into messages of about 25 ids, for 50 ms more between commit and processing.
GATHER_SECONDS = 0.05


class Publisher:
    """Publishes task messages from one background thread, off the request path."""

    def __init__(self) -> None:
        # Imported here, at startup, not by the thread while the first requests are served.
        from tasks.events import BATCH_SIZE, enqueue_events

        self._enqueue = enqueue_events
        self._batch_size = BATCH_SIZE
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def submit(self, event_ids: list[str]) -> None:
        with self._cond:
            self._pending.extend(event_ids)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                deadline = time.monotonic() + GATHER_SECONDS
                while len(self._pending) < self._batch_size and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                batch, self._pending = self._pending, []
            try:
                self._enqueue(batch)
                METRICS.enqueued.inc(len(batch))
            except Exception as error:  # broker down: the events are stored, the sweeper will enqueue
                METRICS.enqueue_failed.inc(len(batch))
                log.warning("could not enqueue %d stored events: %s", len(batch), type(error).__name__)


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


METRICS = Metrics()


def _reject(endpoint: str, reason: str, status: int = 400) -> JSONResponse:
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
    secrets_by_endpoint = {
        "platform": [s.get_secret_value() for s in settings.stripe_webhook_secrets],
        "connect": [s.get_secret_value() for s in settings.stripe_connect_webhook_secrets],
    }
    state: dict = {}

    async def receive(request: Request, endpoint: str) -> Response:
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
        state["publisher"].submit([event.id])
        return JSONResponse({"status": "stored", "id": event.id})

    async def platform(request: Request) -> Response:
        return await receive(request, "platform")

    async def connect(request: Request) -> Response:
        return await receive(request, "connect")

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
        writer = InboxWriter(settings.libpq_database_url)
        state["writer"] = writer
        state["publisher"] = Publisher()
        writer.task = asyncio.create_task(writer.run())
        # Everything loaded so far (Celery, the Stripe SDK, ...) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it on the request
        # path (it took 35-70 ms every half second under load at c64, the whole p99).
        gc.freeze()
        try:
            yield
        finally:
            writer.task.cancel()
            await writer._drop_connection()

    return Starlette(
        routes=[
            Route("/webhooks/stripe", platform, methods=["POST"]),
            Route("/webhooks/stripe/connect", connect, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def _readiness(settings: Settings) -> dict[str, bool]:
    checks = {}
    try:
        with psycopg.connect(settings.libpq_database_url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        checks["database"] = True
    except Exception:
        checks["database"] = False
    try:
        from worker import app

        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = True
    except Exception:
        checks["broker"] = False
    return checks


def _refresh_backlog(settings: Settings) -> None:
    from worker.schedule import JOBS

    try:
        with psycopg.connect(settings.libpq_database_url, connect_timeout=3) as conn:
            rows = conn.execute(
                # Only the small, non-final statuses: counting processed rows would scan the table.
                "SELECT status, count(*) FROM marketplace_worker.stripe_events"
                " WHERE status IN ('received', 'retrying', 'parked') GROUP BY status"
            ).fetchall()
            # Newest ok run per job, read backwards on (job, started_at): a few rows per job.
            last_ok = conn.execute(
                "SELECT job, (SELECT extract(epoch FROM finished_at) FROM marketplace_worker.job_runs r"
                "             WHERE r.job = j.job AND outcome = 'ok' ORDER BY started_at DESC LIMIT 1)"
                " FROM unnest(%s::text[]) AS j(job)",
                ([job.name for job in JOBS],),
            ).fetchall()
    except Exception:
        return
    counts = dict(rows)
    for status in ("received", "retrying", "parked"):
        METRICS.backlog.labels(status).set(counts.get(status, 0))
    for job, finished in last_ok:
        if finished is not None:
            METRICS.job_last_ok.labels(job).set(float(finished))


def serve(host: str, port: int) -> None:
    import uvicorn

    settings = get_settings()
    if not settings.stripe_webhook_secrets:
        from config import ConfigError

        raise ConfigError("configuration error: STRIPE_WEBHOOK_SECRETS is not set")
    # log_config=None: uvicorn's records go through the process's handler (worker/logging_setup.py).
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False, log_config=None)
