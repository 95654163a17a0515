"""The worker's metrics, scraped from a real worker (main process and its prefork pool): events
by type and outcome, the lag of those applied, job runs, Stripe requests and their 429s."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import stripe_events
from harness.brokers import broker_run
from harness.flow import wait_for
from harness.lifecycle import store
from harness.workers import WorkerProcess

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def metrics_worker(services, work_dir, tmp_path_factory):
    """A worker exporting its metrics, on a broker no other module's worker reads; a file left
    in its multiprocess directory by an earlier start is there when it starts."""
    from worker.embedded import free_port

    directory = tmp_path_factory.mktemp("prometheus-multiproc")
    (directory / "counter_999999.db").write_bytes(b"")
    port = free_port()
    with broker_run("redis", services) as run:
        env = {**run.env, "PROMETHEUS_MULTIPROC_DIR": str(directory), "WORKER_METRICS_PORT": str(port)}
        worker = WorkerProcess(env, work_dir / "metrics-worker.log", concurrency=2, probe=run.app, name="metrics")
        worker.start()
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: _answers(url), timeout=30, message="the worker's metrics port")
            yield run, url, directory
        finally:
            worker.stop()
            run.app.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_outcomes_counted_are_attempt_outcomes():
    from domain.dispatch import AttemptOutcome
    from tasks.metrics import COUNTED_OUTCOMES

    assert set(COUNTED_OUTCOMES) <= {outcome.value for outcome in AttemptOutcome}


def test_the_directory_left_by_an_earlier_start_is_wiped(metrics_worker):
    _, _, directory = metrics_worker
    assert not (directory / "counter_999999.db").exists()


def test_a_process_that_only_imports_the_tasks_leaves_no_file(services, tmp_path):
    # The worker's healthcheck (`celery inspect ping`) and the CLI run beside it with its settings.
    env = {**os.environ, **services, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "import worker, tasks.events, tasks.base"], env=env, check=True, timeout=60)
    assert list(tmp_path.iterdir()) == []


def test_events_a_pool_process_attempted_show_by_type_and_outcome_with_the_lag_of_those_applied(metrics_worker, db):
    run, url, _ = metrics_worker
    platform = "acct_metrics000001"
    transfers = [stripe_events.event("transfer.created", stripe_events.transfer(amount=100 + i, destination=platform))
                 for i in range(3)]
    unhandled = stripe_events.event("customer.created", {"id": "cus_metrics", "object": "customer"})
    wrong_object = stripe_events.event("transfer.created", {"id": "cus_wrong", "object": "customer"})
    ids = store(db, *transfers, unhandled, wrong_object)
    before = scrape(url)

    run.app.send_task("tasks.events.process_events", args=[ids])

    def moved():
        now = scrape(url)
        return now if value(now, "worker_events_total", type="transfer.created", outcome="parked") \
            - value(before, "worker_events_total", type="transfer.created", outcome="parked") >= 1 else None

    after = wait_for(moved, timeout=30, interval=0.2, message="the event metrics")

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("worker_events_total", type="transfer.created", outcome="processed") == 3
    assert delta("worker_events_total", type="customer.created", outcome="ignored") == 1
    assert delta("worker_events_total", type="transfer.created", outcome="parked") == 1
    assert delta("event_processing_lag_seconds_count", endpoint="platform") == 3
    assert delta("event_processing_lag_seconds_sum", endpoint="platform") > 0
    assert delta("event_processing_lag_seconds_bucket", endpoint="platform", le="+Inf") == 3


def test_a_job_run_shows_its_outcome_duration_and_its_stripe_requests_with_the_429(metrics_worker, db, stripe_api):
    run, url, _ = metrics_worker
    before = scrape(url)
    stripe_api.fail_next(429, 1, path_prefix="/v1/events")

    run.app.send_task("tasks.events.catch_up_events")

    def ran():
        now = scrape(url)
        return now if value(now, "job_runs_total", job="catch_up_events", outcome="ok") \
            > value(before, "job_runs_total", job="catch_up_events", outcome="ok") else None

    after = wait_for(ran, timeout=60, interval=0.2, message="the catch-up run's metrics")

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("job_runs_total", job="catch_up_events", outcome="ok") == 1
    assert delta("job_duration_seconds_count", job="catch_up_events") == 1
    assert delta("job_duration_seconds_sum", job="catch_up_events") > 0
    assert delta("stripe_api_rate_limited_total", endpoint="events") == 1
    assert delta("stripe_api_requests_total", endpoint="events") >= 2
