"""Durable fan-out (domain/fanout.py): the base class of a fanned-out task, publishing the
pieces a job recorded, and the sweeper that re-enqueues the pieces whose message was lost."""

from __future__ import annotations

import logging

from config import get_settings
from domain import fanout
from domain.errors import describe
from domain.jobs import run_once
from models.db import session_scope
from worker import app
from worker.celery_app import Task, ready_messages

log = logging.getLogger(__name__)

ITEM = "item"  # the keyword argument naming a message's fan-out piece


class PieceTask(Task):
    """A task whose message may carry `item=<fanout_items.id>`: it starts the piece (a
    duplicate message of a finished piece does nothing), finishes it with the task's outcome,
    and pushes its due time back when the task schedules a retry."""

    def __call__(self, *args, **kwargs):
        item = kwargs.pop(ITEM, None)
        if item is not None:
            with session_scope() as session:
                if not fanout.start(session, item, int(self.time_limit or app.conf.task_time_limit)):
                    return "skipped: piece already finished"
        return super().__call__(*args, **kwargs)

    def on_success(self, retval, task_id, args, kwargs):
        item = kwargs.get(ITEM)
        if item is not None and retval != "skipped: piece already finished":
            with session_scope() as session:
                fanout.finish(session, item, "ok")

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
                fanout.finish(session, item, "failed", describe(exc))


def publish(pieces: list[fanout.Piece]) -> None:
    """One message per piece, each naming its piece."""
    with app.producer_or_acquire() as producer:
        for piece in pieces:
            app.send_task(piece.task, args=piece.args, kwargs={ITEM: piece.id}, producer=producer)


def _queue_of(task: str) -> str:
    return app.amqp.router.route({}, task)["queue"].name


@app.task(name="tasks.fanout.sweep_fanout")
def sweep_fanout() -> int:
    settings = get_settings()
    with run_once("sweep_fanout") as run:
        with session_scope() as session:
            tasks = fanout.pending_tasks(session)
        idle = [task for task in tasks if ready_messages(app, _queue_of(task)) == 0]
        with session_scope() as session:
            due = fanout.due_for_sweep(
                session, sweep_after=settings.fanout_sweep_after_seconds,
                stale_after=settings.fanout_stale_after_seconds, idle_tasks=idle,
            )
            purged = fanout.purge_finished(session, settings.job_runs_retention_days)
        if due:
            log.warning("re-enqueueing %d fanned-out tasks whose messages were lost", len(due))
            publish(due)
        run.counts = {"enqueued": len(due), "purged": purged}
    return len(due)
