"""Thin tasks around the inbox: process stored events, sweep lost ones, catch up from Stripe;
and the publishing of their messages (by the receiver, the sweeper, the CLI)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from celery import shared_task

from config import get_settings
from domain import dispatch, inbox
from domain.catchup import CatchUpResult, catch_up
from domain.errors import describe
from domain.stripe_api import get_client
from models.db import session_scope
from tasks import metrics
from tasks.base import job, worker_app

log = logging.getLogger(__name__)

AttemptOutcome = dispatch.AttemptOutcome

# Events per task message: a receiver commit or a sweep hands over up to this many ids at
# once, so each event does not pay for its own message round trip and task overhead.
BATCH_SIZE = 50


def _attempt(event_id: str) -> dispatch.Attempt:
    settings = get_settings()
    attempt = dispatch.attempt_event(
        session_scope, event_id,
        max_attempts=settings.event_max_attempts, retry_base_seconds=settings.event_retry_base_seconds,
    )
    metrics.record_attempts({event_id: attempt}, time.time())
    _log(event_id, attempt)
    return attempt


def _log(event_id: str, attempt: dispatch.Attempt) -> None:
    if attempt.outcome == AttemptOutcome.RETRYING:
        log.warning("event failed, retrying in %.1f s", attempt.retry_in,
                    extra={"event_id": event_id, "error": describe(attempt.error)})
    elif attempt.outcome == AttemptOutcome.PARKED:
        log.error("event parked", extra={"event_id": event_id, "error": describe(attempt.error)})
    else:
        log.info("event %s", attempt.outcome, extra={"event_id": event_id})


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def process_event(self, event_id: str) -> str:
    attempt = _attempt(event_id)
    if attempt.outcome == AttemptOutcome.RETRYING:
        raise self.retry(countdown=attempt.retry_in, exc=attempt.error)
    return attempt.outcome


@shared_task(acks_late=True, reject_on_worker_lost=True)
def process_events(event_ids: list[str]) -> dict[str, int]:
    """Several stored events in one transaction (`dispatch.attempt_batch`); one that fails
    goes on alone as `process_event` with its backoff. A redelivered batch finds its done
    events processed."""
    settings = get_settings()
    attempts = dispatch.attempt_batch(
        session_scope, event_ids,
        max_attempts=settings.event_max_attempts, retry_base_seconds=settings.event_retry_base_seconds,
    )
    metrics.record_attempts(attempts, time.time())
    outcomes: Counter[str] = Counter()
    for event_id, attempt in attempts.items():
        _log(event_id, attempt)
        if attempt.outcome == AttemptOutcome.RETRYING:
            process_event.apply_async((event_id,), countdown=attempt.retry_in)
        outcomes[attempt.outcome] += 1
    return dict(outcomes)


def enqueue_events(event_ids: list[str]) -> None:
    """Publish the ids in messages of up to BATCH_SIZE (the messages carry only ids)."""
    with worker_app().producer_or_acquire() as producer:
        for start in range(0, len(event_ids), BATCH_SIZE):
            process_events.apply_async((event_ids[start:start + BATCH_SIZE],), producer=producer, retry=False)


def enqueue_stored(result: CatchUpResult) -> CatchUpResult:
    """Enqueue the events a catch-up stored; returns its result."""
    enqueue_events(result.stored)
    return result


@job
def sweep_inbox() -> dict[str, int]:
    with session_scope() as session:
        lost = inbox.due_for_sweep(session, get_settings().sweeper_threshold_seconds)
    if lost:
        log.warning("re-enqueueing %d events whose messages were lost", len(lost))
        enqueue_events(lost)
    return {"enqueued": len(lost)}


# Lists the platform's events and the flagged accounts' (all of them after a Connect
# endpoint gap: minutes at thousands of accounts, within these limits; leftovers stay flagged).
@job(soft_time_limit=900, time_limit=960)
def catch_up_events() -> CatchUpResult:
    return enqueue_stored(catch_up(session_scope, get_client()))


# How long the first stored id waits for others before its message goes out. A worker applies
# a message's events in one transaction, several times cheaper per event than one by one, and
# when requests come one at a time each commit holds a single id: gathering for this long turns
# 500 requests/s into messages of about 25 ids, for 50 ms more between commit and processing.
GATHER_SECONDS = 0.05


class Publisher:
    """Publishes the receiver's stored ids from one background thread, off the request path;
    ids stored moments apart share a message. `enqueue` publishes (enqueue_events); the
    callbacks count the ids published and those that could not be."""

    def __init__(self, enqueue: Callable[[list[str]], None] = enqueue_events, *,
                 on_published: Callable[[int], None] = lambda n: None,
                 on_failed: Callable[[int], None] = lambda n: None) -> None:
        self._enqueue = enqueue
        self._on_published = on_published
        self._on_failed = on_failed
        self._pending: list[tuple[float, str]] = []  # (when stored, event id), oldest first
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._thread.start()

    def submit(self, event_ids: list[str]) -> None:
        stored_at = time.monotonic()
        with self._cond:
            self._pending.extend((stored_at, event_id) for event_id in event_ids)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is pending at once, without gathering more, and stop (the receiver's
        shutdown: else ids stored in its last moments wait for the sweeper)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._take()
            try:
                self._enqueue(batch)
                self._on_published(len(batch))
            except Exception as error:  # broker down: the events are stored, the sweeper will enqueue
                self._on_failed(len(batch))
                log.warning("could not enqueue %d stored events: %s", len(batch), type(error).__name__)

    def _take(self) -> list[str]:
        """The ids of the next messages (called holding the lock, with ids pending). Full
        messages go at once; ids short of one wait for more until the oldest has waited
        GATHER_SECONDS. Under load a commit holds more ids than a message, and sending its
        remainder at once would halve the ids per message the worker gets."""
        deadline = self._pending[0][0] + GATHER_SECONDS
        while (len(self._pending) < BATCH_SIZE and not self._closing
               and (left := deadline - time.monotonic()) > 0):
            self._cond.wait(left)
        count = len(self._pending)
        if count >= BATCH_SIZE and not self._closing:
            count -= count % BATCH_SIZE
        taken, self._pending = self._pending[:count], self._pending[count:]
        return [event_id for _, event_id in taken]
