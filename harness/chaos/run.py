"""The chaos run itself: its servers and databases, the scenario seeded into both, the fleet
(receiver, workers, beat) as the worker's least-privilege role, the deliveries under faults,
the drain, then the reference, the comparison and the audit, gathered in a report."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

from harness.chaos.audit import audit
from harness.chaos.deliveries import CONNECT_WEBHOOK_SECRET, MAX_BODY_BYTES, TOLERANCE_SECONDS, WEBHOOK_SECRET, \
    Client, build_deliveries
from harness.chaos.faults import Faults, Supervisor, fault_plan
from harness.chaos.reference import build_reference, compare, domain_logs_to, full_stats_pass
from harness.chaos.report import ChaosReport
from harness.chaos.scenario import build_scenario, prepare_database, seed_database
from harness.chaos.servers import Servers
from harness.flow import ReceiverProcess
from harness.services import scratch_database
from harness.workers import BeatProcess, WorkerProcess, schedule_env


@dataclass
class ChaosConfig:
    events: int = 20_000
    duplicate_rate: float = 0.30
    hostile_rate: float = 0.05
    worker_kills: int = 5
    broker_restarts: int = 1
    postgres_restarts: int = 1
    # Each fault fires once the client has answered a random fraction of the deliveries, drawn
    # from this range.
    fault_window: tuple[float, float] = (0.1, 0.9)
    workers: int = 2
    worker_concurrency: int = 2
    client_concurrency: int = 16
    # Deliveries per second (None: as fast as the receiver answers).
    rate: float | None = None
    seed: int | None = None
    sweeper_threshold_seconds: int = 3
    sweep_every_seconds: int = 2
    retry_base_seconds: float = 0.5
    postgres_down_seconds: float = 3.0
    broker_down_seconds: float = 2.0
    broker: str = "redis"  # or "amqp": the machine's RabbitMQ (harness/brokers.py)
    drain_timeout_seconds: float = 900.0


def worker_env(database_url: str, redis_url: str, broker_url: str | None = None, **settings: object) -> dict[str, str]:
    """Every setting the run's processes read, stated explicitly so that nothing of the
    calling environment (a test session's own settings) leaks in."""
    env = {
        "DATABASE_URL": database_url, "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": broker_url or redis_url, "CELERY_RESULT_BACKEND": redis_url,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET, "STRIPE_CONNECT_WEBHOOK_SECRETS": CONNECT_WEBHOOK_SECRET,
        "STRIPE_API_KEY": "sk_test_chaos_run", "STRIPE_LIVEMODE": "false",
        "WEBHOOK_TOLERANCE_SECONDS": str(TOLERANCE_SECONDS), "WEBHOOK_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "PLATFORM_FEE_BPS": "500", "EVENT_MAX_ATTEMPTS": "8", "LOG_LEVEL": "INFO", "LOG_JSON": "false",
    }
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return {**os.environ, **env}


@contextmanager
def settings_env(env: dict[str, str]) -> Iterator[None]:
    """This process's settings (get_settings), and the Celery app built from them, read from
    `env` for the duration: an app built meanwhile names the run's broker, gone afterwards."""
    from config import get_settings
    from worker import get_app

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    get_settings.cache_clear()
    get_app.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
        get_app.cache_clear()


def counts_by_status(conninfo: str) -> dict[str, int]:
    with psycopg.connect(conninfo) as conn:
        return dict(conn.execute(
            "SELECT status, count(*) FROM marketplace_worker.stripe_events GROUP BY status").fetchall())


def wait_drained(conninfo: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            counts = counts_by_status(conninfo)
        except psycopg.OperationalError:
            counts = {"received": 1}
        if not counts.get("received") and not counts.get("retrying"):
            return True
        time.sleep(0.25)
    return False


def run_chaos(config: ChaosConfig, work_dir: Path, log: Callable[[str], None] = print) -> ChaosReport:
    seed = config.seed if config.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    began = time.monotonic()
    with Servers(work_dir, config.broker) as servers, \
            scratch_database(servers.server_url, "chaos_sut") as sut_url, \
            scratch_database(servers.server_url, "chaos_ref") as ref_url, \
            _worker_database(sut_url) as role_url:
        settings = dict(
            sweeper_threshold_seconds=config.sweeper_threshold_seconds,
            event_retry_base_seconds=config.retry_base_seconds,
        )
        env = worker_env(role_url, servers.redis_url, servers.broker_url, **settings) | schedule_env(
            {"sweep_inbox": config.sweep_every_seconds, "incremental_stats": 5})
        with settings_env(env):
            prepare_database(ref_url)
            scenario = build_scenario(rng, config.events)
            for url in (sut_url, ref_url):
                seed_database(url, scenario)
            summary = (f"{len(scenario.events)} events about {len(scenario.invoices)} invoices of "
                       f"{len(scenario.providers)} providers ({scenario.connect_accounts} Connect accounts)")
            log(summary)
            deliveries = build_deliveries(rng, scenario.events, config.duplicate_rate, config.hostile_rate)
            report_args = _run_fleet(config, rng, servers, env, work_dir, deliveries, sut_url, log)
            client, faults, drained, drained_at = report_args

            log("building the reference")
            answers = client.answers
            accepted_ids = {a.delivery.event.id for a in answers if a.delivery.kind == "genuine" and a.status == 200}
            events_by_id = scenario.events_by_id
            with domain_logs_to(work_dir / "reference.log"):
                reference = build_reference(ref_url, [events_by_id[i] for i in sorted(accepted_ids)])
            log("provider stats full pass on both databases, then comparing")
            for url in (sut_url, ref_url):
                full_stats_pass(url)
            tables, mismatches = compare(sut_url, ref_url)
            findings = audit(sut_url, scenario, answers, accepted_ids)
            _dispose_engines(sut_url, ref_url)
        last_delivery = client.last_answer_at
        return ChaosReport(
            config=config, seed=seed, scenario_summary=summary, deliveries=len(deliveries), answers=answers,
            faults=faults.records, statuses=findings["statuses"], parked=findings["parked"],
            lost=findings["lost"], never_accepted=findings["never_accepted"],
            hostile_stored=findings["hostile_stored"], applied_twice=findings["applied_twice"],
            sweeps=findings["sweeps"], tables_compared=tables, mismatches=mismatches, oracle=findings["oracle"],
            unlinkable_refunds=findings["unlinkable"], reference=reference, drained=drained,
            drain_after_last_fault=drained_at - faults.last_fault_end,
            drain_after_last_delivery=drained_at - last_delivery,
            delivery_seconds=last_delivery - faults.started, total_seconds=time.monotonic() - began,
        )


@contextmanager
def _worker_database(url: str) -> Iterator[str]:
    """The system under test as production has it: the app's tables made by a superuser, the
    worker's schema migrated by the worker's own least-privilege role; yields the role's URL."""
    from models.migrate import create_app_tables_if_absent, upgrade
    from harness.db_role import worker_role

    create_app_tables_if_absent(url)
    with worker_role(url, "mw_chaos") as (_, role_url):
        upgrade(role_url)
        yield role_url
        _dispose_engines(role_url)


def _run_fleet(config, rng, servers, env, work_dir, deliveries, sut_url, log):
    from celery import Celery

    probe = Celery("chaos-probe", broker=servers.broker_url, set_as_current=False)
    workers = [WorkerProcess(env, work_dir / f"worker-{slot}.log", config.worker_concurrency, probe, name=f"chaos{slot}")
               for slot in range(1, config.workers + 1)]
    try:
        with ReceiverProcess(env, work_dir / "receiver.log") as receiver, BeatProcess(env, work_dir):
            for worker in workers:
                worker.start()
            client = Client(receiver.url, deliveries, concurrency=config.client_concurrency, rate=config.rate,
                            seed=rng.randrange(2**32))
            started = time.monotonic()
            faults = Faults(fault_plan(rng, config), client, servers, workers, config, rng, started)
            log(f"delivering {len(deliveries)} requests; faults planned: "
                f"{', '.join(f'{k} at {p:.0%}' for p, k in sorted(faults.plan))}")
            supervisor = Supervisor(workers, started)
            supervisor.start()
            faults.start()
            progress = threading.Thread(target=_progress, args=(client, sut_url, servers, log), daemon=True)
            progress.start()
            client.run()
            faults.join()
            if faults.error is not None:
                raise RuntimeError(f"a fault could not be injected: {faults.error!r}") from faults.error
            log("deliveries done; draining")
            drained = wait_drained(sut_url, config.drain_timeout_seconds)
            drained_at = time.monotonic()
            supervisor.stopping.set()
            supervisor.join()
            faults.records = sorted(faults.records + supervisor.records, key=lambda r: r.at)
    finally:
        for worker in workers:
            worker.stop()
        probe.close()
    return client, faults, drained, drained_at


def _dispose_engines(*urls: str) -> None:
    """Close this process's pooled connections to the run's databases before they are dropped."""
    from config.settings import sqlalchemy_url
    from models.db import get_engine

    for url in urls:
        get_engine(sqlalchemy_url(url)).dispose()


def _progress(client: Client, sut_url: str, servers: Servers, log: Callable[[str], None], every: float = 15) -> None:
    """A line every few seconds while delivering: answered, inbox statuses, queue length."""
    total = len(client.deliveries)
    while client.done < total:
        time.sleep(every)
        try:
            counts = counts_by_status(sut_url)
            queued = servers.queued()[0]
        except Exception:  # a fault is in progress
            counts, queued = {}, "?"
        log(f"answered {client.done}/{total}; inbox {dict(sorted(counts.items()))}; queued messages {queued}")
