"""Inbox retention: dropping a month's partition against the batched purge and one plain DELETE.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m benchmarks.retention_bench [--scale 1.0]

Uses the Postgres named by DATABASE_URL (a scratch database is created and dropped), else an
embedded one. At scale 1 it fills the inbox with 200,000 events with 1 KB payloads, 80% of
them processed or ignored and past retention (the rest: recent ones, and old parked,
received and retrying ones, which must stay), then deletes the expired ones three times, from the
same starting rows (their ids in `stripe_event_ids` as well):

- the baseline: one `DELETE ... WHERE status IN ('processed', 'ignored') AND received_at < cutoff`,
  a single transaction holding every deleted row locked until it commits;
- `domain.retention.purge` deleting row by row (the expired rows in the legacy partition, as
  before the inbox was partitioned), the default batch of 1,000 rows per transaction, the
  rows' ids with them;
- `domain.retention.purge` with the expired rows in a month's partition past retention: the
  partition detached and dropped, its unfinished events moved to DEFAULT, then its ids deleted
  from the key table in batches (timed apart: the part still row by row).

The baseline leaves the ids in the key table; the other two delete them. It prints each one's
total time, the median and longest transaction of the batched purge (how long any row stays
locked, and how long autovacuum must wait to reclaim anything) and their ratios to the
baseline, and checks that each left exactly the rows that must stay.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from functools import partial
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
       CASE WHEN i % 10 = 8 THEN now() - interval '10 days' ELSE {old} END
           + (i / 4) * interval '40 milliseconds'
FROM generate_series(1, {events}) i
"""
# The expired rows' time: in the legacy partition, or the first day of a month past retention.
LEGACY_OLD = "now() - interval '120 days'"
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
        now = datetime.now(UTC)
        cutoff = now - timedelta(days=90)
        expected_left = events - sum(1 for i in range(1, events + 1) if i % 10 < 8)

        def refill(conn: psycopg.Connection, old: str = LEGACY_OLD) -> None:
            conn.execute("TRUNCATE marketplace_worker.stripe_events, marketplace_worker.stripe_event_ids")
            conn.execute(GENERATE.format(events=events, old=old))
            conn.execute("INSERT INTO marketplace_worker.stripe_event_ids"
                         " SELECT id, received_at FROM marketplace_worker.stripe_events")
            conn.commit()
            with psycopg.connect(db, autocommit=True) as vacuum:
                vacuum.execute("VACUUM ANALYZE marketplace_worker.stripe_events")
                vacuum.execute("VACUUM ANALYZE marketplace_worker.stripe_event_ids")

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

            # Months instead of the legacy table: the expired rows in a month past retention.
            conn.execute("TRUNCATE marketplace_worker.stripe_events")
            conn.commit()
            sessions = partial(session_scope, url)
            retention.drop_expired(sessions, now + timedelta(days=400))  # every partition but DEFAULT
            month = retention.month_start(now - timedelta(days=125))
            retention.prepare_partitions(sessions, month, months_ahead=6)
            refill(conn, old=f"'{month.isoformat()}'::timestamptz")
            start = time.perf_counter()
            months, kept = retention.drop_expired(sessions, cutoff)
            drop_s = time.perf_counter() - start
            start = time.perf_counter()
            dropped = retention.purge(sessions, events_before=cutoff, job_runs_before=cutoff, batch=1000)
            ids_s = time.perf_counter() - start
            assert months >= 1 and left(conn) == expected_left, (months, left(conn))

        print(f"{events:,} events, {purged.events:,} past retention")
        print(f"baseline: one DELETE           {baseline_s:8.3f} s, one transaction of {baseline_s:.3f} s")
        print(f"purge, batches of 1,000        {purge_s:8.3f} s ({purge_s / baseline_s:.2f}x the baseline),"
              f" {purged.transactions} transactions: median {statistics.median(transactions):.4f} s,"
              f" longest {max(transactions):.4f} s ({max(transactions) / baseline_s:.3f}x the baseline's)")
        print(f"drop the month's partition     {drop_s:8.3f} s ({drop_s / baseline_s:.3f}x the baseline,"
              f" {drop_s / purge_s:.3f}x the batches), {kept:,} unfinished events moved to DEFAULT")
        print(f"  then its ids, batches        {ids_s:8.3f} s ({ids_s / baseline_s:.2f}x the baseline,"
              f" {ids_s / purge_s:.2f}x the batches), {dropped.event_ids:,} ids in {dropped.transactions} transactions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
