"""The chaos run's faults, fired while the events are being delivered: SIGKILL of a whole worker
process tree (then a restart), a broker restart with messages queued (the workers paused until
some are), a Postgres restart; and the supervisor restarting a worker that exited by itself, as
the deployment's restart policy does."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.chaos.deliveries import Client
from harness.chaos.servers import Servers
from harness.workers import WorkerProcess

if TYPE_CHECKING:
    from harness.chaos.run import ChaosConfig


@dataclass
class FaultRecord:
    kind: str
    at: float  # seconds since the first delivery
    seconds: float  # until service was back
    detail: str
    in_flight: int | None = None  # broker restart: messages queued or reserved (Redis: lost with it)


class Faults(threading.Thread):
    """Fires each fault once the client has answered its share of the deliveries."""

    def __init__(self, plan: list[tuple[float, str]], client: Client, servers: Servers, workers: list[WorkerProcess],
                 config: ChaosConfig, rng: random.Random, started: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.plan = sorted(plan)
        self.client = client
        self.servers = servers
        self.workers = workers
        self.config = config
        self.rng = rng
        self.started = started
        self.records: list[FaultRecord] = []
        self.error: BaseException | None = None
        self.last_fault_end = started

    def run(self) -> None:
        total = len(self.client.deliveries)
        try:
            for fraction, kind in self.plan:
                while self.client.done < fraction * total:
                    time.sleep(0.02)
                began = time.monotonic()
                detail, in_flight = getattr(self, f"_{kind}")()
                self.last_fault_end = time.monotonic()
                self.records.append(
                    FaultRecord(kind, began - self.started, self.last_fault_end - began, detail, in_flight))
        except BaseException as error:  # reported by the run, which then fails
            self.error = error

    def _queued(self) -> tuple[int, int]:
        return self.servers.queued()

    def _kill_worker(self) -> tuple[str, None]:
        worker = self.rng.choice(self.workers)
        time.sleep(self.rng.uniform(0, 0.5))  # a random moment, not the moment of a delivery
        with worker.lock:
            killed = worker.kill()
            worker.start()
        return f"worker {worker.name}: {killed} processes SIGKILLed, restarted", None

    def _restart_broker(self) -> tuple[str, int]:
        # With messages in flight, for certain: the workers are paused (SIGSTOP) until the
        # deliveries going on have queued some, and resumed once the broker is back.
        paused = []
        try:
            for worker in self.workers:
                worker.lock.acquire()
                paused.append(worker)
                worker.pause()
            deadline = time.monotonic() + 30
            queued, unacked = self._queued()
            while queued + unacked == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
                queued, unacked = self._queued()
            if queued + unacked == 0:
                raise RuntimeError("no message was queued within 30 s of pausing the workers")
            self.servers.restart_broker(self.config.broker_down_seconds)
        finally:
            for worker in paused:
                worker.resume()
                worker.lock.release()
        fate = "lost with it" if self.servers.broker == "redis" else "kept by its quorum queue"
        return (f"{self.servers.broker}: {queued} messages queued and {unacked} reserved by the paused workers, "
                f"{fate}; down {self.config.broker_down_seconds:.0f} s"), queued + unacked

    def _restart_postgres(self) -> tuple[str, None]:
        self.servers.restart_postgres(self.config.postgres_down_seconds)
        return f"stopped (fast: connections cut), down {self.config.postgres_down_seconds:.0f} s, started", None


class Supervisor(threading.Thread):
    """Restarts a worker process that exited by itself, as the deployment's restart policy
    (`restart: unless-stopped` in docker-compose.yml) does, and records why it exited."""

    def __init__(self, workers: list[WorkerProcess], started: float) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.workers = workers
        self.started = started
        self.records: list[FaultRecord] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for worker in self.workers:
                if worker.proc.poll() is None or not worker.lock.acquire(blocking=False):
                    continue
                try:
                    code = worker.proc.poll()
                    if code is None:
                        continue
                    began = time.monotonic()
                    reason = next((line.split(" celery.worker ", 1)[-1] for line in reversed(
                        worker.log_path.read_text(errors="replace").splitlines()) if "CRITICAL" in line), "")
                    try:
                        worker.start()
                    except RuntimeError:  # the broker may still be down: next round
                        continue
                    self.records.append(FaultRecord(
                        "worker_exited", began - self.started, time.monotonic() - began,
                        f"worker {worker.name} exited by itself (exit code {code}; {reason[:140]}); "
                        f"restarted as its restart policy would"))
                finally:
                    worker.lock.release()


def fault_plan(rng: random.Random, config: ChaosConfig) -> list[tuple[float, str]]:
    kinds = (["kill_worker"] * config.worker_kills + ["restart_broker"] * config.broker_restarts
             + ["restart_postgres"] * config.postgres_restarts)
    return [(rng.uniform(*config.fault_window), kind) for kind in kinds]
