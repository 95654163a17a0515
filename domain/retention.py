"""Retention: old inbox events and job-run history are deleted in small batches.

Only `processed` and `ignored` events go; `parked` events wait for an operator however old
they are, and `received` / `retrying` ones are still work. Each batch is its own short
transaction (rows picked by key, SKIP LOCKED so a row someone holds is left for the next
night rather than waited on), so no row stays locked for long and autovacuum reclaims the
space as the purge goes instead of after one huge delete (benchmarks/retention_bench.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

SessionFactory = Callable[[], AbstractContextManager[Session]]

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

    def counts(self) -> dict[str, int]:
        return {"events_deleted": self.events, "job_runs_deleted": self.job_runs, "transactions": self.transactions}


def _in_batches(sessions: SessionFactory, statement: TextClause, cutoff: datetime, batch: int) -> tuple[int, int]:
    deleted = transactions = 0
    while True:
        with sessions() as session:
            count = session.execute(statement, {"cutoff": cutoff, "batch": batch}).rowcount
        transactions += 1
        deleted += count
        if count < batch:
            return deleted, transactions


def purge(sessions: SessionFactory, *, events_before: datetime, job_runs_before: datetime, batch: int) -> Purged:
    """Delete what is past retention; `sessions()` opens one committed transaction."""
    events, event_transactions = _in_batches(sessions, _DELETE_EVENTS, events_before, batch)
    job_runs, job_run_transactions = _in_batches(sessions, _DELETE_JOB_RUNS, job_runs_before, batch)
    return Purged(events, job_runs, event_transactions + job_run_transactions)
