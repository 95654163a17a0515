"""Provider stats (queue `stats`): beat runs the incremental pass every minute and the full
pass nightly. Both are idempotent, and safe beside each other and beside webhooks
(domain/stats.py explains why)."""

from __future__ import annotations

from datetime import timedelta

from config import get_settings
from domain import stats
from domain.jobs import run_once
from models.db import get_engine, session_scope
from worker import app
from worker.celery_app import LONGEST_TASK_SECONDS


@app.task(name="tasks.stats.incremental_stats")
def incremental_stats() -> dict:
    """Recompute the providers touched since the last pass."""
    overlap = timedelta(seconds=get_settings().stats_change_overlap_seconds)
    with run_once("incremental_stats") as run:
        with session_scope() as session:
            result = stats.incremental_pass(session, overlap=overlap)
        run.counts = result.counts()
    return run.counts


@app.task(name="tasks.stats.full_stats", soft_time_limit=LONGEST_TASK_SECONDS - 300,
          time_limit=LONGEST_TASK_SECONDS)
def full_stats() -> dict:
    """Recompute every provider."""
    with run_once("full_stats") as run:
        with get_engine().connect() as connection:
            result = stats.full_pass(connection, batch_size=get_settings().stats_full_batch_size)
        run.counts = result.counts()
    return run.counts
