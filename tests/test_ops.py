"""Operations: the beat schedule and run-once jobs, retention, Flower, metrics, logs, compose.

The flows run real processes: a Celery worker, two `celery -A worker beat` and Flower, on a
Redis database of their own (the session's worker, if another test module started one, does
not take their messages), against the session's Postgres database.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
import yaml
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CONNECT_WEBHOOK_SECRET, STRIPE_API_KEY, WEBHOOK_SECRET
from harness import stripe_events
from harness.flow import wait_for
from harness.workers import BeatProcess, WorkerProcess

PROJECT = Path(__file__).resolve().parents[1]
FLOWER_USER, FLOWER_PASSWORD = "ops", "test-flower-password"  # tests/conftest.py's FLOWER_BASIC_AUTH
SECRETS = [WEBHOOK_SECRET, CONNECT_WEBHOOK_SECRET, STRIPE_API_KEY, FLOWER_PASSWORD]
# Shaped like a live secret key, assembled so that the source holds no key-shaped literal.
LIVE_KEY_SHAPE = "sk_" + "live_51HxYz"


def _job_runs(services, job: str | None = None) -> list[tuple]:
    with psycopg.connect(services["DATABASE_URL"]) as conn:
        return conn.execute(
            "SELECT job, slot, outcome, counts, error, reason FROM marketplace_worker.job_runs"
            " WHERE %(job)s::text IS NULL OR job = %(job)s ORDER BY id",
            {"job": job},
        ).fetchall()


# --- the schedule ---------------------------------------------------------------------------


def test_the_readme_schedule_table_is_the_beat_schedule(services):
    from config import Settings
    from worker import app
    from worker.schedule import JOBS, beat_schedule

    section = (PROJECT / "README.md").read_text().split("### Schedule", 1)[1].split("\n### ", 1)[0]
    documented = [
        tuple(cell.strip().strip("`") for cell in line.strip("|").split("|"))
        for line in section.splitlines()
        if line.startswith("| `")
    ]
    scheduled = [
        (
            job.name,
            job.task,
            app.amqp.router.route({}, job.task)["queue"].name,
            Settings.model_fields[job.setting].default.describe(),
            job.setting.upper(),
        )
        for job in JOBS
    ]
    assert documented == scheduled
    entries = app.conf.beat_schedule
    assert {name: entry["task"] for name, entry in entries.items()} == {job.name: job.task for job in JOBS}
    assert entries == beat_schedule(Settings())


# --- run once ---------------------------------------------------------------------------------


def test_an_overrunning_run_makes_the_next_one_skip_not_stack(db, services):
    from domain.jobs import JobSkipped, run_once

    inside, release = threading.Event(), threading.Event()

    def long_run() -> None:
        with run_once("ops_probe") as run:
            inside.set()
            release.wait(20)
            run.counts = {"rows": 1}

    first = threading.Thread(target=long_run)
    first.start()
    try:
        assert inside.wait(20)
        with pytest.raises(JobSkipped, match="in progress"):
            with run_once("ops_probe"):
                raise AssertionError("a second run of the job ran while the first was running")
    finally:
        release.set()
        first.join(20)
    with run_once("ops_probe") as run:
        run.counts = {"rows": 2}
    outcomes = [(outcome, counts) for _, _, outcome, counts, _, _ in _job_runs(services, "ops_probe")]
    assert outcomes == [("ok", {"rows": 1}), ("skipped", None), ("ok", {"rows": 2})]


def test_a_slot_runs_once_even_after_its_first_run_finished(db, services):
    from domain.jobs import JobSkipped, run_once

    slot = datetime(2026, 1, 5, 10, 5, tzinfo=UTC)
    with run_once("ops_probe", slot=slot):
        pass
    with pytest.raises(JobSkipped, match="already ran"):
        with run_once("ops_probe", slot=slot):
            raise AssertionError("the slot ran twice")
    with run_once("ops_probe", slot=slot + timedelta(minutes=5)):
        pass
    for _ in range(2):  # runs not fired by beat (CLI, by hand) have no slot: only the lock applies
        with run_once("ops_probe"):
            pass
    assert [(s, o) for _, s, o, *_ in _job_runs(services, "ops_probe")] == [
        (slot, "ok"), (slot, "skipped"), (slot + timedelta(minutes=5), "ok"), (None, "ok"), (None, "ok"),
    ]


def test_a_failed_run_is_recorded_its_error_raised_and_its_slot_left_to_a_retry(db, services):
    from domain.jobs import JobSkipped, run_once

    slot = datetime(2026, 1, 5, 10, 5, tzinfo=UTC)
    with pytest.raises(ZeroDivisionError):
        with run_once("ops_probe", slot=slot):
            1 / 0
    with run_once("ops_probe", slot=slot):
        pass
    with pytest.raises(JobSkipped):
        with run_once("ops_probe", slot=slot):
            pass
    runs = _job_runs(services, "ops_probe")
    assert [(s, o, e) for _, s, o, _, e, _ in runs] == [
        (slot, "failed", "ZeroDivisionError: division by zero"), (slot, "ok", None), (slot, "skipped", None),
    ]


def test_a_run_that_died_is_marked_failed_by_the_next_run(db, services):
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os\nfrom domain.jobs import run_once\nwith run_once('ops_probe'):\n    os._exit(9)"],
        cwd=PROJECT, env={**os.environ, **services}, timeout=60,
    )
    assert killed.returncode == 9
    assert [o for _, _, o, *_ in _job_runs(services, "ops_probe")] == ["running"]
    from domain.jobs import run_once

    # Postgres drops the dead session's lock once it notices the closed connection.
    wait_for(lambda: _try_run(run_once), timeout=20, message="the dead run's lock to go")
    runs = _job_runs(services, "ops_probe")
    assert [o for _, _, o, *_ in runs if o != "skipped"] == ["failed", "ok"]
    assert "process killed" in runs[0][4]


def _try_run(run_once) -> bool:
    from domain.jobs import JobSkipped

    try:
        with run_once("ops_probe"):
            return True
    except JobSkipped:
        return False


def test_the_jobs_command_prints_recent_runs(db, capsys):
    from domain.jobs import JobSkipped, run_once
    from worker.cli import main

    with run_once("ops_probe", slot=datetime(2026, 1, 5, 10, 5, tzinfo=UTC)) as run:
        run.counts = {"enqueued": 3}
    with pytest.raises(JobSkipped):
        with run_once("ops_probe", slot=datetime(2026, 1, 5, 10, 5, tzinfo=UTC)):
            pass
    assert main(["jobs", "--job", "ops_probe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["JOB", "SLOT", "(UTC)"]
    assert re.match(r"ops_probe +2026-01-05 10:05:00 .* skipped +slot 2026-01-05 10:05:00 UTC already ran", lines[1])
    assert re.match(r'ops_probe +2026-01-05 10:05:00 .* ok +\{"enqueued": 3\}', lines[2])


# --- real processes: worker, two beats, Flower -------------------------------------------------


@pytest.fixture(scope="module")
def ops_env(services) -> dict[str, str]:
    """The session's settings, on a Redis database no other test module's worker reads."""
    parts = urlsplit(services["REDIS_URL"])
    private = urlunsplit(parts._replace(path=f"/{(int(parts.path.strip('/') or 0) + 1) % 16}"))
    redis.Redis.from_url(private).flushdb()
    return {**services, "REDIS_URL": private, "LOG_JSON": "true"}


@pytest.fixture(scope="module")
def ops_app(ops_env) -> Celery:
    return Celery("ops-tests", broker=ops_env["REDIS_URL"], set_as_current=False)


@pytest.fixture(scope="module")
def ops_worker(ops_env, ops_app, work_dir):
    with WorkerProcess(ops_env, work_dir / "ops-worker.log", probe=ops_app, name="ops", ready_timeout=30) as worker:
        yield worker


def _wait_until_broker_idle(ops_env) -> None:
    """No message waiting or being worked on (late acks keep them in `unacked` until done),
    so nothing sent by this test runs during the next one."""
    from worker.celery_app import QUEUES

    broker = redis.Redis.from_url(ops_env["REDIS_URL"])
    wait_for(lambda: not any(broker.llen(q) for q in QUEUES) and not broker.hlen("unacked"), message="an idle broker")


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", *args],
        env={**os.environ, **env}, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=PROJECT,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_beat_processes_run_each_job_once_per_slot(db, services, ops_env, ops_worker, work_dir):
    env = {**ops_env, "SCHEDULE_SWEEP_INBOX": "1", "SCHEDULE_PURGE_INBOX": "2"}

    def slots_fired_by_both(job: str) -> int:
        rows = _job_runs(services, job)
        per_slot = defaultdict(int)
        for _, slot, *_ in rows:
            per_slot[slot] += 1
        return sum(1 for count in per_slot.values() if count == 2)

    with BeatProcess(env, work_dir, name="beat-0"), BeatProcess(env, work_dir, name="beat-1"):
        wait_for(
            lambda: slots_fired_by_both("sweep_inbox") >= 4 and slots_fired_by_both("purge_inbox") >= 2,
            timeout=45, interval=0.2, message="several slots fired by both beats",
        )
    _wait_until_broker_idle(ops_env)

    runs = defaultdict(list)
    for job, slot, outcome, *_ in _job_runs(services):
        runs[job, slot].append(outcome)
    period = {"sweep_inbox": 1, "purge_inbox": 2}
    for (job, slot), outcomes in runs.items():
        assert slot is not None, f"a beat message of {job} carried no slot"
        # Each beat fires each slot once: one copy runs, the other is recorded as skipped.
        assert len(outcomes) <= 2 and outcomes.count("ok") <= 1, (job, slot, outcomes)
        if job in period:  # (other jobs may fire on their own default cadence meanwhile)
            assert sorted(outcomes) in (["ok"], ["ok", "skipped"]), (job, slot, outcomes)
            assert slot.timestamp() % period[job] == 0  # on the UTC grid
    beat_log = (work_dir / "beat-0.log").read_text()
    sent = [json.loads(line) for line in beat_log.splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("Scheduler: Sending due task sweep_inbox") for line in sent)


def test_a_job_run_by_hand_through_the_worker_claims_no_slot(db, services, ops_app, ops_worker):
    ops_app.send_task("tasks.events.sweep_inbox", queue="webhooks")
    wait_for(lambda: _job_runs(services, "sweep_inbox"), message="the sweeper to run")
    wait_for(lambda: _job_runs(services, "sweep_inbox")[0][2] == "ok", message="the sweeper to finish")
    [(_, slot, outcome, counts, _, _)] = _job_runs(services, "sweep_inbox")
    assert (slot, outcome, counts) == (None, "ok", {"enqueued": 0})


def _flower(env: dict[str, str], port: int, log: Path, *extra: str) -> subprocess.Popen:
    return _spawn(["flower", f"--port={port}", *extra], env, log)


def _wait_http(proc: subprocess.Popen, url: str, log: Path) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=30, interval=0.1, message=f"{url} to answer")


def test_flower_requires_basic_auth_and_shows_a_task_a_worker_ran(db, ops_env, ops_app, ops_worker, work_dir):
    from worker.embedded import free_port

    without_auth = {key: value for key, value in ops_env.items() if key != "FLOWER_BASIC_AUTH"}
    refused = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={free_port()}"],
        env={key: value for key, value in {**os.environ, **without_auth}.items() if key != "FLOWER_BASIC_AUTH"},
        capture_output=True, text=True, timeout=60, cwd=PROJECT,
    )
    assert refused.returncode != 0
    assert "FLOWER_BASIC_AUTH is not set" in refused.stderr

    port = free_port()
    log = work_dir / "flower.log"
    flower = _flower(ops_env, port, log, "--address=127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(flower, f"{base}/healthcheck", log)
        assert httpx.get(f"{base}/").status_code == 401
        assert httpx.get(f"{base}/api/tasks").status_code == 401
        assert httpx.get(f"{base}/", auth=(FLOWER_USER, "wrong")).status_code == 401
        assert httpx.get(f"{base}/", auth=(FLOWER_USER, FLOWER_PASSWORD)).status_code == 200

        def sweeper_in_flower() -> bool:
            tasks = httpx.get(f"{base}/api/tasks", auth=(FLOWER_USER, FLOWER_PASSWORD)).json()
            if any(t["name"] == "tasks.events.sweep_inbox" and t["state"] == "SUCCESS" for t in tasks.values()):
                return True
            # Flower only sees the events sent after it connected: run the task again until it has.
            ops_app.send_task("tasks.events.sweep_inbox", queue="webhooks")
            return False

        wait_for(sweeper_in_flower, timeout=30, interval=1, message="Flower to show the sweeper's run")
        metrics = httpx.get(f"{base}/metrics").text  # unauthenticated by Flower's design (README)
        assert any(
            sample.labels["task"] == "tasks.events.sweep_inbox" and sample.labels["type"] == "task-succeeded"
            and sample.value >= 1
            for family in text_string_to_metric_families(metrics) if family.name == "flower_events"
            for sample in family.samples if sample.name == "flower_events_total"
        )
    finally:
        _stop(flower)
    _wait_until_broker_idle(ops_env)


def test_flower_runs_without_auth_only_when_allowed_and_only_on_localhost(ops_env, work_dir):
    from worker.embedded import free_port

    dev = {**{k: v for k, v in ops_env.items() if k != "FLOWER_BASIC_AUTH"}, "FLOWER_UNAUTHENTICATED": "true"}
    env = {key: value for key, value in {**os.environ, **dev}.items() if key != "FLOWER_BASIC_AUTH"}
    public = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={free_port()}", "--address=0.0.0.0"],
        env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT,
    )
    assert public.returncode != 0 and "only serves on 127.0.0.1" in public.stderr

    port = free_port()
    log = work_dir / "flower-dev.log"
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}"],
        env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=PROJECT,
    )
    try:
        _wait_http(flower, f"http://127.0.0.1:{port}/healthcheck", log)
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        _stop(flower)


def test_log_lines_carry_the_ids_they_are_about_and_no_secret(db, services, ops_app, ops_worker, work_dir):
    from models.db import session_scope
    from models.inbox import StripeEvent

    event = stripe_events.event("customer.created", {"id": "cus_ops", "object": "customer"})
    with session_scope() as session:
        session.add(StripeEvent(id=event["id"], type=event["type"], livemode=False, created=event["created"],
                                payload=event, endpoint="platform"))
    ops_app.send_task("tasks.events.process_event", (event["id"],), queue="webhooks")

    def lines_about_the_event() -> list[dict]:
        lines = [json.loads(line) for line in ops_worker.log_path.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event_id") == event["id"]]

    [line] = wait_for(lines_about_the_event, message="the worker to log the event")
    assert line["task_name"] == "tasks.events.process_event" and line["task_id"]
    logs = [path.read_text(errors="replace") for path in work_dir.glob("*.log")]
    assert logs and not [secret for secret in SECRETS for text in logs if secret in text]


def test_the_redactor_removes_secrets_and_card_numbers_from_every_line(services):
    from config import get_settings
    from worker.logging_setup import JsonFormatter, Redactor, TaskContext, TextFormatter, configured_secrets

    redact = Redactor(configured_secrets(get_settings()))
    for formatter in (JsonFormatter(redact), TextFormatter(redact)):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.addFilter(TaskContext())
        handler.setFormatter(formatter)
        logger = logging.getLogger("tests.ops.redaction")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            logger.warning("secrets %s %s", WEBHOOK_SECRET, CONNECT_WEBHOOK_SECRET, extra={"key": STRIPE_API_KEY})
            logger.warning(f"other keys whsec_abcDEF123 {LIVE_KEY_SHAPE} rk_test_abc123def")
            logger.warning("connect to postgresql://app:hunter2hunter@db:5432/x and redis://:pw0rd@redis:6379/0")
            logger.warning("Authorization: Basic b3BzOnRlc3QtZmxvd2VyLXBhc3N3b3Jk; password=letmein123")
            logger.warning("card 4242 4242 4242 4242 and 4000-0566-5566-5556, amount 123456789012345 cents")
            logger.warning("node test-4242424242424242@vm at 1764024970889")
            try:
                raise RuntimeError(f"flower auth {FLOWER_USER}:{FLOWER_PASSWORD} rejected")
            except RuntimeError:
                logger.exception("boom", extra={"event_id": "evt_123"})
        finally:
            logger.removeHandler(handler)
        out = stream.getvalue()
        for leaked in [*SECRETS, "whsec_abcDEF123", LIVE_KEY_SHAPE, "rk_test_abc123def", "hunter2hunter", "pw0rd",
                       "b3BzOnRlc3QtZmxvd2VyLXBhc3N3b3Jk", "letmein123", "4242 4242 4242 4242", "4000-0566-5566-5556"]:
            assert leaked not in out, (type(formatter).__name__, leaked)
        # Not card numbers (Luhn fails; a name; a millisecond timestamp): kept.
        assert "123456789012345 cents" in out and "test-4242424242424242@vm at 1764024970889" in out
        assert "evt_123" in out


def test_json_lines_are_one_object_each_with_extras_and_exception(services):
    from worker.logging_setup import JsonFormatter, Redactor

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(Redactor()))
    logger = logging.getLogger("tests.ops.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("provider %s recomputed", 7, extra={"provider_id": 7})
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            logger.exception("failed", extra={"event_id": "evt_1"})
    finally:
        logger.removeHandler(handler)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert (first["message"], first["provider_id"], first["level"]) == ("provider 7 recomputed", 7, "INFO")
    assert second["event_id"] == "evt_1" and "ValueError: bad" in second["exception"]


# --- receiver metrics ---------------------------------------------------------------------------


def _samples(client) -> dict[tuple, float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_receiver_metrics_change_when_events_arrive(db, services):
    from starlette.testclient import TestClient

    from config import get_settings
    from domain.jobs import run_once
    from worker.receiver import create_app

    def count(samples, name, **labels) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    with TestClient(create_app(get_settings())) as client:
        before = _samples(client)
        event = stripe_events.event("customer.created", {"id": "cus_metrics", "object": "customer"})
        body, headers = stripe_events.webhook(event, WEBHOOK_SECRET)
        assert client.post("/webhooks/stripe", content=body, headers=headers).json()["status"] == "stored"
        assert client.post("/webhooks/stripe", content=body, headers=headers).json()["status"] == "duplicate"
        forged, forged_headers = stripe_events.webhook(stripe_events.event("customer.created", {"id": "c"}), "whsec_x")
        assert client.post("/webhooks/stripe", content=forged, headers=forged_headers).status_code == 400
        live = stripe_events.event("customer.created", {"id": "cus_live", "object": "customer"}, livemode=True)
        live_body, live_headers = stripe_events.webhook(live, WEBHOOK_SECRET)
        assert client.post("/webhooks/stripe", content=live_body, headers=live_headers).json()["status"] == "ignored"
        with psycopg.connect(services["DATABASE_URL"]) as conn:
            conn.execute("UPDATE marketplace_worker.stripe_events SET status = 'parked' WHERE id = %s", (event["id"],))
        with run_once("reconcile_all"):  # a run no worker of this module makes
            pass
        after = _samples(client)

    def delta(name, **labels) -> float:
        return count(after, name, **labels) - count(before, name, **labels)

    assert delta("webhook_events_received_total", endpoint="platform") == 4
    assert delta("webhook_events_stored_total", endpoint="platform") == 1
    assert delta("webhook_events_duplicate_total", endpoint="platform") == 1
    assert delta("webhook_events_rejected_total", endpoint="platform", reason="invalid or expired signature") == 1
    assert delta("webhook_events_ignored_total", endpoint="platform", reason="livemode mismatch") == 1
    assert count(after, "inbox_events", status="parked") == 1
    assert time.time() - count(after, "job_last_success_timestamp_seconds", job="reconcile_all") < 600


# --- retention ------------------------------------------------------------------------------------


def test_purge_deletes_old_processed_and_ignored_events_in_batches_and_never_parked(db, services):
    from domain import retention
    from models.db import session_scope
    from tasks.maintenance import purge_inbox

    now = datetime.now(UTC)
    old, recent = now - timedelta(days=120), now - timedelta(days=10)
    events = {
        "evt_old_processed_1": ("processed", old), "evt_old_processed_2": ("processed", old),
        "evt_old_processed_3": ("processed", old), "evt_old_ignored": ("ignored", old),
        "evt_old_parked": ("parked", old), "evt_old_received": ("received", old),
        "evt_old_retrying": ("retrying", old), "evt_recent_processed": ("processed", recent),
    }
    with psycopg.connect(services["DATABASE_URL"]) as conn:
        for event_id, (status, received_at) in events.items():
            conn.execute(
                "INSERT INTO marketplace_worker.stripe_events (id, type, livemode, created, payload, endpoint,"
                " status, received_at) VALUES (%s, 'invoice.paid', false, 1, '{}', 'platform', %s, %s)",
                (event_id, status, received_at),
            )
        conn.execute(
            "INSERT INTO marketplace_worker.job_runs (job, outcome, started_at) VALUES"
            " ('ops_probe', 'ok', %s), ('ops_probe', 'skipped', %s), ('ops_probe', 'ok', %s)",
            (old, old, recent),
        )
    purged = retention.purge(
        session_scope, events_before=now - timedelta(days=90), job_runs_before=now - timedelta(days=30), batch=2,
    )
    # Batches of 2: events 2 + 2 + none, job runs 2 + none.
    assert purged.counts() == {"events_deleted": 4, "job_runs_deleted": 2, "transactions": 5}
    with psycopg.connect(services["DATABASE_URL"]) as conn:
        left = {row[0] for row in conn.execute("SELECT id FROM marketplace_worker.stripe_events")}
    assert left == {"evt_old_parked", "evt_old_received", "evt_old_retrying", "evt_recent_processed"}

    assert purge_inbox() == {"events_deleted": 0, "job_runs_deleted": 0, "transactions": 2}
    assert [(j, o) for j, _, o, *_ in _job_runs(services)] == [("ops_probe", "ok"), ("purge_inbox", "ok")]


# --- docker-compose ---------------------------------------------------------------------------------


COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "pg-pass", "REDIS_PASSWORD": "redis-pass", "STRIPE_API_KEY": "rk_test_x",
    "STRIPE_WEBHOOK_SECRETS": "whsec_x", "FLOWER_BASIC_AUTH": "ops:pass",
}


def test_the_compose_file_has_the_promised_services():
    compose = yaml.safe_load((PROJECT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "postgres", "redis", "migrate", "receiver", "worker-webhooks", "worker-jobs", "beat", "flower",
    }
    for name in ("receiver", "worker-webhooks", "worker-jobs", "beat"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    for name, service in services.items():
        assert service["restart"] == ("no" if name == "migrate" else "unless-stopped"), name
        if name not in ("migrate", "beat"):
            assert "healthcheck" in service, name
    assert services["worker-webhooks"]["command"][3:6] == ["worker", "-Q", "webhooks"]
    assert services["worker-jobs"]["command"][3:6] == ["worker", "-Q", "polling,stats,reconciliation"]
    assert "inspect ping" in services["worker-webhooks"]["healthcheck"]["test"][1]
    assert "/healthz" in services["receiver"]["healthcheck"]["test"][-1]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert "redis-cli ping" in services["redis"]["healthcheck"]["test"][1]
    assert services["flower"]["command"][:4] == ["celery", "-A", "worker", "flower"]
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for service in services.values():  # nothing published beyond the host itself
        assert all(port.startswith("127.0.0.1:") for port in service.get("ports", []))


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_config_accepts_the_file_offline_with_or_without_the_secrets():
    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
        return subprocess.run(
            ["docker-compose", "-f", "docker-compose.yml", "config"],
            cwd=PROJECT, env={**clean, **env}, capture_output=True, text=True, timeout=60,
        )

    bare = config({})
    assert bare.returncode == 0, bare.stderr
    given = config(COMPOSE_ENV)
    assert given.returncode == 0, given.stderr
    rendered = yaml.safe_load(given.stdout)["services"]
    assert rendered["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:pass"
    assert rendered["receiver"]["environment"]["STRIPE_WEBHOOK_SECRETS"] == "whsec_x"


def test_an_empty_secret_from_compose_counts_as_missing(monkeypatch):
    from config import load_settings

    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    monkeypatch.setenv("REDIS_URL", "redis://h:6379/0")
    monkeypatch.setenv("STRIPE_API_KEY", "")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "")
    settings = load_settings()
    assert settings.stripe_api_key is None and settings.flower_basic_auth is None
