"""Inbox retention: the batched purge against one plain DELETE of the same rows.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m benchmarks.retention_bench [--scale 1.0]

Uses the Postgres named by DATABASE_URL (a scratch database is created and dropped), else an
embedded one. At scale 1 it fills the inbox with 200,000 events with 1 KB payloads, 80% of
them processed or ignored and past retention (the rest: recent ones, and old parked,
received and retrying ones, which must stay), then deletes the expired ones twice, from the
same starting table:

- the baseline: one `DELETE ... WHERE status IN ('processed', 'ignored') AND received_at < cutoff`,
  a single transaction holding every deleted row locked until it commits;
- `domain.retention.purge` with the default batch of 1,000 rows per transaction.

It prints each one's total time, the median and longest transaction of the purge (how long
any row stays locked, and how long autovacuum must wait to reclaim anything) and their ratios
to the baseline, and checks that both left exactly the rows that must stay.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

EVENTS = 200_000

# Event i: 80% expired processed/ignored, 10% recent processed, 10% old parked/received/retrying.
GENERATE = """
INSERT INTO marketplace_worker.stripe_events
    (id, type, livemode, created, payload, endpoint, status, received_at)
SELECT 'evt_bench_' || i, 'invoice.paid', false, 1700000000 + i,
       jsonb_build_object('id', 'evt_bench_' || i, 'padding', repeat('x', 1000)), 'platform',
       CASE WHEN i % 10 < 7 THEN 'processed' WHEN i % 10 = 7 THEN 'ignored'
            WHEN i % 10 = 8 THEN 'processed'
            ELSE (ARRAY['parked', 'received', 'retrying'])[1 + i % 3] END,
       -- One arrival every 10 ms; the receiver's group commits give a few neighbours one time.
       CASE WHEN i % 10 = 8 THEN now() - interval '10 days' ELSE now() - interval '120 days' END
           + (i / 4) * interval '40 milliseconds'
FROM generate_series(1, {events}) i
"""
BASELINE = """
DELETE FROM marketplace_worker.stripe_events
WHERE status IN ('processed', 'ignored') AND received_at < %(cutoff)s
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()

    import psycopg

    from domain import retention
    from models.db import session_scope
    from models.migrate import create_app_tables_if_absent, upgrade
    from harness.services import test_services

    events = int(EVENTS * args.scale)
    with tempfile.TemporaryDirectory(prefix="mw-retention-bench-") as work, test_services(Path(work)) as (db, _):
        create_app_tables_if_absent(db)
        upgrade(db)
        url = "postgresql+psycopg://" + db.split("://", 1)[1]
        cutoff = datetime.now(UTC) - timedelta(days=90)
        expected_left = events - sum(1 for i in range(1, events + 1) if i % 10 < 8)

        def refill(conn: psycopg.Connection) -> None:
            conn.execute("TRUNCATE marketplace_worker.stripe_events")
            conn.execute(GENERATE.format(events=events))
            conn.commit()
            with psycopg.connect(db, autocommit=True) as vacuum:
                vacuum.execute("VACUUM ANALYZE marketplace_worker.stripe_events")

        def left(conn: psycopg.Connection) -> int:
            return conn.execute("SELECT count(*) FROM marketplace_worker.stripe_events").fetchone()[0]

        with psycopg.connect(db) as conn:
            refill(conn)
            start = time.perf_counter()
            conn.execute(BASELINE, {"cutoff": cutoff})
            conn.commit()
            baseline_s = time.perf_counter() - start
            assert left(conn) == expected_left

            refill(conn)
            transactions: list[float] = []

            @contextmanager
            def timed_session():
                began = time.perf_counter()
                with session_scope(url) as session:
                    yield session
                transactions.append(time.perf_counter() - began)

            with session_scope(url):  # connect outside the timings
                pass
            start = time.perf_counter()
            purged = retention.purge(timed_session, events_before=cutoff, job_runs_before=cutoff, batch=1000)
            purge_s = time.perf_counter() - start
            assert left(conn) == expected_left

        print(f"{events:,} events, {purged.events:,} past retention")
        print(f"baseline: one DELETE           {baseline_s:8.3f} s, one transaction of {baseline_s:.3f} s")
        print(f"purge, batches of 1,000        {purge_s:8.3f} s ({purge_s / baseline_s:.2f}x the baseline),"
              f" {purged.transactions} transactions: median {statistics.median(transactions):.4f} s,"
              f" longest {max(transactions):.4f} s ({max(transactions) / baseline_s:.3f}x the baseline's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
