"""Housekeeping jobs (queue `polling`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from config import get_settings
from domain import retention
from models.db import session_scope
from tasks.base import job

log = logging.getLogger(__name__)

# A run stops within a batch of RETENTION_RUN_SECONDS (at most 600, config/settings.py).
PURGE_SOFT_TIME_LIMIT_SECONDS = 900


def _carry_on(purged: retention.Purged) -> None:
    log.info("purged %d inbox events and %d job runs", purged.events, purged.job_runs)
    if not purged.finished:
        # Sent once the run has let go of the job, which the next run takes. Not a retry: a
        # retry keeps the beat slot this run has claimed, and would be skipped.
        purge_inbox.apply_async()


# A first purge after months without one takes many runs, each sending the next: the backlog
# goes in short tasks. A run whose message is lost loses nothing (the purge picks the rows
# past retention afresh): beat's next run carries on.
@job(soft_time_limit=PURGE_SOFT_TIME_LIMIT_SECONDS, time_limit=PURGE_SOFT_TIME_LIMIT_SECONDS + 60, then=_carry_on)
def purge_inbox() -> retention.Purged:
    settings = get_settings()
    now = datetime.now(UTC)
    return retention.purge(
        session_scope,
        events_before=now - timedelta(days=settings.inbox_retention_days),
        job_runs_before=now - timedelta(days=settings.job_runs_retention_days),
        batch=settings.retention_batch_size,
        budget=timedelta(seconds=settings.retention_run_seconds),
    )


# The inbox's partitions of this month and the next two, made ahead of the inserts that need
# them; an event of a month without one lands in DEFAULT and moves when its month's is made.
@job
def prepare_inbox_partitions() -> retention.Prepared:
    return retention.prepare_partitions(session_scope, datetime.now(UTC))
