"""What every task shares: the app's task class, the task of a scheduled job, and the broker
facts tasks size themselves by. The Celery app (worker/celery_app.py) is built on this
module; nothing here imports the app: a task finds it as Celery's current app.

A scheduled job's task is one line around its domain call, named after the job:

    @job
    def poll_invoices() -> polling.PollResult:
        return polling.poll_invoices(session_scope, stripe_client_or_none())

`@job` takes the options of `shared_task` (time limits...), `manual=True` for a job run
only on demand (no beat entry), and `then=fn`: `fn(result)` runs once the run is recorded and
its lock released (a job that continues itself sends its next message there, which a run
still holding the lock would see skipped). The schedule (worker/schedule.py) names the task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import celery
from celery import Celery, current_app, shared_task

from config.settings import is_amqp_url
from domain.jobs import JobSkipped, counts_of, run_job
from models import JobOutcome
from tasks import metrics

Result = TypeVar("Result")

# The name the worker's app is built with; Celery's fallback app (a process that never built
# ours) has another, and its broker is not the worker's.
APP_NAME = "marketplace_worker"

# The slot a beat message was fired for (an ISO instant): the header worker/schedule.py stamps.
SLOT_HEADER = "mw_slot"

# The longest hard time limit a task may have: `reconcile_account`'s (tasks/reconciliation.py).
# Long jobs are split into short tasks (the full stats pass into provider ranges, the purge
# into runs that send the next) so that this stays a task's length, not a job's. A broker must
# not take back an unacked message of a task that could still be running: the app sets Redis's
# visibility timeout and RabbitMQ's consumer timeout above it, and a message whose restore
# failed while Redis was down comes back after that much. Nothing waits on them to recover
# lost work: the inbox and fan-out sweepers (domain/fanout.py) re-enqueue what a lost message
# carried within minutes, and a job's next slot replaces a lost beat message.
LONGEST_TASK_SECONDS = 1900


class Task(celery.Task):
    """Every task of the app (its `task_cls`)."""

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None, link_error=None,
                    shadow=None, **options):
        # RabbitMQ's native delayed delivery counts whole seconds and refuses a countdown that
        # truncates to 0: a sub-second retry waits one second there.
        countdown = options.get("countdown")
        if countdown is not None and 0 < countdown < 1 and is_amqp_url(self.app.conf.broker_url):
            options["countdown"] = 1
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)


class JobTask(Task):
    """The task of the scheduled job named after it: its body runs through `run_job`
    (domain/jobs.py) for the slot beat stamped on the message, so once per slot and never
    beside another run of the job, and returns the result whose counts the run records. The
    task's own result is those counts, or "skipped: <reason>" (a success, not a failure)."""

    manual = False  # a job run only on demand: it has no beat entry
    then: Callable[[Any], None] | None = None  # called with the result once the run is over

    @property
    def job(self) -> str:
        return self.name.rpartition(".")[2]

    def __call__(self, *args, **kwargs):
        slot = self.request.get(SLOT_HEADER)
        body = super().__call__
        started = time.monotonic()
        try:
            result = run_job(self.job, lambda: body(*args, **kwargs),
                             slot=datetime.fromisoformat(slot) if slot else None)
        except JobSkipped as skipped:
            metrics.record_job(self.job, JobOutcome.SKIPPED, None)
            return f"skipped: {skipped.reason}"
        except BaseException:
            metrics.record_job(self.job, JobOutcome.FAILED, time.monotonic() - started)
            raise
        metrics.record_job(self.job, JobOutcome.OK, time.monotonic() - started)
        if self.then is not None:
            self.then(result)
        return counts_of(result)

    def run_by_hand(self, work: Callable[[], Result] | None = None) -> Result:
        """A run of the job on demand (the CLI), in this process and with no slot: the task's
        body, or `work` in its place (the same domain call with the operator's arguments).
        Returns the result; raises JobSkipped when another run holds the job."""
        return run_job(self.job, work or self.run, slot=None)


def job(fn: Callable | None = None, /, **options: Any):
    """`@job` or `@job(**options)`: make the function the task of the job named after it."""
    options.setdefault("base", JobTask)
    if options.get("then") is not None:
        options["then"] = staticmethod(options["then"])  # a class attribute, not a method
    return shared_task(fn, **options) if fn is not None else shared_task(**options)


def worker_app() -> Celery:
    """The worker's app, as this process built it; refuses Celery's fallback app, which would
    publish to a broker that is not the worker's."""
    app = current_app._get_current_object()
    if app.main != APP_NAME:
        raise RuntimeError("the worker's Celery app is not built in this process (worker.get_app())")
    return app


def ready_messages(app: Celery, queue: str) -> int:
    """Messages waiting in `queue` (not those reserved by a worker); 0 for a queue the broker
    lost (a flushed Redis has no key for it)."""
    from kombu.exceptions import ChannelError

    with app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            return app.amqp.queues[queue].bind(channel).queue_declare(passive=True).message_count
        except (ChannelError, *connection.channel_errors):
            return 0
        finally:
            try:
                channel.close()
            except Exception:  # already closed by the broker's NOT_FOUND
                pass
