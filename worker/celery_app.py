"""The Celery application: JSON only, late acks, one queue per kind of work, on Redis or RabbitMQ.

The broker is whatever CELERY_BROKER_URL (else REDIS_URL) names. On RabbitMQ (`amqp://`) every
queue is a quorum queue (replicated, on disk, survives a node restart; classic mirrored queues
are deprecated), publishes wait for the broker's confirm, and countdowns (retries) use Celery's
native delayed delivery, which needs the queues bound through topic exchanges. Routing is the
same on both: the task routes below name queues only.
"""

from __future__ import annotations

import gc
import os

import click
from celery import Celery
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from kombu import Exchange, Queue

from config import Settings, get_settings
from tasks.base import APP_NAME, LONGEST_TASK_SECONDS, Task
from worker.schedule import beat_schedule

# Queues, so that a nightly job never starves webhooks (SPEC §6).
QUEUES = ("webhooks", "polling", "stats", "reconciliation")

TASK_MODULES = [
    "tasks.events",
    "tasks.fanout",
    "tasks.maintenance",
    "tasks.polling",
    "tasks.reconciliation",
    "tasks.stats",
]

# A broker must not take back an unacked message of a task that could still be running (the
# longest runs LONGEST_TASK_SECONDS, tasks/base.py): Redis's visibility timeout and RabbitMQ's
# consumer timeout are both this deadline. Room for a message prefetched while the previous
# task ran, and for clock and signal delays.
BROKER_ACK_MARGIN_SECONDS = 600
ACK_DEADLINE_SECONDS = LONGEST_TASK_SECONDS + BROKER_ACK_MARGIN_SECONDS


def create_app(settings: Settings | None = None, *, set_as_current: bool = True) -> Celery:
    """The app; `settings` and `set_as_current=False` give a second one (on another broker,
    say) to a test or a benchmark beside the process's own."""
    settings = settings or get_settings()
    app = Celery(APP_NAME, include=TASK_MODULES, task_cls=Task, set_as_current=set_as_current)
    if set_as_current:
        # Current in every thread (Celery's "current" is per thread): tasks find it there, the
        # receiver's publisher thread included.
        app.set_default()
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
        task_queues=task_queues(settings.broker_is_amqp),
        task_default_queue="webhooks",
        task_routes={
            "tasks.events.*": {"queue": "webhooks"},
            # Short, every minute, and never behind the backlog it is there to repair.
            "tasks.fanout.*": {"queue": "webhooks"},
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
        broker_transport_options=broker_transport_options(settings.broker_is_amqp),
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


def task_queues(amqp: bool) -> list[Queue]:
    if not amqp:
        return [Queue(name) for name in QUEUES]
    return [
        Queue(
            name, Exchange(name, type="topic"), routing_key=name,
            queue_arguments={
                "x-queue-type": "quorum",
                # RabbitMQ closes a channel whose delivery stays unacked past its consumer timeout
                # (30 min by default) and redelivers: with late acks a task longer than that would
                # run twice. Per queue from RabbitMQ 3.12; older servers need `consumer_timeout`
                # in rabbitmq.conf (README, "RabbitMQ").
                "x-consumer-timeout": ACK_DEADLINE_SECONDS * 1000,
            },
        )
        for name in QUEUES
    ]


def broker_transport_options(amqp: bool) -> dict:
    if amqp:
        # A publish returns once RabbitMQ has the message (on a quorum queue: on a majority of
        # its nodes), so a message the broker did not take raises instead of vanishing.
        return {"confirm_publish": True}
    return {"visibility_timeout": ACK_DEADLINE_SECONDS}


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
    # The task modules, and through them every handler, are imported by now.
    gc.freeze()


@worker_process_init.connect
def _traces(**_: object) -> None:
    # After _fresh_connections_after_fork: the engine traced is this process's own.
    from worker.tracing import setup_tracing

    setup_tracing("marketplace-worker")


@celeryd_init.connect
def _error_reports(**_: object) -> None:
    # Before the pool forks: Sentry wraps the task tracers each pool process then builds.
    from worker.tracing import setup_error_reports

    setup_error_reports()


# The worker's metrics (tasks/metrics.py): the multiprocess directory wiped before the pool
# forks, served by the main process once the worker is ready, a pool process's live gauges
# dropped when it exits.
@worker_init.connect
def _prepare_metrics(**_: object) -> None:
    from tasks import metrics

    metrics.prepare_worker()


@worker_ready.connect
def _serve_metrics(**_: object) -> None:
    from tasks import metrics

    metrics.serve()


@worker_process_shutdown.connect
def _metrics_process_gone(pid: int | None = None, **_: object) -> None:
    from tasks import metrics

    metrics.process_gone(pid or os.getpid())
