"""Thin tasks around the inbox: process one event, sweep lost ones, catch up from Stripe."""

from __future__ import annotations

import logging

from config import get_settings
from domain import dispatch
from domain.jobs import run_once
from models.db import session_scope
from worker import app

log = logging.getLogger(__name__)

PROCESS_EVENT = "tasks.events.process_event"


@app.task(name=PROCESS_EVENT, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def process_event(self, event_id: str) -> str:
    try:
        with session_scope() as session:
            outcome = dispatch.process_event(session, event_id)
    except Exception as error:  # every failure is counted; the last one parks the event
        permanent = dispatch.is_permanent(error)
        settings = get_settings()
        with session_scope() as session:
            failure = dispatch.record_failure(
                session, event_id, error,
                max_attempts=settings.event_max_attempts, park_now=permanent,
                retry_base_seconds=settings.event_retry_base_seconds,
            )
        if failure.parked:
            log.error("event parked", extra={"event_id": event_id, "error": dispatch.describe(error)})
            return "parked"
        if failure.attempts == 0:
            return "already handled"
        log.warning(
            "event failed, retrying",
            extra={"event_id": event_id, "attempt": failure.attempts, "error": dispatch.describe(error)},
        )
        raise self.retry(countdown=failure.retry_in, exc=error) from None
    log.info("event %s", outcome, extra={"event_id": event_id})
    return outcome


def enqueue_events(event_ids: list[str]) -> None:
    """Publish one task message per event id (the message carries only the id)."""
    with app.producer_or_acquire() as producer:
        for event_id in event_ids:
            process_event.apply_async((event_id,), producer=producer, retry=False)


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


@app.task(name="tasks.events.catch_up_events")
def catch_up_events() -> int:
    from domain.catchup import catch_up
    from domain.stripe_api import get_client

    result = catch_up(session_scope, get_client())
    enqueue_events(result.stored)
    return len(result.stored)
