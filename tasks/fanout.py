"""Durable fan-out (domain/fanout.py): the base class of a fanned-out task, the fan-out of a
job's pieces, and the sweeper that re-enqueues the pieces whose message was lost."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from config import get_settings
from domain import fanout
from domain.errors import describe
from domain.jobs import current_run
from models.db import session_scope
from models.fanout import FanoutOutcome
from tasks.base import Task, job, ready_messages, worker_app

log = logging.getLogger(__name__)

ITEM = "item"  # the keyword argument naming a message's fan-out piece
# The result of a duplicate message of a finished piece.
ALREADY_FINISHED = "skipped: piece already finished"


class PieceTask(Task):
    """A task whose message may carry `item=<fanout_items.id>`: it starts the piece (a
    duplicate message of a finished piece does nothing), finishes it with the task's outcome,
    and pushes its due time back when the task schedules a retry."""

    def __call__(self, *args, **kwargs):
        item = kwargs.pop(ITEM, None)
        if item is not None:
            with session_scope() as session:
                if not fanout.start(session, item, int(self.time_limit or self.app.conf.task_time_limit)):
                    return ALREADY_FINISHED
        return super().__call__(*args, **kwargs)

    def on_success(self, retval, task_id, args, kwargs):
        item = kwargs.get(ITEM)
        if item is not None and retval != ALREADY_FINISHED:
            with session_scope() as session:
                fanout.finish(session, item, FanoutOutcome.OK)

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        item = kwargs.get(ITEM)
        if item is not None:
            when = exc.when if isinstance(exc.when, (int, float)) else 0
            with session_scope() as session:
                fanout.postpone(session, item, when)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        item = kwargs.get(ITEM)
        if item is not None:
            with session_scope() as session:
                fanout.finish(session, item, FanoutOutcome.FAILED, describe(exc))


def fan_out(task: str, pieces: Iterable[tuple[str, list[Any]]]) -> int:
    """From a job's body: record one piece (key, task args) of `task` per key not already
    pending, under the job's run, then publish them; returns how many were published."""
    run = current_run()
    with session_scope() as session:
        recorded = fanout.record(session, run.job, run.id, task, pieces)
    publish(recorded)
    return len(recorded)


def publish(pieces: list[fanout.Piece]) -> None:
    """One message per piece, each naming its piece."""
    app = worker_app()
    with app.producer_or_acquire() as producer:
        for piece in pieces:
            app.send_task(piece.task, args=piece.args, kwargs={ITEM: piece.id}, producer=producer)


@job
def sweep_fanout() -> dict[str, int]:
    settings = get_settings()
    app = worker_app()
    with session_scope() as session:
        tasks = fanout.pending_tasks(session)
    idle = [task for task in tasks if ready_messages(app, app.amqp.router.route({}, task)["queue"].name) == 0]
    with session_scope() as session:
        due = fanout.due_for_sweep(
            session, sweep_after=settings.fanout_sweep_after_seconds,
            stale_after=settings.fanout_stale_after_seconds, idle_tasks=idle,
        )
        purged = fanout.purge_finished(session, settings.job_runs_retention_days)
    if due:
        log.warning("re-enqueueing %d fanned-out tasks whose messages were lost", len(due))
        publish(due)
    return {"enqueued": len(due), "purged": purged}
