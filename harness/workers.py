"""Celery processes for tests and benchmarks: `celery -A worker worker` and `celery -A worker
beat`, started with the settings given, each writing its own log file.

Every worker process of the test suite and of the benchmarks starts here, so they all wait for
readiness the same way (the started node itself answers a ping through the broker) and stop
the same way (SIGTERM, then SIGKILL of the whole process tree if it does not exit).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

_instances = itertools.count(1)


class WorkerProcess:
    """A `celery -A worker worker` process tree (main process and its prefork pool).

    `env` is laid over this process's environment. `probe` is the Celery app that pings the
    worker: this process's own unless the worker is on another broker (harness/brokers.py, the
    chaos run's servers). A restart starts a node of a new name, so the readiness ping cannot be
    answered by the node that was stopped. The suite's workers run without gossip and mingle
    (faster to start, no chatter between test nodes); `gossip=True` turns both on, as
    docker-compose.yml runs the worker. `extra_args` are added to the command line.
    """

    def __init__(self, env: dict[str, str], log_path: Path, concurrency: int = 2, probe=None, *,
                 name: str = "test", queues: list[str] | None = None, log_level: str = "INFO",
                 ready_timeout: float = 60, gossip: bool = False, extra_args: Sequence[str] = ()) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.concurrency = concurrency
        self.probe = probe
        self.name = name
        self.queues = queues
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.gossip = gossip
        self.extra_args = list(extra_args)
        self.instance = next(_instances)
        self.generation = 0
        self.node = ""
        self.proc: subprocess.Popen | None = None
        # Held by whoever kills or restarts the worker while other threads watch it (the chaos
        # run's fault injector and its supervisor).
        self.lock = threading.Lock()

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start a new node and return once it answers a ping."""
        from worker.celery_app import QUEUES

        self.generation += 1
        node_name = f"{self.name}-{self.instance}-{self.generation}-{os.getpid()}"
        self.node = f"{node_name}@{socket.gethostname()}"
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", ",".join(self.queues or QUEUES),
                   "-c", str(self.concurrency), "-l", self.log_level, "-n", f"{node_name}@%h"]
        if not self.gossip:
            command += ["--without-gossip", "--without-mingle"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command + self.extra_args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_ready(self.ready_timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        from worker import app

        probe = self.probe or app
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log_tail()}")
            try:
                if probe.control.ping(destination=[self.node], timeout=0.5):
                    return
            except Exception:  # the broker may be restarting (the chaos run's faults)
                time.sleep(0.2)
        raise RuntimeError(f"worker did not start:\n{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The main process first, then its pool children."""
        try:
            main = psutil.Process(self.proc.pid)
            return [main.pid] + [child.pid for child in main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> int:
        """SIGKILL the main process and its pool children at once, as a host crash would; the
        number of processes killed."""
        pids = self.pids()
        self._signal_tree(signal.SIGKILL)
        self.proc.wait()
        for pid in pids[1:]:
            _wait_gone(pid)
        return len(pids)

    def pause(self) -> None:
        """SIGSTOP the whole tree: it takes no message and acknowledges none until resumed."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """A warm shutdown (SIGTERM: tasks running finish), or `sig`; the whole tree is killed
        if the worker has not exited within `timeout`."""
        if self.running:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_gone(pid: int, timeout: float = 10) -> None:
    try:
        psutil.Process(pid).wait(timeout)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
        pass


class BeatProcess:
    """`celery -A worker beat` with its schedule file and pid file in `work_dir`."""

    def __init__(self, env: dict[str, str], work_dir: Path, name: str = "beat") -> None:
        self.env = {**os.environ, **env}
        self.work_dir = work_dir
        self.name = name
        self.log_path = work_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> BeatProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "INFO",
                 "-s", str(self.work_dir / f"{self.name}-schedule"), "--pidfile", str(self.work_dir / f"{self.name}.pid")],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc)


def schedule_env(enabled: dict[str, int]) -> dict[str, str]:
    """SCHEDULE_* settings: the jobs named at the given periods (seconds), every other job daily
    at a time twelve hours away, so that it does not run while the test or benchmark does."""
    from worker.schedule import JOBS

    away = datetime.now(UTC) + timedelta(hours=12)
    env = {}
    for job in JOBS:
        value = str(enabled[job.name]) if job.name in enabled else f"{away:%H:%M}"
        env[f"SCHEDULE_{job.name.upper()}"] = value
    return env
