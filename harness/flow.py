"""Flow tests: waiting on the database, and the receiver in a process of its own (worker
processes start in harness/workers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from harness.workers import stop_process

__all__ = ["ReceiverProcess", "wait_for"]


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
        stop_process(self.proc, timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
