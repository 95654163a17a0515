"""The Celery application: JSON only, late acks for events, one queue per kind of work."""

from __future__ import annotations

import gc
from datetime import datetime

import celery
import click
from celery import Celery
from celery.signals import setup_logging, worker_process_init
from kombu import Queue

from config import get_settings
from domain.jobs import SCHEDULED_SLOT, JobSkipped
from worker.schedule import SLOT_HEADER, beat_schedule

# Queues, so that a nightly job never starves webhooks (SPEC §6).
QUEUES = ("webhooks", "polling", "stats", "reconciliation")

TASK_MODULES = [
    "tasks.events",
    "tasks.maintenance",
    "tasks.polling",
    "tasks.reconciliation",
    "tasks.stats",
]

# The longest task's hard limit; Redis must not hand an unacked message to another
# worker before that task could possibly have finished.
LONGEST_TASK_SECONDS = 3600


class Task(celery.Task):
    """Every task of the app. It runs with the slot beat stamped on its message in scope, for
    run_once (domain/jobs.py); a run that run_once skipped is a successful "skipped" result,
    not a failure."""

    def __call__(self, *args, **kwargs):
        slot = self.request.get(SLOT_HEADER)
        token = SCHEDULED_SLOT.set(datetime.fromisoformat(slot) if slot else None)
        try:
            return super().__call__(*args, **kwargs)
        except JobSkipped as skipped:
            return f"skipped: {skipped.reason}"
        finally:
            SCHEDULED_SLOT.reset(token)


def create_app() -> Celery:
    settings = get_settings()
    app = Celery("marketplace_worker", include=TASK_MODULES, task_cls=Task)
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=24 * 3600,
        task_ignore_result=True,
        enable_utc=True,
        timezone="UTC",
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="webhooks",
        task_routes={
            "tasks.events.*": {"queue": "webhooks"},
            "tasks.polling.*": {"queue": "polling"},
            "tasks.stats.*": {"queue": "stats"},
            "tasks.reconciliation.*": {"queue": "reconciliation"},
            "tasks.maintenance.*": {"queue": "polling"},
        },
        # Event tasks are short: a few prefetched messages keep the pool busy.
        worker_prefetch_multiplier=4,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=60,
        task_time_limit=90,
        broker_transport_options={"visibility_timeout": LONGEST_TASK_SECONDS + 600},
        broker_connection_retry_on_startup=True,
        # Flower (and `celery events`) see every task from the moment it is sent.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(settings),
    )
    if _celery_subcommand() == "flower":
        from worker.flower import guard

        guard(app)
    return app


def _celery_subcommand() -> str | None:
    """`flower` when `celery -A worker flower` is loading the app, and so on."""
    context = click.get_current_context(silent=True)
    return context.invoked_subcommand if context is not None else None


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: object) -> None:
    from worker.logging_setup import configure_logging

    configure_logging(loglevel)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    from models.db import dispose_engines

    dispose_engines()


@worker_process_init.connect
def _freeze_startup_heap(**_: object) -> None:
    # As in the receiver: what the process loaded at startup stays for its lifetime, so full
    # collections need not walk it again and again (about a tenth of an event's CPU time).
    from domain.dispatch import load_handlers

    load_handlers()
    gc.freeze()
