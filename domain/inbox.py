"""The event inbox: what an accepted Stripe event is, how it is stored, and its bookkeeping.

The inbox, not the broker, is the source of truth: an event is committed here
before Stripe gets its 2xx, and a task message carries only the event id. The
receiver stores through `InboxWriter` (group commit); the sweeper claims the
events whose message was lost (`due_for_sweep`); an operator replays parked ones
(`mark_for_replay`); the receiver's metrics read the backlog (`backlog`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models import Endpoint, EventStatus, StripeEvent

log = logging.getLogger(__name__)

# One statement for a whole batch: the receiver groups concurrent requests into
# one commit, and a duplicate id (Stripe's retry) is a no-op by key. The arrays go in
# binary (%b): in text format psycopg quotes every payload by regular expression, which
# cost the receiver a fifth of its CPU.
#
# The inbox is partitioned by month (models/inbox.py), and a partitioned table's unique keys
# include the partition key: `id` alone cannot be unique there. The statement claims each id
# in `stripe_event_ids` first and stores only the events whose claim is new, so the key's
# unique index decides, as `ON CONFLICT (id)` did on one table: a redelivery, in this batch or
# in a transaction committed or still running (the second waits for the first), stores
# nothing. Why a key table rather than partitioning by Stripe's `created` (fixed per id, so
# (id, created) would be unique): retention is counted from receipt, and a catch-up or a
# backfill stores events created weeks before, which would land in months already dropped.
# One row per id costs a narrow insert per event; retention deletes those rows in batches
# (domain/retention.py). The first of an id's copies in a batch is the one stored.
INSERT_EVENTS_SQL = """
WITH batch AS (
    SELECT DISTINCT ON (id) *
    FROM unnest(
        %(id)b::text[], %(type)b::text[], %(account)b::text[], %(livemode)b::bool[],
        %(api_version)b::text[], %(created)b::bigint[], %(payload)b::text[], %(endpoint)b::text[],
        %(status)b::text[], %(note)b::text[]
    ) WITH ORDINALITY AS batch(id, type, account, livemode, api_version, created, payload, endpoint, status,
                               note, n)
    ORDER BY id, n
), claimed AS (
    INSERT INTO marketplace_worker.stripe_event_ids (id, received_at)
    SELECT id, now() FROM batch
    ON CONFLICT (id) DO NOTHING
    RETURNING id
)
INSERT INTO marketplace_worker.stripe_events
    (id, type, account, livemode, api_version, created, payload, endpoint, status, last_error, received_at)
SELECT id, type, account, livemode, api_version, created, payload::jsonb, endpoint, status, note, now()
FROM batch JOIN claimed USING (id)
RETURNING id
"""


class InvalidEvent(ValueError):
    """The body is JSON but not a Stripe event."""


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    id: str
    type: str
    account: str | None
    livemode: bool
    api_version: str | None
    created: int
    body: str  # the exact text Stripe signed, stored as the payload
    endpoint: Endpoint
    ignored_reason: str | None = None

    @property
    def status(self) -> EventStatus:
        return EventStatus.IGNORED if self.ignored_reason else EventStatus.RECEIVED


def parse_event(body: str, endpoint: Endpoint, *, livemode: bool) -> IncomingEvent:
    """Check that a verified body is a v1 snapshot event and pick out what the inbox keeps.

    Raises ValueError when the body is not JSON and InvalidEvent when it is not an event.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        # What orjson refuses and the standard parser may take (a lone surrogate, deep nesting):
        # judged as before, the same body answered the same way.
        data = json.loads(body, parse_constant=_no_constants)
    if "\\u0000" in body:
        # JSON allows NUL in strings, Postgres's jsonb does not: store U+FFFD instead. The body
        # is rewritten from the standard parser's reading, which keeps every integer exact
        # (orjson reads one past 64 bits as a float).
        data = _without_nul(json.loads(body, parse_constant=_no_constants))
        body = json.dumps(data)
    return event_from_dict(data, body, endpoint, livemode=livemode)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN/Infinity, Postgres's jsonb does not


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


def event_from_dict(data: Any, body: str, endpoint: Endpoint, *, livemode: bool) -> IncomingEvent:
    if not isinstance(data, dict) or data.get("object") != "event":
        raise InvalidEvent("not a Stripe event object")
    event_id, event_type, created = data.get("id"), data.get("type"), data.get("created")
    inner = data.get("data")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 255:
        raise InvalidEvent("event id missing or malformed")
    if not isinstance(event_type, str) or not event_type or len(event_type) > 255:
        raise InvalidEvent("event type missing")
    if isinstance(created, bool) or not isinstance(created, int) or not 0 < created < 2**40:
        raise InvalidEvent("event created missing or malformed")
    if not isinstance(inner, dict) or not isinstance(inner.get("object"), dict):
        raise InvalidEvent("event data.object missing")
    event_livemode = data.get("livemode")
    if not isinstance(event_livemode, bool):
        raise InvalidEvent("event livemode missing")
    account = data.get("account")
    if account is not None and not isinstance(account, str):
        raise InvalidEvent("event account malformed")
    api_version = data.get("api_version")
    return IncomingEvent(
        id=event_id,
        type=event_type,
        account=account,
        livemode=event_livemode,
        api_version=api_version if isinstance(api_version, str) else None,
        created=created,
        body=body,
        endpoint=endpoint,
        # An authentic event of the other mode (a Connect endpoint receives connected
        # accounts' test events too) is kept for the record and never applied.
        ignored_reason=None if event_livemode == livemode else "livemode mismatch",
    )


def insert_params(events: list[IncomingEvent]) -> dict[str, list]:
    return {
        "id": [e.id for e in events],
        "type": [e.type for e in events],
        "account": [e.account for e in events],
        "livemode": [e.livemode for e in events],
        "api_version": [e.api_version for e in events],
        "created": [e.created for e in events],
        "payload": [e.body for e in events],
        "endpoint": [e.endpoint for e in events],
        "status": [e.status for e in events],
        "note": [e.ignored_reason for e in events],
    }


# --- storing: the receiver's group commit --------------------------------------------------------

MAX_BATCH = 500


class StorageUnavailable(Exception):
    pass


class UnstorablePayload(Exception):
    """Authentic JSON that Postgres's jsonb refuses (e.g. a lone UTF-16 surrogate)."""


class InboxWriter:
    """One connection, one INSERT and one commit per batch of concurrent requests: a request
    waits for the commit that holds its row, so no 2xx goes out before the row is durable."""

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

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self._drop_connection()

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


# --- bookkeeping -----------------------------------------------------------------------------

def due_for_sweep(session: Session, threshold_seconds: int, limit: int = 1000) -> list[str]:
    """Events whose task message was lost (broker restart, receiver could not enqueue, a
    retry's countdown message gone with Redis): claim them for re-enqueueing.

    Claiming pushes `next_attempt_at` forward, so a backlog is not re-enqueued every minute.
    """
    lost = (
        select(StripeEvent.id)
        .where(
            StripeEvent.status.in_(EventStatus.pending()),
            func.coalesce(StripeEvent.next_attempt_at, StripeEvent.received_at)
            < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, threshold_seconds),
        )
        .order_by(StripeEvent.received_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = (
        update(StripeEvent)
        .where(StripeEvent.id.in_(lost.scalar_subquery()))
        .values(next_attempt_at=func.now())
        .returning(StripeEvent.id)
    )
    return list(session.execute(claimed).scalars())


def mark_for_replay(session: Session, event_id: str | None = None) -> list[str]:
    """Put a parked event (or every parked one) back to `received`.

    Replaying a processed event changes nothing: it is left as it is and the task
    that runs for it finds it processed.
    """
    query = update(StripeEvent).values(status=EventStatus.RECEIVED, attempts=0, next_attempt_at=None)
    if event_id is None:
        query = query.where(StripeEvent.status == EventStatus.PARKED)
    else:
        query = query.where(StripeEvent.id == event_id, StripeEvent.status == EventStatus.PARKED)
    replayed = list(session.execute(query.returning(StripeEvent.id)).scalars())
    if event_id is not None and not replayed:
        exists = session.get(StripeEvent, event_id)
        if exists is None:
            raise LookupError(f"no event {event_id} in the inbox")
        replayed = [event_id]
    return replayed


def recent_events(session: Session, *, limit: int, status: EventStatus | None = None,
                  type: str | None = None) -> list[StripeEvent]:
    """The newest events first (`marketplace-worker events`)."""
    query = select(StripeEvent).order_by(StripeEvent.received_at.desc()).limit(limit)
    if status:
        query = query.where(StripeEvent.status == status)
    if type:
        query = query.where(StripeEvent.type == type)
    return list(session.execute(query).scalars())


# The statuses the backlog gauge reports: the small ones (counting processed rows would scan
# the table).
BACKLOG_STATUSES = (*EventStatus.pending(), EventStatus.PARKED)


def backlog(conn: psycopg.Connection) -> dict[EventStatus, int]:
    """Events waiting to be applied, and parked ones, by status (0 for none)."""
    rows = conn.execute(
        "SELECT status, count(*) FROM marketplace_worker.stripe_events WHERE status = ANY(%s) GROUP BY status",
        (list(BACKLOG_STATUSES),),
    ).fetchall()
    counts = dict(rows)
    return {status: counts.get(status, 0) for status in BACKLOG_STATUSES}


# The oldest event still to be applied, per pending status: each a walk of one end of the
# (status, received_at) index, however long the backlog.
_OLDEST_WAITING = f"""
    SELECT extract(epoch FROM now() - least({", ".join(
        f"(SELECT min(received_at) FROM marketplace_worker.stripe_events WHERE status = '{status}')"
        for status in EventStatus.pending())}))
"""


def backlog_age_seconds(conn: psycopg.Connection) -> float:
    """How long the oldest event still to be applied (received or retrying) has waited since
    it arrived; 0 with none waiting. The receiver exports it beside the backlog's counts."""
    age = conn.execute(_OLDEST_WAITING).fetchone()[0]
    return 0.0 if age is None else max(0.0, float(age))


def database_answers(conninfo: str) -> bool:
    """The receiver's readiness: the inbox's database takes a connection and a query."""
    try:
        with psycopg.connect(conninfo, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except Exception:
        return False
