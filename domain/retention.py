"""Retention: old inbox events and job-run history are deleted in small batches.

Only `processed` and `ignored` events go; `parked` events wait for an operator however old
they are, and `received` / `retrying` ones are still work. Each batch is its own short
transaction (rows picked by key, SKIP LOCKED so a row someone holds is left for the next
night rather than waited on), so no row stays locked for long and autovacuum reclaims the
space as the purge goes instead of after one huge delete (benchmarks/retention_bench.py).

A purge may be given a time budget: it stops after the batch that spends it and says it is not
finished, and the caller runs it again for the rest. Every run picks the rows past retention
afresh, so a run that never comes (its message lost, its worker killed) loses nothing: the next
one deletes what it would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import TextClause, text

from models.db import SessionFactory

_DELETE_EVENTS = text("""
DELETE FROM marketplace_worker.stripe_events
WHERE id IN (
    SELECT id FROM marketplace_worker.stripe_events
    WHERE status IN ('processed', 'ignored') AND received_at < :cutoff
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
""")

_DELETE_JOB_RUNS = text("""
DELETE FROM marketplace_worker.job_runs
WHERE id IN (
    SELECT id FROM marketplace_worker.job_runs
    WHERE started_at < :cutoff AND outcome <> 'running'
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
""")


@dataclass(frozen=True)
class Purged:
    events: int
    job_runs: int
    transactions: int
    # False when the budget ran out before every row past retention was deleted.
    finished: bool = True

    def counts(self) -> dict[str, int | bool]:
        counts = {"events_deleted": self.events, "job_runs_deleted": self.job_runs, "transactions": self.transactions}
        return counts if self.finished else {**counts, "finished": False}


def _in_batches(sessions: SessionFactory, statement: TextClause, cutoff: datetime, batch: int,
                deadline: float | None) -> tuple[int, int, bool]:
    """(rows deleted, transactions, finished): batches until one deletes less than `batch`
    rows, or until the monotonic clock passes `deadline`."""
    deleted = transactions = 0
    while True:
        with sessions() as session:
            count = session.execute(statement, {"cutoff": cutoff, "batch": batch}).rowcount
        transactions += 1
        deleted += count
        if count < batch:
            return deleted, transactions, True
        if deadline is not None and time.monotonic() >= deadline:
            return deleted, transactions, False


def purge(sessions: SessionFactory, *, events_before: datetime, job_runs_before: datetime, batch: int,
          budget: timedelta | None = None) -> Purged:
    """Delete what is past retention, events first; `sessions()` opens one committed
    transaction. With a `budget`, stop after the batch that spends it (at least one batch
    runs): the result says whether anything is left."""
    deadline = None if budget is None else time.monotonic() + budget.total_seconds()
    events, event_transactions, finished = _in_batches(sessions, _DELETE_EVENTS, events_before, batch, deadline)
    if not finished:
        return Purged(events, 0, event_transactions, finished=False)
    job_runs, job_run_transactions, finished = _in_batches(
        sessions, _DELETE_JOB_RUNS, job_runs_before, batch, deadline)
    return Purged(events, job_runs, event_transactions + job_run_transactions, finished)
