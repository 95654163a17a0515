"""Helpers for flow tests: a real Celery worker process, and waiting on the database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


class WorkerProcess:
    """A real `celery -A worker worker` process consuming every queue."""

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 2, probe=None) -> None:
        self.log_path = log_path
        self.env = {**os.environ, **env}
        self.concurrency = concurrency
        # The app to ping the worker through: this process's own unless the worker is on
        # another broker (harness/brokers.py).
        self.probe = probe
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from worker.celery_app import QUEUES

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", ",".join(QUEUES),
             "-c", str(self.concurrency), "-l", "INFO", "--without-gossip", "--without-mingle",
             "-n", f"test-{os.getpid()}-{time.monotonic_ns()}@%h"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        from worker import app

        app = self.probe or app
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log_tail()}")
            if app.control.ping(timeout=0.5):
                return
        raise RuntimeError(f"worker did not start:\n{self.log_tail()}")

    def stop(self, sig: int | None = None) -> None:
        if self.proc and self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(predicate, timeout: float = 20, interval: float = 0.05, message: str = "condition"):
    """Poll until `predicate()` is truthy; flow tests wait on the database, not on sleeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


class ReceiverProcess:
    """`marketplace-worker webhook` in its own process, on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        from worker.embedded import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ReceiverProcess":
        import httpx

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "webhook", "--port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("receiver did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
