"""Housekeeping jobs (queue `polling`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from config import get_settings
from domain import retention
from domain.jobs import run_once
from models.db import session_scope
from worker import app

log = logging.getLogger(__name__)

# A run stops within a batch of RETENTION_RUN_SECONDS (at most 600, config/settings.py).
PURGE_SOFT_TIME_LIMIT_SECONDS = 900


# A first purge after months without one takes many runs, each sending the next: the backlog
# goes in short tasks. A run whose message is lost loses nothing (the purge picks the rows
# past retention afresh): beat's next run carries on.
@app.task(name="tasks.maintenance.purge_inbox", soft_time_limit=PURGE_SOFT_TIME_LIMIT_SECONDS,
          time_limit=PURGE_SOFT_TIME_LIMIT_SECONDS + 60)
def purge_inbox() -> dict:
    settings = get_settings()
    now = datetime.now(UTC)
    with run_once("purge_inbox") as run:
        purged = retention.purge(
            session_scope,
            events_before=now - timedelta(days=settings.inbox_retention_days),
            job_runs_before=now - timedelta(days=settings.job_runs_retention_days),
            batch=settings.retention_batch_size,
            budget=timedelta(seconds=settings.retention_run_seconds),
        )
        run.counts = purged.counts()
    log.info("purged %d inbox events and %d job runs", purged.events, purged.job_runs)
    if not purged.finished:
        # Sent once run_once has released the job's lock, which the next run takes. Not a
        # retry: a retry keeps the beat slot this run has claimed, and would be skipped.
        purge_inbox.apply_async()
    return run.counts
