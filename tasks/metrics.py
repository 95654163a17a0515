"""The worker's Prometheus metrics: what the Celery processes did (events, jobs, Stripe calls).

Every metric the worker exports is defined here, on REGISTRY. The prefork pool runs tasks in
child processes while the main process serves `/metrics`, so the worker runs prometheus_client's
multiprocess mode: with PROMETHEUS_MULTIPROC_DIR set, each process writes its values to files of
its own in that directory and the main process sums them on every scrape. A child the pool
replaced keeps counting: its files stay, so no counter ever goes backwards. The main process
wipes the directory when it starts (`prepare_worker`), before the pool forks, and serves on
WORKER_METRICS_PORT once the worker is ready (`serve`). Without the directory nothing is served:
each child would count on its own, out of the main process's sight.

The domain returns what happened and the task layer records it; the one exception is the Stripe
HTTP client, which reports each request through `domain.stripe_api.request_observer`, set here.
The receiver's own metrics (worker/receiver.py) take the backlog's age from `backlog_age_seconds`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import select

from models import EventStatus, StripeEvent

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from domain.dispatch import Attempt

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
PORT_VARIABLE = "WORKER_METRICS_PORT"

REGISTRY = CollectorRegistry(auto_describe=True)

# One event's attempt, by what came of it: `failed` is an attempt that will be retried.
EVENTS = Counter("worker_events", "Event attempts by event type and outcome (processed, failed, parked, ignored)",
                 ["type", "outcome"], registry=REGISTRY)
# Every worker metric has labels, so none has a value (and a file in the multiprocess directory)
# before a task records one: a process that only imports the tasks (the healthcheck's `celery
# inspect`, the CLI) leaves nothing behind.
LAG = Histogram(
    "event_processing_lag_seconds", "From an event's arrival in the inbox to the commit that applied it, by endpoint",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600),
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "job_duration_seconds", "Scheduled job runs that ran (ok or failed), by job",
    ["job"], buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600), registry=REGISTRY,
)
JOB_RUNS = Counter("job_runs", "Scheduled job runs by job and outcome (ok, failed, skipped)",
                   ["job", "outcome"], registry=REGISTRY)
STRIPE_REQUESTS = Counter("stripe_api_requests", "HTTP requests to Stripe's API (the SDK's retries included), by endpoint kind",
                          ["endpoint"], registry=REGISTRY)
STRIPE_RATE_LIMITED = Counter("stripe_api_rate_limited", "Stripe API requests answered 429, by endpoint kind",
                              ["endpoint"], registry=REGISTRY)

# Attempt outcomes (domain.dispatch.AttemptOutcome's values) that count, under the name the
# metric gives them; the others (already settled, unknown, deferred) are a message seen again,
# not an attempt at the event. By value, so that every process importing the task base (beat,
# the CLI) need not import the handlers.
COUNTED_OUTCOMES = {"processed": "processed", "ignored": "ignored", "retrying": "failed", "parked": "parked"}

# Set in the worker's main process before the pool forks, so the children inherit it: the
# lag needs one extra read of the batch's inbox rows, paid only by a worker that exports it.
_exporting = False


def record_attempts(attempts: Mapping[str, Attempt], applied_at: float,
                    session_factory: Callable[[], AbstractContextManager[Session]]) -> None:
    """Count a batch's attempts by event type, and the lag of those applied. `applied_at` is
    when the batch committed (a Unix time)."""
    if not _exporting:
        return
    counted = {event_id: COUNTED_OUTCOMES[a.outcome] for event_id, a in attempts.items()
               if a.outcome in COUNTED_OUTCOMES}
    if not counted:
        return
    try:
        with session_factory() as session:
            rows = session.execute(
                select(StripeEvent.id, StripeEvent.type, StripeEvent.endpoint, StripeEvent.received_at)
                .where(StripeEvent.id.in_(list(counted)))
            ).all()
    except Exception as error:  # metrics never fail the task whose work is already committed
        log.warning("event metrics not recorded: %s", type(error).__name__)
        return
    for event_id, event_type, endpoint, received_at in rows:
        outcome = counted[event_id]
        EVENTS.labels(event_type, outcome).inc()
        if outcome == "processed":
            LAG.labels(endpoint).observe(max(0.0, applied_at - received_at.timestamp()))


def record_job(job: str, outcome: str, seconds: float | None) -> None:
    """A job run: its outcome, and how long it ran (None for a skipped run, which did not)."""
    JOB_RUNS.labels(job, outcome).inc()
    if seconds is not None:
        JOB_DURATION.labels(job).observe(seconds)


def record_stripe_request(endpoint: str, status: int | None) -> None:
    STRIPE_REQUESTS.labels(endpoint).inc()
    if status == 429:
        STRIPE_RATE_LIMITED.labels(endpoint).inc()


def prepare_worker() -> bool:
    """In the worker's main process at startup, before the pool forks: wipe what earlier
    processes left in the multiprocess directory and start recording. False (nothing exported)
    without WORKER_METRICS_PORT, or without the directory, which a prefork pool needs."""
    global _exporting
    if not os.environ.get(PORT_VARIABLE):
        return False
    directory = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not directory:
        log.error("%s is set but %s is not: the worker exports no metrics", PORT_VARIABLE, MULTIPROC_DIR_VARIABLE)
        return False
    from domain import stripe_api

    _wipe(Path(directory))
    stripe_api.request_observer = record_stripe_request
    _exporting = True
    return True


def _wipe(directory: Path) -> None:
    """Files of the processes of an earlier start would add their counts to this one's. No
    process of this one has written yet: every metric has labels, so none has a file before
    it records a value."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


def serve() -> int | None:
    """Serve the sum of every process's metrics on WORKER_METRICS_PORT (the main process, once
    the worker is ready); the port, or None when the worker exports none."""
    if not _exporting:
        return None
    from prometheus_client import multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    port = int(os.environ[PORT_VARIABLE])
    start_http_server(port, registry=registry)
    log.info("worker metrics on port %d", port)
    return port


def process_gone(pid: int) -> None:
    """A pool process exits: its live gauges leave the sum (its counters stay)."""
    if _exporting:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


# The oldest event still to be applied, per pending status: each a walk of one end of the
# (status, received_at) index, however long the backlog.
_OLDEST_WAITING = f"""
    SELECT extract(epoch FROM now() - least({", ".join(
        f"(SELECT min(received_at) FROM marketplace_worker.stripe_events WHERE status = '{status}')"
        for status in EventStatus.pending())}))
"""


def backlog_age_seconds(conn: psycopg.Connection) -> float:
    """How long the oldest event still to be applied (received or retrying) has waited since
    it arrived; 0 with none waiting. The receiver exports it beside the backlog's counts."""
    age = conn.execute(_OLDEST_WAITING).fetchone()[0]
    return 0.0 if age is None else max(0.0, float(age))
