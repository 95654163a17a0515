"""The Celery application: JSON only, late acks for events, one queue per kind of work."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from config import get_settings

# Queues, so that a nightly job never starves webhooks (SPEC §6).
QUEUES = ("webhooks", "polling", "stats", "reconciliation")

TASK_MODULES = [
    "tasks.events",
]

# The longest task's hard limit; Redis must not hand an unacked message to another
# worker before that task could possibly have finished.
LONGEST_TASK_SECONDS = 3600


def create_app() -> Celery:
    settings = get_settings()
    app = Celery("marketplace_worker", include=TASK_MODULES)
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
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    return app


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    from models.db import dispose_engines

    dispose_engines()
