"""Routing a stored event to its handler, with the inbox bookkeeping around it.

A handler is a plain function `handler(session, event)` registered for one or
more event types. It runs in the same database transaction as the inbox status
update, so an event is either fully applied and marked processed, or not at all.

The lock order every money writer follows, the inbox row first, is in domain/payments.py.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from domain.errors import describe, is_permanent
from domain.handlers import HANDLERS
from domain.handlers.registry import forget_rows
from models import EventStatus, StripeEvent

log = logging.getLogger(__name__)


class AttemptOutcome(StrEnum):
    """What an attempt at a stored event did (a task's result, its log line, the tests)."""

    PROCESSED = "processed"
    IGNORED = "ignored"  # no handler, or a platform-only type from a connected account
    ALREADY_PROCESSED = "already processed"  # settled before this attempt: a duplicate message
    ALREADY_IGNORED = "already ignored"
    ALREADY_PARKED = "already parked"
    ALREADY_HANDLED = "already handled"  # failed here, but another worker settled it meanwhile
    UNKNOWN = "unknown"  # no such event in the inbox
    RETRYING = "retrying"  # failed; another attempt is scheduled
    PARKED = "parked"  # failed for the last time, or for good
    DEFERRED = "deferred"  # left by a batch for an attempt of its own

    @classmethod
    def already(cls, status: str) -> AttemptOutcome:
        return cls(f"already {status}")

# The event's effects and its `processed` mark commit together, so a commit lost in a server
# crash loses both: the event is still `received` and the sweeper re-enqueues it. Waiting for
# the WAL flush would buy nothing here (the receiver's commit stays synchronous).
# And how long an event of a batch waits for a row another transaction holds before it is
# left for later (applied alone once the batch has committed). Messages are processed side
# by side and events about one invoice often sit in neighbouring messages: waiting for each
# other's whole batch would serialize the workers, and two batches could wait for each other.
# Both in one statement: `lock_timeout` is the connection's own unless several events share it.
_TRANSACTION_SETTINGS = text(
    "SELECT set_config('synchronous_commit', 'off', true),"
    " set_config('lock_timeout', CASE WHEN :batch THEN '100ms' ELSE current_setting('lock_timeout') END, true)"
)


def process_event(session: Session, event_id: str) -> AttemptOutcome:
    """Apply one stored event; returns what happened (for logs and tests)."""
    return process_batch(session, [event_id])[event_id]


def process_batch(session: Session, event_ids: list[str]) -> dict[str, AttemptOutcome]:
    """Apply stored events in one transaction; returns what happened to each.

    With several events, each handler call runs in a savepoint: an event that fails, or whose
    rows another transaction holds, is rolled back alone and comes out DEFERRED, for the
    caller to apply in a transaction of its own after this one commits (`attempt_batch`).
    A failure outside the handlers propagates; the caller's transaction must roll back. The
    inbox rows are all locked first, in id order, before any invoice: the lock order (domain/payments.py).
    """
    return _apply_batch(session, event_ids)[0]


def _apply_batch(session: Session, event_ids: list[str]) -> tuple[dict[str, AttemptOutcome], dict[str, EventFacts]]:
    several = len(set(event_ids)) > 1
    session.execute(_TRANSACTION_SETTINGS, {"batch": several})
    locked = {
        event.id: event
        for event in session.execute(
            select(StripeEvent).where(StripeEvent.id.in_(event_ids)).order_by(StripeEvent.id).with_for_update()
        ).scalars()
    }
    facts = {event.id: EventFacts(event.type, event.endpoint, event.received_at) for event in locked.values()}
    outcomes: dict[str, AttemptOutcome] = {}
    batches: dict[Callable, list[StripeEvent]] = {}
    last: dict[Callable, bool] = {}
    singles: list[tuple[Callable, StripeEvent]] = []
    now = datetime.now(UTC)
    for event_id in dict.fromkeys(event_ids):
        event = locked.get(event_id)
        if event is None:
            outcomes[event_id] = AttemptOutcome.UNKNOWN
        elif event.status in EventStatus.settled():
            outcomes[event_id] = AttemptOutcome.already(event.status)
        elif (reason := _ignored_reason(event)) is not None:
            event.status = EventStatus.IGNORED
            event.last_error = reason
            event.processed_at = now
            outcomes[event_id] = AttemptOutcome.IGNORED
        elif (registered := HANDLERS[event.type]).batch:
            batches.setdefault(registered.fn, []).append(event)
            last[registered.fn] = registered.last
        else:
            singles.append((registered.fn, event))
    runs = ([(fn, events, True) for fn, events in batches.items() if not last[fn]]
            + [(fn, events, True) for fn, events in batches.items() if last[fn]]
            + [(fn, [event], False) for fn, event in singles])
    applied: list[StripeEvent] = []
    for fn, events, takes_batch in runs:
        if not several:  # alone: wait for held rows, and let a failure fail the transaction
            _call(session, fn, events, takes_batch, skip_busy=False)
            applied += events
            continue
        try:
            with session.begin_nested():
                left = _call(session, fn, events, takes_batch, skip_busy=True)
        except Exception as error:  # applied alone after the commit, with its own bookkeeping
            log.debug("events %s left for later: %s", [e.id for e in events], describe(error))
            left = events
        outcomes |= dict.fromkeys((event.id for event in left), AttemptOutcome.DEFERRED)
        applied += [event for event in events if event.id not in outcomes]
        forget_rows(session)
    outcomes |= dict.fromkeys((event.id for event in applied), AttemptOutcome.PROCESSED)
    _mark_processed(session, applied, now)
    return outcomes, facts


def _mark_processed(session: Session, events: list[StripeEvent], now: datetime) -> None:
    """Mark a batch's applied events in one statement, not one UPDATE per event. Their
    `received_at` in an IN list of values let Postgres look in those months' partitions only
    (an array parameter would not: a cached plan would probe every partition)."""
    if not events:
        return
    # A plain UPDATE, without the ORM's bookkeeping: the session's copies of the rows are not
    # read again (the batch's caller gets its outcomes; a later `session.get` reads the row).
    inbox = StripeEvent.__table__
    session.execute(
        update(inbox)
        .where(inbox.c.id.in_([event.id for event in events]),
               inbox.c.received_at.in_(sorted({event.received_at for event in events})))
        .values(status=EventStatus.PROCESSED, attempts=inbox.c.attempts + 1, last_error=None,
                next_attempt_at=None, processed_at=now)
    )


def _ignored_reason(event: StripeEvent) -> str | None:
    registered = HANDLERS.get(event.type)
    if registered is None:
        return "no handler for this event type"
    if registered.platform_only and event.account:
        return f"connected account {event.account}: its {event.type} changes no platform record"
    if registered.connect_only and not event.account:
        return f"the platform's own {event.type}: only connected accounts' are reconciled"
    return None


def _call(session: Session, fn: Callable, events: list[StripeEvent], takes_batch: bool, *,
          skip_busy: bool) -> list[StripeEvent]:
    """Run one handler call; returns the events it left for later."""
    if takes_batch:
        return fn(session, events, skip_busy=skip_busy)
    fn(session, events[0])
    return []


@dataclass(frozen=True)
class EventFacts:
    """What is known of an attempt's event without reading it again (for metrics and logs)."""

    type: str
    endpoint: str
    received_at: datetime


@dataclass(frozen=True)
class Failure:
    attempts: int
    parked: bool
    retry_in: float
    event: EventFacts | None = None


@dataclass(frozen=True)
class Attempt:
    outcome: AttemptOutcome
    retry_in: float = 0.0
    error: BaseException | None = None
    event: EventFacts | None = None  # None when the event was not found or not read


def attempt_event(
    session_factory: Callable[[], AbstractContextManager[Session]],
    event_id: str,
    *,
    max_attempts: int,
    retry_base_seconds: float = 2.0,
) -> Attempt:
    """One attempt at an event: applied in one transaction, or its failure counted in another.

    The Celery task schedules the retry this returns; tests call it directly.
    """
    try:
        with session_factory() as session:
            outcomes, facts = _apply_batch(session, [event_id])
        return Attempt(outcomes[event_id], event=facts.get(event_id))
    except Exception as error:  # every failure is counted; the last one parks the event
        with session_factory() as session:
            failure = record_failure(
                session, event_id, error, max_attempts=max_attempts,
                park_now=is_permanent(error), retry_base_seconds=retry_base_seconds,
            )
        if failure.parked:
            return Attempt(AttemptOutcome.PARKED, error=error, event=failure.event)
        if failure.attempts == 0:
            return Attempt(AttemptOutcome.ALREADY_HANDLED)
        return Attempt(AttemptOutcome.RETRYING, retry_in=failure.retry_in, error=error, event=failure.event)


def attempt_batch(
    session_factory: Callable[[], AbstractContextManager[Session]],
    event_ids: list[str],
    *,
    max_attempts: int,
    retry_base_seconds: float = 2.0,
) -> dict[str, Attempt]:
    """Several events in one transaction; those it left (failed, or waited too long for a
    row) each in its own `attempt_event` afterwards, and all of them so if the batch itself
    failed. One bad or busy event costs its neighbours nothing."""
    try:
        with session_factory() as session:
            outcomes, facts = _apply_batch(session, event_ids)
    except Exception as error:
        log.info("batch of %d events goes one event at a time: %s", len(event_ids), describe(error))
        outcomes, facts = dict.fromkeys(event_ids, AttemptOutcome.DEFERRED), {}
    return {
        event_id: attempt_event(session_factory, event_id, max_attempts=max_attempts,
                                retry_base_seconds=retry_base_seconds)
        if outcome == AttemptOutcome.DEFERRED else Attempt(outcome, event=facts.get(event_id))
        for event_id, outcome in outcomes.items()
    }


def backoff_seconds(attempts: int, base: float = 2.0, cap: float = 600.0) -> float:
    """Exponential backoff with full jitter: many workers retrying at once spread out."""
    return random.uniform(base / 2, min(cap, base * 2 ** (attempts - 1)))


def record_failure(
    session: Session,
    event_id: str,
    error: BaseException,
    *,
    max_attempts: int,
    park_now: bool = False,
    retry_base_seconds: float = 2.0,
) -> Failure:
    """Count a failed attempt in its own transaction; park the event after the last one."""
    message = describe(error)
    counted = session.execute(
        update(StripeEvent)
        .where(StripeEvent.id == event_id, StripeEvent.status.in_(EventStatus.pending()))
        .values(attempts=StripeEvent.attempts + 1, last_error=message)
        .returning(StripeEvent.attempts, StripeEvent.type, StripeEvent.endpoint, StripeEvent.received_at)
    ).one_or_none()
    if counted is None:  # processed meanwhile by another worker, or already parked
        return Failure(attempts=0, parked=False, retry_in=0)
    attempts = counted.attempts
    parked = park_now or attempts >= max_attempts
    delay = 0.0 if parked else backoff_seconds(attempts, base=retry_base_seconds)
    session.execute(
        update(StripeEvent)
        .where(StripeEvent.id == event_id)
        .values(
            status=EventStatus.PARKED if parked else EventStatus.RETRYING,
            next_attempt_at=None if parked else datetime.now(UTC) + timedelta(seconds=delay),
        )
    )
    return Failure(attempts=attempts, parked=parked, retry_in=delay,
                   event=EventFacts(counted.type, counted.endpoint, counted.received_at))
