"""Housekeeping jobs (queue `polling`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from config import get_settings
from domain import retention
from domain.jobs import run_once
from models.db import session_scope
from worker import app
from worker.celery_app import LONGEST_TASK_SECONDS

log = logging.getLogger(__name__)


# A first purge after months without one can take a while; later ones take seconds.
@app.task(name="tasks.maintenance.purge_inbox", soft_time_limit=LONGEST_TASK_SECONDS - 300,
          time_limit=LONGEST_TASK_SECONDS)
def purge_inbox() -> dict:
    settings = get_settings()
    now = datetime.now(UTC)
    with run_once("purge_inbox") as run:
        purged = retention.purge(
            session_scope,
            events_before=now - timedelta(days=settings.inbox_retention_days),
            job_runs_before=now - timedelta(days=settings.job_runs_retention_days),
            batch=settings.retention_batch_size,
        )
        run.counts = purged.counts()
    log.info("purged %d inbox events and %d job runs", purged.events, purged.job_runs)
    return run.counts
