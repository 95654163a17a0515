"""Provider stats (queue `stats`): beat runs the incremental pass every minute and the full
pass nightly. Both are idempotent, and safe beside each other and beside webhooks
(domain/stats.py explains why).

The nightly `full_stats` aggregates every provider once and stages the values of those that
changed (any range's aggregate would read about the whole transactions table), then fans out
one `full_stats_range` task per STATS_FULL_RANGE_SIZE providers, each applying the staged
values of its range, so no task runs long and every worker consuming the queue takes a share.
Each range is recorded in `marketplace_worker.fanout_items` before its message is published
(domain/fanout.py): a broker that loses the messages loses no range, the fan-out sweeper
re-enqueues them.
"""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from sqlalchemy.exc import OperationalError

from config import get_settings
from domain import stats
from models.db import get_engine, session_scope
from tasks.base import job
from tasks.fanout import PieceTask, fan_out

FULL_STATS_RANGE = "tasks.stats.full_stats_range"


@job
def incremental_stats() -> stats.PassResult:
    """Recompute the providers touched since the last pass."""
    with session_scope() as session:
        return stats.incremental_pass(session, overlap=timedelta(seconds=get_settings().stats_change_overlap_seconds))


# A range writes at most its providers, in short batches: seconds (benchmarks/stats_bench.py);
# ten minutes leave room for far more. A database that restarts under it is retried.
@shared_task(name=FULL_STATS_RANGE, base=PieceTask, autoretry_for=(OperationalError,), retry_backoff=30,
             max_retries=3, soft_time_limit=600, time_limit=660)
def full_stats_range(first: int, last: int) -> dict:
    """Apply the staged stats of the providers with ids from `first` to `last`: one piece of
    the full pass."""
    with get_engine().connect() as connection:
        result = stats.full_pass_range(connection, first=first, last=last,
                                       batch_size=get_settings().stats_full_batch_size)
    return result.counts()


@job
def full_stats() -> dict:
    """Recompute every provider: stage the changed ones, then one full_stats_range piece per
    range of providers applies them."""
    with get_engine().connect() as connection:
        staged = stats.stage_full_pass(connection)
    with session_scope() as session:
        ranges = stats.provider_ranges(session, get_settings().stats_full_range_size)
    return {**staged.counts(), "ranges": len(ranges),
            "enqueued": fan_out(FULL_STATS_RANGE, ((f"{first}..{last}", [first, last]) for first, last in ranges))}
