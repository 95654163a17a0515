"""Event processing cost in one worker process: one event per transaction against a message's
events in one transaction.

    python -m benchmarks.dispatch_bench [--events 4000] [--batch 50]
    python -m benchmarks.dispatch_bench --mix [--events 6000] [--repeat 3]

Uses the Postgres named by DATABASE_URL (a scratch database, dropped afterwards), else an
embedded one. Stores `--events` distinct `invoice.finalized` events about marketplace invoices
(each creates a transaction), then applies half of them one per transaction
(`dispatch.attempt_event`, the baseline) and the other half in batches of `--batch`
(`dispatch.attempt_batch`, what a task message of that many ids costs), in this process, without
Celery or a broker. Prints for each: events/s, statements per event (counted on the engine)
and the process's CPU time per event, then the ratio. The first 100 events warm the process.

`--mix`: the worker's share of `receiver_bench --e2e` without its noise (no receiver, wrk or
broker on the same cores): the marketplace mix's events (about `--events`, in Stripe's order)
and, as the baseline, the same deliveries about invoices the app lacks, each applied in
messages of `--batch` ids (`dispatch.attempt_batch`) in this process, `--repeat` times in turn
on fresh data. Prints for each its events/s, this process's CPU and its database connection's
CPU per event and statements per event; then the medians' ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
from sqlalchemy import event

from benchmarks.receiver_bench import (CONNECT_PATH, body_of, marketplace_lines, seed_invoices, seed_marketplace,
                                       signed_lines)
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from harness.services import test_services
from models import Endpoint

WARM_UP = 100


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--mix", action="store_true", help="the marketplace mix against its little-work baseline")
    parser.add_argument("--repeat", type=int, default=3, help="with --mix: runs of each, in turn")
    args = parser.parse_args()
    if args.mix:
        return mix(args.events if args.events != 4000 else 6000, args.batch, args.repeat)

    with tempfile.TemporaryDirectory() as tmp, test_services(Path(tmp)) as (database_url, redis_url):
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        from domain import dispatch
        from models.db import get_engine, session_scope
        from models.migrate import create_app_tables_if_absent, upgrade

        create_app_tables_if_absent(database_url)
        upgrade(database_url)
        ids, stripe_ids = seed_invoices(database_url, args.events + WARM_UP, 0)
        events = [event_from_dict(json.loads(body), body, "platform", livemode=False)
                  for body in (line.split("\t", 1)[1] for line in signed_lines(ids, stripe_ids))]
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(INSERT_EVENTS_SQL, insert_params(events))

        statements = 0

        def count(*_: object) -> None:
            nonlocal statements
            statements += 1

        event.listen(get_engine(), "before_cursor_execute", count)
        event_ids = [e.id for e in events]
        for event_id in event_ids[:WARM_UP]:
            dispatch.attempt_event(session_scope, event_id, max_attempts=3)
        half = args.events // 2
        runs = {
            "one event per transaction": (event_ids[WARM_UP:WARM_UP + half], 1),
            f"batches of {args.batch}": (event_ids[WARM_UP + half:], args.batch),
        }
        rates = {}
        print(f"{args.events} invoice.finalized events, each creating a transaction; one process")
        for label, (todo, size) in runs.items():
            statements, cpu, started = 0, cpu_seconds(), time.perf_counter()
            outcomes = []
            for start in range(0, len(todo), size):
                chunk = todo[start:start + size]
                if size == 1:
                    outcomes.append(dispatch.attempt_event(session_scope, chunk[0], max_attempts=3).outcome)
                else:
                    attempts = dispatch.attempt_batch(session_scope, chunk, max_attempts=3)
                    outcomes += [a.outcome for a in attempts.values()]
            elapsed = time.perf_counter() - started
            cpu = cpu_seconds() - cpu
            assert outcomes == ["processed"] * len(todo), set(outcomes)
            rates[label] = len(todo) / elapsed
            print(f"{label:<26} {rates[label]:7.0f} events/s  {statements / len(todo):5.1f} statements/event  "
                  f"{cpu / len(todo) * 1000:.2f} ms CPU/event (this process)")
        baseline, batched = rates.values()
        print(f"batches / one per transaction: {batched / baseline:.2f}x")


def store(database_url: str, lines: list[str]) -> list[str]:
    """Store signed delivery lines in the inbox as the receiver would; returns their event ids."""
    events = []
    for line in lines:
        endpoint = Endpoint.CONNECT if line.split("\t", 1)[0] == CONNECT_PATH else Endpoint.PLATFORM
        body = body_of(line)
        events.append(event_from_dict(json.loads(body), body, endpoint, livemode=False))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(INSERT_EVENTS_SQL, insert_params(events))
    return [e.id for e in events]


def mix(events: int, batch: int, repeat: int) -> None:
    logging.disable(logging.WARNING)  # the mix's open disputes, one warning each
    with tempfile.TemporaryDirectory() as tmp, test_services(Path(tmp)) as (database_url, redis_url):
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url})
        from domain import dispatch
        from models.db import get_engine, session_scope
        from models.migrate import create_app_tables_if_absent, upgrade

        create_app_tables_if_absent(database_url)
        upgrade(database_url)
        engine = get_engine()
        statements = 0

        def count(*_: object) -> None:
            nonlocal statements
            statements += 1

        event.listen(engine, "before_cursor_execute", count)
        # The mix's events per invoice, payouts included, are 9.6; whole rounds of its 3 payment
        # modes and 8 outcomes.
        invoices = max(24, int(events / 9.6) // 24 * 24)
        accounts = max(1, invoices // 100)
        all_ids, _, all_accounts = seed_marketplace(database_url, invoices * (repeat + 1), accounts * (repeat + 1))
        runs: dict[str, list[dict]] = {"little work": [], "marketplace": []}
        for n in range(repeat + 1):  # the first round warms the process and the database
            ids = all_ids[n * invoices:(n + 1) * invoices]
            mix_lines, _ = marketplace_lines(ids, all_accounts[n * accounts:(n + 1) * accounts])
            strangers = [20_000_000 + n * len(ids) + k for k in range(len(ids))]
            little_lines, _ = marketplace_lines(strangers, [f"acct_stranger{n}x{k:05d}" for k in range(accounts)],
                                                strangers=True)
            for label, lines in (("little work", little_lines), ("marketplace", mix_lines)):
                todo = store(database_url, lines)
                with engine.connect() as conn:  # the pool's one connection, which the sessions reuse
                    backend = psutil.Process(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())
                statements, cpu, db_cpu, started = 0, cpu_seconds(), sum(backend.cpu_times()[:2]), time.perf_counter()
                outcomes: dict[str, int] = {}
                for start in range(0, len(todo), batch):
                    for attempt in dispatch.attempt_batch(session_scope, todo[start:start + batch],
                                                          max_attempts=3).values():
                        outcomes[attempt.outcome] = outcomes.get(attempt.outcome, 0) + 1
                elapsed = time.perf_counter() - started
                result = {"rate": len(todo) / elapsed, "cpu_ms": (cpu_seconds() - cpu) / len(todo) * 1000,
                          "db_ms": (sum(backend.cpu_times()[:2]) - db_cpu) / len(todo) * 1000,
                          "statements": statements / len(todo)}
                assert set(outcomes) <= {"processed", "ignored"}, outcomes
                if n:
                    runs[label].append(result)
                    print(f"{label:<12} {len(todo)} events {result['rate']:7.0f} events/s  CPU/event: this process "
                          f"{result['cpu_ms']:.3f} ms, its database connection {result['db_ms']:.3f} ms  "
                          f"{result['statements']:.2f} statements/event")
        medians = {label: {key: statistics.median(r[key] for r in results) for key in results[0]}
                   for label, results in runs.items()}
        base, real = medians["little work"], medians["marketplace"]
        print(f"medians: marketplace {real['rate']:.0f} events/s, {real['cpu_ms']:.3f} + {real['db_ms']:.3f} ms CPU/event; "
              f"little work {base['rate']:.0f} events/s, {base['cpu_ms']:.3f} + {base['db_ms']:.3f} ms")
        print(f"ratios (marketplace / little work): events/s {real['rate'] / base['rate']:.2f}x, "
              f"process CPU {real['cpu_ms'] / base['cpu_ms']:.2f}x, database CPU {real['db_ms'] / base['db_ms']:.2f}x, "
              f"statements {real['statements'] / base['statements']:.2f}x")


if __name__ == "__main__":
    main()
