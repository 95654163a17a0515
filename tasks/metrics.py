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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram

if TYPE_CHECKING:
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

# Set in the worker's main process before the pool forks, so the children inherit it: a
# process that exports nothing records nothing.
_exporting = False


def record_attempts(attempts: Mapping[str, Attempt], applied_at: float) -> None:
    """Count a batch's attempts by event type, and the lag of those applied. `applied_at` is
    when the batch committed (a Unix time). Each attempt carries its event's type, endpoint and
    arrival, read with the event itself: recording costs no query."""
    if not _exporting:
        return
    for attempt in attempts.values():
        outcome = COUNTED_OUTCOMES.get(attempt.outcome)
        if outcome is None or attempt.event is None:
            continue
        EVENTS.labels(attempt.event.type, outcome).inc()
        if outcome == "processed":
            LAG.labels(attempt.event.endpoint).observe(max(0.0, applied_at - attempt.event.received_at.timestamp()))


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
