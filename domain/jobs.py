"""Scheduled jobs run once: never two runs of one job at a time, one run per beat slot.

Use it around the domain call in the job's task (one line):

    @app.task(name="tasks.polling.poll_invoices")
    def poll_invoices() -> dict:
        with run_once("poll_invoices") as run:
            with session_scope() as session:
                run.counts = polling.poll(session)  # any JSON value, shown by `marketplace-worker jobs`
        return run.counts

and, the same way, around a manual run in a CLI command.

What `run_once(job)` guarantees:

- **One at a time.** It takes a Postgres advisory lock for the job on a connection of its
  own, held for the whole run (the body may commit as often as it likes) and released when
  that connection closes, even if the process is killed. When another run holds it (an
  overrunning previous run, the other beat's copy, a manual run), the attempt is recorded as
  `skipped`, logged, and `JobSkipped` is raised from the `with` line: the body never runs.
  Celery tasks need nothing more (the app's Task class, worker/celery_app.py, turns
  JobSkipped into a successful "skipped" result); in the CLI it reaches main(), which prints
  the reason and exits 1.
- **Once per slot.** Beat stamps each message with the slot it was fired for: the instant of
  the job's UTC grid (config/cadence.py, worker/schedule.py). The run claims (job, slot) in
  `job_runs`, where a unique index allows one running or successful run per slot, so when
  two beat processes both fire the 10:05 slot the later copy is skipped even after the first
  has finished. A failed run leaves its slot open: the other beat's copy or a Celery retry
  of the task (which keeps the slot header) may run it again. A run not fired by beat (CLI,
  a task sent by hand) has no slot: only the lock applies.
- **Recorded.** `job_runs` keeps job, slot, started, finished, outcome (`ok`; `failed` with
  the error, which is re-raised; `skipped` with the reason) and `run.counts`. A row left
  `running` by a run that died is marked failed by the next run of that job: the next run
  only gets the lock once the dead run's connection is gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import select
from sqlalchemy.orm import Session

from config import get_settings
from domain.errors import describe
from models import JobRun

log = logging.getLogger(__name__)

# First key of every job lock ("MW"), so job locks never meet the main app's advisory locks.
LOCK_NAMESPACE = 0x4D57

# The slot of the beat message being executed; set by the Celery Task class around each task.
SCHEDULED_SLOT: ContextVar[datetime | None] = ContextVar("scheduled_slot", default=None)

_FROM_BEAT = object()


class JobSkipped(Exception):
    def __init__(self, job: str, reason: str) -> None:
        super().__init__(f"{job} skipped: {reason}")
        self.job = job
        self.reason = reason


@dataclass
class Run:
    job: str
    slot: datetime | None
    id: int | None = None
    counts: Any = None


@contextmanager
def run_once(job: str, *, slot: Any = _FROM_BEAT) -> Iterator[Run]:
    """Run the body as `job`, or raise JobSkipped; see the module docstring.

    `slot` defaults to the slot beat stamped on the current task (None outside one).
    """
    run = Run(job, SCHEDULED_SLOT.get() if slot is _FROM_BEAT else slot)
    with psycopg.connect(get_settings().libpq_database_url, autocommit=True, connect_timeout=5) as conn:
        locked = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, job)
        ).fetchone()[0]
        if not locked:
            _skip(conn, run, _in_progress(conn, job), overrun=True)
        conn.execute(
            "UPDATE marketplace_worker.job_runs SET outcome = 'failed', finished_at = now(),"
            " error = 'the run ended without recording an outcome (process killed or connection lost)'"
            " WHERE job = %s AND outcome = 'running'",
            (job,),
        )
        run.id = _claim(conn, run)
        if run.id is None:
            _skip(conn, run, f"slot {run.slot.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC already ran", overrun=False)
        log.info("job %s started", job, extra={"job": job, "slot": _iso(run.slot)})
        try:
            yield run
        except BaseException as error:
            try:
                _finish(conn, run, "failed", describe(error))
            except Exception:  # the job's own error is the one to report
                log.exception("could not record the failure of job %s", job)
            log.error("job %s failed: %s", job, describe(error), extra={"job": job})
            raise
        _finish(conn, run, "ok", None)
        log.info("job %s done", job, extra={"job": job, "counts": run.counts})


def _claim(conn: psycopg.Connection, run: Run) -> int | None:
    row = conn.execute(
        "INSERT INTO marketplace_worker.job_runs (job, slot, outcome) VALUES (%s, %s, 'running')"
        " ON CONFLICT (job, slot) WHERE outcome IN ('running', 'ok') DO NOTHING RETURNING id",
        (run.job, run.slot),
    ).fetchone()
    return row[0] if row else None


def _in_progress(conn: psycopg.Connection, job: str) -> str:
    row = conn.execute(
        "SELECT started_at FROM marketplace_worker.job_runs WHERE job = %s AND outcome = 'running'"
        " ORDER BY started_at DESC LIMIT 1",
        (job,),
    ).fetchone()
    since = f" (started {row[0].astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)" if row else ""
    return f"another run is in progress{since}"


def _skip(conn: psycopg.Connection, run: Run, reason: str, *, overrun: bool) -> None:
    conn.execute(
        "INSERT INTO marketplace_worker.job_runs (job, slot, outcome, finished_at, reason)"
        " VALUES (%s, %s, 'skipped', now(), %s)",
        (run.job, run.slot, reason),
    )
    # A second beat's copy of a slot is routine; a run still going when the next one is due is not.
    log.log(
        logging.WARNING if overrun else logging.INFO,
        "job %s skipped: %s", run.job, reason,
        extra={"job": run.job, "slot": _iso(run.slot)},
    )
    raise JobSkipped(run.job, reason)


def _finish(conn: psycopg.Connection, run: Run, outcome: str, error: str | None) -> None:
    conn.execute(
        "UPDATE marketplace_worker.job_runs SET outcome = %s, finished_at = now(), counts = %s, error = %s"
        " WHERE id = %s",
        (outcome, None if run.counts is None else Jsonb(run.counts, dumps=_dumps), error, run.id),
    )


# Counts may hold dates or decimals: recorded as text rather than failing a run that worked.
_dumps = partial(json.dumps, default=str)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def recent_runs(session: Session, *, limit: int, job: str | None = None) -> list[JobRun]:
    query = select(JobRun).order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(limit)
    if job:
        query = query.where(JobRun.job == job)
    return list(session.execute(query).scalars())
