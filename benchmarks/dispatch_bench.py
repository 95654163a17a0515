"""Event processing cost in one worker process: one event per transaction against a message's
events in one transaction.

    python -m benchmarks.dispatch_bench [--events 4000] [--batch 50]

Uses the Postgres named by DATABASE_URL (a scratch database, dropped afterwards), else an
embedded one. Stores `--events` distinct `invoice.finalized` events about marketplace invoices
(each creates a transaction), then applies half of them one per transaction
(`dispatch.attempt_event`, the baseline) and the other half in batches of `--batch`
(`dispatch.attempt_batch`, what a task message of that many ids costs), in this process, without
Celery or a broker. Prints for each: events/s, statements per event (counted on the engine)
and the process's CPU time per event, then the ratio. The first 100 events warm the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy import event

from benchmarks.receiver_bench import seed_invoices, signed_lines
from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from harness.services import test_services

WARM_UP = 100


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
