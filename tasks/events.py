"""Thin tasks around the inbox: process one event, sweep lost ones, catch up from Stripe."""

from __future__ import annotations

import logging
from collections import Counter

from config import get_settings
from domain import dispatch
from domain.errors import describe
from domain.jobs import run_once
from models.db import session_scope
from worker import app

log = logging.getLogger(__name__)

PROCESS_EVENT = "tasks.events.process_event"


# Events per task message: a receiver commit or a sweep hands over up to this many ids at
# once, so each event does not pay for its own message round trip and task overhead.
BATCH_SIZE = 50


def _attempt(event_id: str) -> dispatch.Attempt:
    settings = get_settings()
    attempt = dispatch.attempt_event(
        session_scope, event_id,
        max_attempts=settings.event_max_attempts, retry_base_seconds=settings.event_retry_base_seconds,
    )
    _log(event_id, attempt)
    return attempt


def _log(event_id: str, attempt: dispatch.Attempt) -> None:
    if attempt.outcome == "retrying":
        log.warning("event failed, retrying in %.1f s", attempt.retry_in,
                    extra={"event_id": event_id, "error": describe(attempt.error)})
    elif attempt.outcome == "parked":
        log.error("event parked", extra={"event_id": event_id, "error": describe(attempt.error)})
    else:
        log.info("event %s", attempt.outcome, extra={"event_id": event_id})


@app.task(name=PROCESS_EVENT, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def process_event(self, event_id: str) -> str:
    attempt = _attempt(event_id)
    if attempt.outcome == "retrying":
        raise self.retry(countdown=attempt.retry_in, exc=attempt.error)
    return attempt.outcome


@app.task(name="tasks.events.process_events", acks_late=True, reject_on_worker_lost=True)
def process_events(event_ids: list[str]) -> dict[str, int]:
    """Several stored events in one transaction (`dispatch.attempt_batch`); one that fails
    goes on alone as `process_event` with its backoff. A redelivered batch finds its done
    events processed."""
    settings = get_settings()
    attempts = dispatch.attempt_batch(
        session_scope, event_ids,
        max_attempts=settings.event_max_attempts, retry_base_seconds=settings.event_retry_base_seconds,
    )
    outcomes: Counter[str] = Counter()
    for event_id, attempt in attempts.items():
        _log(event_id, attempt)
        if attempt.outcome == "retrying":
            process_event.apply_async((event_id,), countdown=attempt.retry_in)
        outcomes[attempt.outcome] += 1
    return dict(outcomes)


def enqueue_events(event_ids: list[str]) -> None:
    """Publish the ids in messages of up to BATCH_SIZE (the messages carry only ids)."""
    with app.producer_or_acquire() as producer:
        for start in range(0, len(event_ids), BATCH_SIZE):
            process_events.apply_async((event_ids[start:start + BATCH_SIZE],), producer=producer, retry=False)


@app.task(name="tasks.events.sweep_inbox")
def sweep_inbox() -> int:
    with run_once("sweep_inbox") as run:
        with session_scope() as session:
            due = dispatch.due_for_sweep(session, get_settings().sweeper_threshold_seconds)
        if due:
            log.warning("re-enqueueing %d events whose messages were lost", len(due))
            enqueue_events(due)
        run.counts = {"enqueued": len(due)}
    return len(due)


# Lists the platform's events and the flagged accounts' (all of them after a Connect
# endpoint gap: minutes at thousands of accounts, within these limits; leftovers stay flagged).
@app.task(name="tasks.events.catch_up_events", soft_time_limit=900, time_limit=960)
def catch_up_events() -> int:
    from domain.catchup import catch_up
    from domain.stripe_api import get_client

    with run_once("catch_up_events") as run:
        result = catch_up(session_scope, get_client())
        enqueue_events(result.stored)
        run.counts = result.counts()
    return len(result.stored)
