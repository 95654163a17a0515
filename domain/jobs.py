"""Scheduled jobs run once: never two runs of one job at a time, one run per beat slot.

A job's code is one function whose result has `counts()` (or is a dict of counts). Its task
(tasks/base.py, `@job`) runs it through `run_job`, with the slot beat stamped on the message;
the CLI runs the same job by hand through the same wrapper, with no slot. Nobody writes
`run_once` around a body of their own.

What `run_once(job, slot=...)` guarantees:

- **One at a time.** It takes a Postgres advisory lock for the job on a connection of its
  own, held for the whole run (the body may commit as often as it likes) and released when
  that connection closes, even if the process is killed. When another run holds it (an
  overrunning previous run, the other beat's copy, a manual run), the attempt is recorded as
  `skipped`, logged, and `JobSkipped` is raised from the `with` line: the body never runs.
  A job's task turns JobSkipped into a successful "skipped" result; in the CLI it reaches
  main(), which prints the reason and exits 1.
- **Once per slot.** Beat stamps each message with the slot it was fired for: the instant of
  the job's UTC grid (config/cadence.py, worker/schedule.py). The run claims (job, slot) in
  `job_runs`, where a unique index allows one running or successful run per slot, so when
  two beat processes both fire the 10:05 slot the later copy is skipped even after the first
  has finished. A failed run leaves its slot open: the other beat's copy or a Celery retry
  of the task (which keeps the slot header) may run it again. A run not fired by beat (CLI,
  a task sent by hand) has no slot: only the lock applies.
- **Recorded.** `job_runs` keeps job, slot, started, finished, outcome (`ok`; `failed` with
  the error, which is re-raised; `skipped` with the reason) and the counts of the result. A
  row left `running` by a run that died is marked failed by the next run of that job: the
  next run only gets the lock once the dead run's connection is gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import select
from sqlalchemy.orm import Session

from config import get_settings
from domain.errors import describe
from models import JobOutcome, JobRun

log = logging.getLogger(__name__)

Result = TypeVar("Result")

# First key of every job lock ("MW"), so job locks never meet the main app's advisory locks.
LOCK_NAMESPACE = 0x4D57

_TABLE = "marketplace_worker.job_runs"
# The predicate of the unique index uq_job_runs_job_slot (models/jobs.py), which ON CONFLICT
# must repeat to pick that index: a constant, not a parameter.
_HOLDS_SLOT = f"outcome IN ('{JobOutcome.RUNNING}', '{JobOutcome.OK}')"

_CURRENT: ContextVar[Run | None] = ContextVar("current_job_run", default=None)


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


def current_run() -> Run:
    """The run of the job executing in this context (a job that fans out records its pieces
    under it)."""
    run = _CURRENT.get()
    if run is None:
        raise LookupError("no job is running here")
    return run


def counts_of(result: Any) -> Any:
    """What `job_runs.counts` keeps of a job's result: its `counts()`, or the result itself
    (a dict of counts)."""
    counts = getattr(result, "counts", None)
    return counts() if callable(counts) else result


def run_job(job: str, work: Callable[[], Result], *, slot: datetime | None = None) -> Result:
    """`work()` as a run of `job` (see the module docstring), its result's counts recorded;
    returns the result, or raises JobSkipped."""
    with run_once(job, slot=slot) as run:
        result = work()
        run.counts = counts_of(result)
    return result


@contextmanager
def run_once(job: str, *, slot: datetime | None = None) -> Iterator[Run]:
    """Run the body as `job` for beat's `slot` (None: a run by hand), or raise JobSkipped;
    see the module docstring. `run_job` is the way in for a job's code."""
    run = Run(job, slot)
    with psycopg.connect(get_settings().libpq_database_url, autocommit=True, connect_timeout=5) as conn:
        locked = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, job)
        ).fetchone()[0]
        if not locked:
            _skip(conn, run, _in_progress(conn, job), overrun=True)
        conn.execute(
            f"UPDATE {_TABLE} SET outcome = %s, finished_at = now(),"
            " error = 'the run ended without recording an outcome (process killed or connection lost)'"
            " WHERE job = %s AND outcome = %s",
            (JobOutcome.FAILED, job, JobOutcome.RUNNING),
        )
        run.id = _claim(conn, run)
        if run.id is None:
            _skip(conn, run, f"slot {run.slot.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC already ran", overrun=False)
        log.info("job %s started", job, extra={"job": job, "slot": _iso(run.slot)})
        token = _CURRENT.set(run)
        try:
            yield run
        except BaseException as error:
            try:
                _finish(conn, run, JobOutcome.FAILED, describe(error))
            except Exception:  # the job's own error is the one to report
                log.exception("could not record the failure of job %s", job)
            log.error("job %s failed: %s", job, describe(error), extra={"job": job})
            raise
        finally:
            _CURRENT.reset(token)
        _finish(conn, run, JobOutcome.OK, None)
        log.info("job %s done", job, extra={"job": job, "counts": run.counts})


def _claim(conn: psycopg.Connection, run: Run) -> int | None:
    row = conn.execute(
        f"INSERT INTO {_TABLE} (job, slot, outcome) VALUES (%s, %s, %s)"
        f" ON CONFLICT (job, slot) WHERE {_HOLDS_SLOT} DO NOTHING RETURNING id",
        (run.job, run.slot, JobOutcome.RUNNING),
    ).fetchone()
    return row[0] if row else None


def _in_progress(conn: psycopg.Connection, job: str) -> str:
    row = conn.execute(
        f"SELECT started_at FROM {_TABLE} WHERE job = %s AND outcome = %s ORDER BY started_at DESC LIMIT 1",
        (job, JobOutcome.RUNNING),
    ).fetchone()
    since = f" (started {row[0].astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)" if row else ""
    return f"another run is in progress{since}"


def _skip(conn: psycopg.Connection, run: Run, reason: str, *, overrun: bool) -> None:
    conn.execute(
        f"INSERT INTO {_TABLE} (job, slot, outcome, finished_at, reason) VALUES (%s, %s, %s, now(), %s)",
        (run.job, run.slot, JobOutcome.SKIPPED, reason),
    )
    # A second beat's copy of a slot is routine; a run still going when the next one is due is not.
    log.log(
        logging.WARNING if overrun else logging.INFO,
        "job %s skipped: %s", run.job, reason,
        extra={"job": run.job, "slot": _iso(run.slot)},
    )
    raise JobSkipped(run.job, reason)


def _finish(conn: psycopg.Connection, run: Run, outcome: JobOutcome, error: str | None) -> None:
    conn.execute(
        f"UPDATE {_TABLE} SET outcome = %s, finished_at = now(), counts = %s, error = %s WHERE id = %s",
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


def last_successes(conn: psycopg.Connection, jobs: Sequence[str]) -> dict[str, datetime]:
    """When each of `jobs` last finished ok (jobs that never did are left out)."""
    # Newest ok run per job, read backwards on (job, started_at): a few rows per job.
    rows = conn.execute(
        f"SELECT j.job, (SELECT finished_at FROM {_TABLE} r WHERE r.job = j.job AND r.outcome = %s"
        "                ORDER BY r.started_at DESC LIMIT 1)"
        " FROM unnest(%s::text[]) AS j(job)",
        (JobOutcome.OK, list(jobs)),
    ).fetchall()
    return {job: finished for job, finished in rows if finished is not None}
