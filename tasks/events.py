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
    settings = get_settings()
    attempt = dispatch.attempt_event(
        session_scope, event_id,
        max_attempts=settings.event_max_attempts, retry_base_seconds=settings.event_retry_base_seconds,
    )
    if attempt.outcome == "retrying":
        log.warning("event failed, retrying in %.1f s", attempt.retry_in,
                    extra={"event_id": event_id, "error": dispatch.describe(attempt.error)})
        raise self.retry(countdown=attempt.retry_in, exc=attempt.error)
    if attempt.outcome == "parked":
        log.error("event parked", extra={"event_id": event_id, "error": dispatch.describe(attempt.error)})
    else:
        log.info("event %s", attempt.outcome, extra={"event_id": event_id})
    return attempt.outcome


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
