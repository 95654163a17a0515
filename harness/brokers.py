"""The brokers tests run against: Redis (always: the session's server, or an embedded one) and
RabbitMQ (this machine's, when one answers), each test run on a vhost of its own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

BROKERS = ("redis", "amqp")

# The machine's RabbitMQ (CI starts it when it is installed); RABBITMQ_URL names another one.
RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


def rabbitmq_missing() -> str | None:
    """Why the amqp variants cannot run here, or None when they can."""
    parts = urlsplit(RABBITMQ_URL)
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=2).close()
    except OSError as error:
        return f"no RabbitMQ reachable at {parts.hostname}:{parts.port or 5672} ({error.strerror or error})"
    if shutil.which("rabbitmqctl") is None:
        return "RabbitMQ answers, but rabbitmqctl (to make each run's vhost) is not installed"
    return None


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@contextmanager
def rabbitmq_vhost(prefix: str = "mw_test") -> Iterator[str]:
    """An amqp:// URL on a new vhost of the machine's RabbitMQ, deleted afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    parts = urlsplit(RABBITMQ_URL)
    _ctl("add_vhost", name)
    try:
        _ctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        _ctl("delete_vhost", name)


def vhost_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def queue_counts(url: str) -> dict[str, tuple[int, int]]:
    """{queue: (ready, unacknowledged)} of a RabbitMQ vhost."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost_of(url), "name", "messages_ready",
         "messages_unacknowledged", "--no-table-headers"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit():
            counts[fields[0]] = (int(fields[1]), int(fields[2]))
    return counts


def restart_rabbitmq(down_seconds: float) -> None:
    """Stop and start the RabbitMQ application (the Erlang node stays up): every connection
    is cut and the queues are recovered from disk, as in a broker restart."""
    import time

    _ctl("stop_app")
    time.sleep(down_seconds)
    _ctl("start_app")
    _ctl("await_startup")


def private_redis_url(redis_url: str, offset: int = 2) -> str:
    """A Redis database beside the session's own, so the session's shared worker (started by
    other modules) never takes these tests' messages. MW_TEST_BROKER_REDIS_URL overrides it."""
    override = os.environ.get("MW_TEST_BROKER_REDIS_URL")
    if override:
        return override
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{(int(parts.path.strip('/') or 0) + offset) % 16}"))


def app_for(env: dict[str, str]):
    """The worker's Celery app as a process with `env` builds it (same queues, routes and
    broker options), without making it this process's current app: tests send through it."""
    from config import Settings
    from worker.celery_app import create_app

    fields = {name.lower(): value for name, value in env.items() if name.lower() in Settings.model_fields}
    return create_app(Settings(**fields), set_as_current=False)


class BrokerRun:
    """One broker for a test module: its URL, the environment of the processes that use it
    (as the worker's least-privilege role), a Celery app to send through, and a worker."""

    def __init__(self, name: str, url: str, env: dict[str, str]) -> None:
        self.name = name
        self.url = url
        self.env = env
        self.app = app_for(env)

    def flush(self) -> None:
        """Lose every message waiting in the broker, as a restarted Redis without
        persistence or a purged RabbitMQ does."""
        from worker.celery_app import QUEUES

        if self.name == "amqp":
            with self.app.connection_for_write() as connection:
                channel = connection.channel()
                for queue in QUEUES:
                    channel.queue_purge(queue)
                channel.close()
        else:
            import redis

            redis.Redis.from_url(self.url).flushdb()

    def idle(self) -> bool:
        """No message waiting or reserved by a worker."""
        from worker.celery_app import QUEUES

        if self.name == "amqp":
            counts = queue_counts(self.url)
            return not any(sum(counts.get(q, (0, 0))) for q in QUEUES)
        import redis

        r = redis.Redis.from_url(self.url)
        return not any(r.llen(q) for q in QUEUES) and not r.hlen("unacked")


@contextmanager
def broker_run(name: str, base_env: dict[str, str], **settings: str) -> Iterator[BrokerRun]:
    """The broker `name` ('redis' or 'amqp'), empty, skipping the test (pytest.skip) when it is
    amqp and no RabbitMQ is reachable."""
    import pytest

    if name == "amqp":
        missing = rabbitmq_missing()
        if missing:
            pytest.skip(f"amqp variant: {missing}")
        with rabbitmq_vhost() as url:
            yield BrokerRun(name, url, {**base_env, "CELERY_BROKER_URL": url, **settings})
        return
    import redis

    url = private_redis_url(base_env["REDIS_URL"])
    redis.Redis.from_url(url).flushdb()
    yield BrokerRun(name, url, {**base_env, "CELERY_BROKER_URL": url, **settings})
    redis.Redis.from_url(url).flushdb()
