"""Provider stats at scale: full pass against a hand-written aggregate, incremental pass, memory.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m benchmarks.stats_bench [--scale 1.0]

Uses the Postgres named by DATABASE_URL (a scratch database is created and dropped), else an
embedded one. At scale 1 it generates, with INSERT ... SELECT generate_series, 20,000
providers, 60,000 listings (10% soft-deleted), 2,000,000 transactions (all statuses, 2% of
the paid/completed ones partly refunded) and 400,000 reviews (5% soft-deleted), plus the
users and invoices their foreign keys need. It then prints:

- the floor: one hand-written aggregate query computing the four stats of every provider
  (best of 3, warm cache), next to the full pass when no provider's stats change (the usual
  night, best of 3) and when every provider's do (they start at zero), with their ratios to
  the floor; for the second, also the time of one hand-written UPDATE ... FROM (that
  aggregate) writing every provider, and the longest batch transaction of the pass, which
  bounds how long it keeps rows of marketplace.providers locked;
- the full pass, every provider changing, in the ranges the nightly job fans out as tasks:
  of STATS_FULL_RANGE_SIZE providers (its default), and of 5,000 and 2,000, each range run
  here one after the other as the workers' tasks would, with the longest range (the longest
  task) and the ratio to the floor: each range reads the transactions of its providers,
  which lie all over the table, so every range costs about one read of it;
- the first incremental pass (no watermark yet), then the incremental pass for 100 providers
  touched by the worker (touched_providers) and for 100 touched by the app (a listing of each
  updated), min, median and max of 5; then the same once the tables have the indexes on
  service_listings("updatedAt"), reviews("createdAt") and reviews("deletedAt") that the app
  could add (created in the scratch database only);
- the peak RSS of a process that runs the full pass with every provider changing (a
  subprocess, so the figure is the pass's own: imports and connection included), next to its
  RSS before the pass.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import psycopg
from sqlalchemy import text

# Generated rows per table at scale 1.
PROVIDERS, LISTINGS, TRANSACTIONS, REVIEWS, CLIENTS = 20_000, 60_000, 2_000_000, 400_000, 20_000

# The provider of transaction i: scattered, so that one provider's transactions are spread
# over the whole table as they are when they arrive over years.
PROVIDER_OF = "1 + ((i * 2654435761) % {providers})"

GENERATE = """
SET session_replication_role = replica;  -- skip the FK triggers: the rows satisfy them
INSERT INTO "User" (id, email, "createdAt", "updatedAt")
SELECT 'u' || i, 'u' || i || '@bench.test', now(), now()
FROM generate_series(1, {providers} + {clients}) i;

INSERT INTO marketplace.providers (id, "userId", "providerType", "businessName", "updatedAt")
SELECT i, 'u' || i, 'service_provider', 'Provider ' || i, now() - interval '1 day'
FROM generate_series(1, {providers}) i;

INSERT INTO marketplace.service_listings
    (id, "providerId", title, category, "priceCents", status, "createdAt", "updatedAt", "deletedAt")
SELECT i, 1 + (i % {providers}), 'Listing ' || i, 'grooming', 5000,
       (ARRAY['draft', 'active', 'paused', 'archived'])[1 + i % 4],
       now() - interval '30 days', now() - interval '1 day',
       CASE WHEN i % 10 = 0 THEN now() - interval '1 day' END
FROM generate_series(1, {listings}) i;

INSERT INTO "Invoice" (id, "invoiceNumber", status, "amountCents", "isMarketplaceInvoice",
                       "clientUserId", "marketplaceProviderId", "updatedAt")
SELECT i, 'INV-' || i, 'paid', 10000, true, 'u' || ({providers} + 1), i, now()
FROM generate_series(1, {providers}) i;

INSERT INTO marketplace.transactions
    (id, "clientUserId", "providerId", "invoiceType", "invoiceId", "serviceDescription",
     "totalCents", "platformFeeCents", "providerPayoutCents", status, "createdAt")
SELECT i, 'u' || ({providers} + 1 + i % {clients}), p, 'service', p, 'Full groom, large dog',
       1000 + (i * 37) % 100000, 0, 1000 + (i * 37) % 100000,
       (ARRAY['completed', 'completed', 'completed', 'completed', 'completed', 'completed',
              'completed', 'completed', 'completed', 'completed', 'completed', 'completed',
              'paid', 'paid', 'paid', 'refunded', 'cancelled', 'cancelled', 'invoiced',
              'pending_invoice'])[1 + i % 20],
       now() - interval '30 days'
FROM (SELECT i, {provider_of} AS p FROM generate_series(1, {transactions}) i) g;

INSERT INTO marketplace.reviews
    (id, "transactionId", "providerId", "reviewerUserId", rating, "createdAt", "deletedAt")
SELECT i, i, {provider_of}, 'u' || ({providers} + 1 + i % {clients}), 1 + (i * 7) % 5,
       now() - interval '30 days', CASE WHEN i % 20 = 0 THEN now() - interval '1 day' END
FROM generate_series(1, {reviews}) i;

INSERT INTO marketplace_worker.transaction_refunds (transaction_id, refunded_cents)
SELECT id, "totalCents" / 4 FROM marketplace.transactions
WHERE status IN ('paid', 'completed') AND id % 50 = 7;

SET session_replication_role = DEFAULT;
"""

# The floor: the same four numbers for every provider in one plain query.
FLOOR = """
SELECT p.id, COALESCE(l.n, 0), COALESCE(t.n, 0), COALESCE(t.cents, 0), COALESCE(r.avg, 0)
FROM marketplace.providers p
LEFT JOIN (SELECT "providerId", count(*) n FROM marketplace.service_listings
           WHERE "deletedAt" IS NULL GROUP BY 1) l ON l."providerId" = p.id
LEFT JOIN (SELECT t."providerId", count(*) n, sum(t."totalCents" - COALESCE(x.refunded_cents, 0)) cents
           FROM marketplace.transactions t
           LEFT JOIN marketplace_worker.transaction_refunds x ON x.transaction_id = t.id
           WHERE t.status IN ('paid', 'completed') GROUP BY 1) t ON t."providerId" = p.id
LEFT JOIN (SELECT "providerId", round(avg(rating), 2) avg FROM marketplace.reviews
           WHERE "deletedAt" IS NULL GROUP BY 1) r ON r."providerId" = p.id
"""


WRITE_FLOOR = f"""
UPDATE marketplace.providers p
SET "totalListings" = f.listings, "totalTransactions" = f.transactions,
    "totalRevenueCents" = f.cents, "averageRating" = f.rating, "updatedAt" = now()
FROM ({FLOOR}) f (id, listings, transactions, cents, rating)
WHERE p.id = f.id
"""

RESET = '''UPDATE marketplace.providers
SET "totalListings" = 0, "totalTransactions" = 0, "totalRevenueCents" = 0, "averageRating" = 0'''


# Not created by the worker (the app's DDL is Prisma's): measured to show what they would save.
APP_INDEXES = """
CREATE INDEX ON marketplace.service_listings ("updatedAt");
CREATE INDEX ON marketplace.reviews ("createdAt");
CREATE INDEX ON marketplace.reviews ("deletedAt");
ANALYZE marketplace.service_listings, marketplace.reviews;
"""

TOUCH_LISTINGS = text("""
UPDATE marketplace.service_listings
SET "updatedAt" = now() AT TIME ZONE 'UTC',
    "deletedAt" = CASE WHEN "deletedAt" IS NULL THEN now() AT TIME ZONE 'UTC' END
WHERE id IN (SELECT min(id) FROM marketplace.service_listings
             WHERE "providerId" = ANY(:ids) GROUP BY "providerId")
""")


def report_incremental(url: str, rng: random.Random, providers: int, label: str) -> None:
    """Five incremental passes after the worker touched 100 random providers, and five after the
    app changed a listing of each of 100 others.

    The overlap is zero here so that a pass recomputes just the 100 providers of its round; with
    STATS_CHANGE_OVERLAP_SECONDS a pass also recomputes the app's changes of that many seconds
    before the previous pass (recomputing costs about as much per provider as below).
    """
    from domain import stats
    from domain.stats_touch import touch_providers
    from models.db import session_scope

    def timed_pass() -> tuple[float, int]:
        start = time.perf_counter()
        with session_scope(url) as session:
            result = stats.incremental_pass(session, overlap=timedelta(0))
        return time.perf_counter() - start, result.recomputed

    by_worker, by_app = [], []
    for _ in range(5):
        ids = rng.sample(range(1, providers + 1), 100)
        with session_scope(url) as session:
            touch_providers(session, ids)
        by_worker.append(timed_pass())
        ids = rng.sample(range(1, providers + 1), 100)
        with session_scope(url) as session:
            session.execute(TOUCH_LISTINGS, {"ids": ids})
        by_app.append(timed_pass())
    for who, runs in (("the worker", by_worker), ("the app", by_app)):
        times = [t * 1000 for t, _ in runs]
        print(f"incremental pass, 100 providers touched by {who}{label}: min {min(times):.1f} ms,"
              f" median {statistics.median(times):.1f} ms, max {max(times):.1f} ms (goal < 100 ms);"
              f" recomputed {sorted({n for _, n in runs})}")


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def generate(url: str, scale: float) -> dict[str, int]:
    """Fill the tables of the database at `url` (a libpq URL); returns the row counts."""
    sizes = {
        "providers": max(1, int(PROVIDERS * scale)),
        "listings": int(LISTINGS * scale),
        "transactions": int(TRANSACTIONS * scale),
        "reviews": min(int(REVIEWS * scale), int(TRANSACTIONS * scale)),
        "clients": max(1, int(CLIENTS * scale)),
    }
    sql = GENERATE.format(provider_of=PROVIDER_OF.format(**sizes), **sizes)
    with psycopg.connect(url) as conn:
        conn.execute(sql)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return sizes


def full_pass_rss(url: str) -> tuple[int, int]:
    """(RSS before the pass, peak RSS) in KiB of a fresh process that runs one full pass."""
    code = (
        "import json, resource, sys\n"
        "from domain import stats\n"
        "from models.db import get_engine\n"
        "engine = get_engine(sys.argv[1])\n"
        "with engine.connect() as c: c.exec_driver_sql('SELECT 1')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with engine.connect() as c: stats.full_pass(c, batch_size=1000)\n"
        "print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, url], check=True, capture_output=True, text=True)
    before, peak = json.loads(out.stdout.strip().splitlines()[-1])
    return before, peak


def reset_every_provider(engine) -> None:
    """Every provider's stored stats to zero: the next full pass writes them all."""
    with engine.connect() as conn:
        conn.exec_driver_sql(RESET)
        conn.commit()
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM marketplace.providers")


def full_pass_in_ranges(engine, range_size: int, providers: int) -> tuple[int, float, float]:
    """(ranges, total seconds, longest range's seconds) of a full pass writing every provider,
    range after range as the nightly job's tasks run them."""
    from domain import stats

    reset_every_provider(engine)
    with engine.connect() as conn:
        ranges = stats.provider_ranges(conn, range_size)
    took = []
    with engine.connect() as conn:
        for first, last in ranges:
            start = time.perf_counter()
            changed = stats.full_pass_range(conn, first=first, last=last, batch_size=1000).changed
            took.append(time.perf_counter() - start)
            providers -= changed
    assert providers == 0, f"{providers} providers left unchanged"
    return len(ranges), sum(took), max(took)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()

    from domain import stats
    from models.db import get_engine, session_scope
    from models.migrate import create_app_tables_if_absent, upgrade
    from harness.services import test_services

    with tempfile.TemporaryDirectory(prefix="mw-stats-bench-") as work, test_services(Path(work)) as (db, _):
        create_app_tables_if_absent(db)
        upgrade(db)
        url = "postgresql+psycopg://" + db.split("://", 1)[1]
        start = time.perf_counter()
        sizes = generate(db, args.scale)
        print(f"generated {sizes} in {time.perf_counter() - start:.1f} s")
        engine = get_engine(url)

        def floor():
            with engine.connect() as conn:
                conn.exec_driver_sql(FLOOR).all()

        floor()  # warm the cache
        floor_s = best_of(3, floor)

        # The same floor when every provider's stats change: that one statement, writing them.
        with engine.begin() as conn:
            start = time.perf_counter()
            conn.exec_driver_sql(WRITE_FLOOR)
            write_floor_s = time.perf_counter() - start
        reset_every_provider(engine)

        batch_ends = [time.perf_counter()]
        with engine.connect() as conn:
            first = stats.full_pass(
                conn, batch_size=1000, on_changes=lambda changes: batch_ends.append(time.perf_counter()))
        first_s = time.perf_counter() - batch_ends[0]
        assert first.changed == sizes["providers"], first
        # From the end of one batch to the end of the next: an upper bound of a batch transaction.
        longest_batch = max((b - a for a, b in zip(batch_ends[1:], batch_ends[2:])), default=0)

        def steady_full():
            with engine.connect() as conn:
                assert stats.full_pass(conn, batch_size=1000).changed == 0

        steady_s = best_of(3, steady_full)

        print(f"\nfloor: one aggregate query over {sizes['providers']} providers      {floor_s * 1000:7.0f} ms")
        print(f"full pass, nothing changes (best of 3)             {steady_s * 1000:7.0f} ms"
              f"   {steady_s / floor_s:.2f}x floor   (goal <= 1.5x)")
        print(f"full pass, every provider changes ({first.batches} batches)    {first_s * 1000:7.0f} ms"
              f"   {first_s / floor_s:.2f}x floor   (goal <= 1.5x)")
        print(f"  floor with writes: one UPDATE ... FROM (aggregate) {write_floor_s * 1000:7.0f} ms"
              f"   full pass = {first_s / write_floor_s:.2f}x that")
        print(f"  longest batch transaction (rows of providers locked) {longest_batch * 1000:5.1f} ms")
        from config import Settings

        for range_size in (Settings.model_fields["stats_full_range_size"].default, 5_000, 2_000):
            ranges, total_s, longest_s = full_pass_in_ranges(engine, range_size, sizes["providers"])
            tasks = f"{ranges} task" + ("s" if ranges > 1 else "")
            print(f"  in ranges of {range_size:,} providers ({tasks})   {total_s * 1000:7.0f} ms"
                  f"   {total_s / floor_s:.2f}x floor, longest task {longest_s * 1000:.0f} ms")

        start = time.perf_counter()
        with session_scope(url) as session:
            first_incremental = stats.incremental_pass(session, overlap=timedelta(0))
        print(f"first incremental pass (no watermark yet: every provider with a listing or review)"
              f" {(time.perf_counter() - start) * 1000:.0f} ms, {first_incremental.recomputed} providers")
        rng = random.Random(1)
        report_incremental(url, rng, sizes["providers"], "")
        with engine.begin() as conn:
            conn.exec_driver_sql(APP_INDEXES)
        report_incremental(url, rng, sizes["providers"], " [with the indexes the app could add]")

        with engine.begin() as conn:
            conn.exec_driver_sql(RESET)  # the worst case: every provider changes
        before, peak = full_pass_rss(url)
        print(f"full pass process RSS: {before / 1024:.0f} MiB before the pass, peak {peak / 1024:.0f} MiB"
              "   (goal < 200 MB)")
        from models.db import dispose_engines

        dispose_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
