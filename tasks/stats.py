"""Provider stats (queue `stats`): beat runs the incremental pass every minute and the full
pass nightly. Both are idempotent, and safe beside each other and beside webhooks
(domain/stats.py explains why).

The nightly `full_stats` fans out one `full_stats_range` task per STATS_FULL_RANGE_SIZE
providers, so no task runs long and every worker consuming the queue takes a share. Each range
is recorded in `marketplace_worker.fanout_items` before its message is published
(domain/fanout.py): a broker that loses the messages loses no range, the fan-out sweeper
re-enqueues them.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.exc import OperationalError

from config import get_settings
from domain import stats
from domain.jobs import run_once
from models.db import get_engine, session_scope
from tasks.fanout import PieceTask, fan_out
from worker import app

FULL_STATS_RANGE = "tasks.stats.full_stats_range"


@app.task(name="tasks.stats.incremental_stats")
def incremental_stats() -> dict:
    """Recompute the providers touched since the last pass."""
    overlap = timedelta(seconds=get_settings().stats_change_overlap_seconds)
    with run_once("incremental_stats") as run:
        with session_scope() as session:
            result = stats.incremental_pass(session, overlap=overlap)
        run.counts = result.counts()
    return run.counts


# A range takes seconds (benchmarks/stats_bench.py); ten minutes leave room for tables a
# hundred times the benchmark's. A database that restarts under it is retried.
@app.task(name=FULL_STATS_RANGE, base=PieceTask, autoretry_for=(OperationalError,), retry_backoff=30,
          max_retries=3, soft_time_limit=600, time_limit=660)
def full_stats_range(first: int, last: int) -> dict:
    """Recompute the providers with ids from `first` to `last`: one piece of the full pass."""
    with get_engine().connect() as connection:
        result = stats.full_pass_range(connection, first=first, last=last,
                                       batch_size=get_settings().stats_full_batch_size)
    return result.counts()


@app.task(name="tasks.stats.full_stats")
def full_stats() -> dict:
    """Recompute every provider: one full_stats_range piece per range of providers."""
    with run_once("full_stats") as run:
        with session_scope() as session:
            ranges = stats.provider_ranges(session, get_settings().stats_full_range_size)
        enqueued = fan_out(FULL_STATS_RANGE, ((f"{first}..{last}", [first, last]) for first, last in ranges))
        run.counts = {"ranges": len(ranges), "enqueued": enqueued}
    return run.counts
