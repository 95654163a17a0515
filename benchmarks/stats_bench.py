"""Provider stats at scale: the full pass as the workers run it, against a hand-written aggregate.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m benchmarks.stats_bench \
        [--scale 1 10] [--case few|all|both] [--repeat 3] [--incremental]

Uses the Postgres named by DATABASE_URL (a scratch database per scale is created and
dropped), else an embedded one. At scale 1 it generates, with INSERT ... SELECT
generate_series, 20,000 providers, 60,000 listings (10% soft-deleted), 2,000,000 transactions
(all statuses, 2% of the paid/completed ones partly refunded) and 400,000 reviews (5%
soft-deleted), plus the users and invoices their foreign keys need; scale 10 is ten times
that (about 5 GB with indexes; the app's secondary indexes are built after the rows, as a
restore would, which keeps the load to minutes). For each scale it prints:

- the floor: one hand-written aggregate query computing the four stats of every provider,
  fetched (best of --repeat, warm cache); the same at the work_mem the pass's stage sets
  (the server's default makes its hash aggregates spill from about 20,000 providers on, so
  each ratio is printed against both); and the aggregate written into every provider by one
  UPDATE ... FROM (the floor with writes, for reference);
- the full pass as the workers run it: the nightly job's stage (one aggregate, the changed
  providers kept) and then one range task per STATS_FULL_RANGE_SIZE providers (its
  default), each on its own connection, one after the other; its ratio to the floor, when a
  few providers change (100, the usual night; best of --repeat) and when every provider
  changes (their stored stats zeroed first; one run per repeat), with the stage's share and
  the longest range task;
- the peak RSS of the process running the pass (a subprocess running the every-provider
  case, imports and connection included), next to its RSS before the pass: the pass keeps
  its rows in the database, so this stays flat from scale 1 to 10;
- with --incremental, the incremental pass: first (no watermark yet), then for 100 providers
  touched by the worker and 100 by the app, with and without the indexes the app could add.

Ratios compare figures measured in the same run, on a machine whose load varies: compare
them, not the times, between runs.
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


# The app's secondary indexes on the big tables: dropped while the rows are generated and
# built afterwards (far faster than maintaining them row by row), as a restore does.
SECONDARY_INDEXES = """
SELECT format('DROP INDEX %I.%I', schemaname, indexname), indexdef
FROM pg_indexes
WHERE schemaname = 'marketplace' AND tablename IN ('transactions', 'reviews', 'service_listings')
  AND indexname NOT IN (SELECT conname FROM pg_constraint)
"""


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
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '1GB'")
        indexes = conn.execute(SECONDARY_INDEXES).fetchall()
        for drop, _ in indexes:
            conn.execute(drop)
        conn.execute(sql)
        for _, create in indexes:
            conn.execute(create)
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return sizes


def run_pass(url: str) -> None:
    """The full pass as the nightly job runs it: the job's stage, then each range task on its
    own connection (benchmarks and tasks alike: no row comes back to Python)."""
    from config import Settings
    from domain import stats
    from models.db import get_engine

    engine = get_engine(url)
    with engine.connect() as connection:
        stats.stage_full_pass(connection)
        with connection.begin():
            ranges = stats.provider_ranges(connection, Settings.model_fields["stats_full_range_size"].default)
    for first, last in ranges:
        with engine.connect() as connection:
            stats.full_pass_range(connection, first=first, last=last, batch_size=1000)


def timed_pass(url: str) -> dict:
    """The full pass as `run_pass`, timed: total, the stage, the longest range task, ranges,
    providers written."""
    from config import Settings
    from domain import stats
    from models.db import get_engine

    engine = get_engine(url)
    start = time.perf_counter()
    with engine.connect() as connection:
        staged = stats.stage_full_pass(connection)
        with connection.begin():
            ranges = stats.provider_ranges(connection, Settings.model_fields["stats_full_range_size"].default)
    stage_s = time.perf_counter() - start
    longest, changed = 0.0, 0
    for first, last in ranges:
        range_start = time.perf_counter()
        with engine.connect() as connection:
            changed += stats.full_pass_range(connection, first=first, last=last, batch_size=1000).changed
        longest = max(longest, time.perf_counter() - range_start)
    return {"seconds": time.perf_counter() - start, "stage": stage_s, "longest_range": longest,
            "ranges": len(ranges), "staged": staged.staged, "changed": changed}


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB. Linux's VmHWM, not getrusage's ru_maxrss: a process
    started by fork and exec keeps in ru_maxrss the peak of the parent it was forked from
    (here the benchmark, which fetched the floor's rows)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def full_pass_rss(url: str) -> dict:
    """`timed_pass` in a fresh process, with its RSS (KiB) before the pass and at its peak."""
    code = (
        "import json, sys\n"
        "from benchmarks.stats_bench import peak_rss_kib, timed_pass\n"
        "from models.db import get_engine\n"
        "with get_engine(sys.argv[1]).connect() as c: c.exec_driver_sql('SELECT 1')\n"
        "before = peak_rss_kib()\n"
        "result = timed_pass(sys.argv[1])\n"
        "result.update(before=before, peak=peak_rss_kib())\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, url], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reset_providers(engine, ids: list[int] | None = None) -> None:
    """The stored stats of these providers (every one when None) to zero: the next full pass
    writes them."""
    where = "" if ids is None else f" WHERE id = ANY(ARRAY{ids}::integer[])"
    with engine.connect() as conn:
        conn.exec_driver_sql(RESET + where)
        conn.commit()
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM marketplace.providers")


def bench_scale(scale: float, cases: list[str], repeat: int, incremental: bool) -> dict:
    from domain import stats
    from harness.services import test_services
    from models.db import dispose_engines, get_engine, session_scope
    from models.migrate import create_app_tables_if_absent, upgrade

    figures = {"scale": scale}
    with tempfile.TemporaryDirectory(prefix="mw-stats-bench-") as work, test_services(Path(work)) as (db, _):
        create_app_tables_if_absent(db)
        upgrade(db)
        url = "postgresql+psycopg://" + db.split("://", 1)[1]
        start = time.perf_counter()
        sizes = generate(db, scale)
        print(f"\n== scale {scale:g}: generated {sizes} in {time.perf_counter() - start:.0f} s", flush=True)
        engine = get_engine(url)
        providers = sizes["providers"]

        def floor(work_mem: str | None = None):
            with engine.connect() as conn:
                if work_mem is not None:
                    conn.exec_driver_sql(f"SET work_mem = '{work_mem}'")
                conn.exec_driver_sql(FLOOR).all()

        floor()  # warm the cache
        floor_s = best_of(repeat, floor)
        # The pass's stage gives its aggregate more memory than the server's default work_mem
        # (at which the floor's hash aggregates spill to disk from about 20,000 providers on):
        # the floor again with the same, so that the ratio does not come from that setting.
        tuned_s = best_of(repeat, lambda: floor(stats.STAGE_WORK_MEM))
        with engine.begin() as conn:
            start = time.perf_counter()
            conn.exec_driver_sql(WRITE_FLOOR)
            write_floor_s = time.perf_counter() - start
        figures.update(floor=floor_s, tuned_floor=tuned_s, write_floor=write_floor_s)
        print(f"floor: one aggregate query over {providers:,} providers  {floor_s * 1000:8.0f} ms")
        print(f"  the same at the stage's work_mem ({stats.STAGE_WORK_MEM})          {tuned_s * 1000:8.0f} ms"
              f"   {tuned_s / floor_s:.2f}x floor")
        print(f"  with writes: one UPDATE ... FROM (aggregate), every provider {write_floor_s * 1000:8.0f} ms"
              f"   {write_floor_s / floor_s:.2f}x floor", flush=True)

        def show(case: str, label: str, runs: list[dict]) -> None:
            best = min(runs, key=lambda run: run["seconds"])
            figures[case] = best["seconds"] / floor_s
            figures[case + "_tuned"] = best["seconds"] / tuned_s
            print(f"full pass, {label:<36} {best['seconds'] * 1000:8.0f} ms   {best['seconds'] / floor_s:.2f}x floor,"
                  f" {best['seconds'] / tuned_s:.2f}x the floor at {stats.STAGE_WORK_MEM}"
                  f"   (goal <= 1.5x; best of {len(runs)})")
            print(f"  stage {best['stage'] * 1000:.0f} ms ({best['staged']:,} staged), then {best['ranges']} range"
                  f" task(s), longest {best['longest_range'] * 1000:.0f} ms, {best['changed']:,} written", flush=True)

        rng = random.Random(1)
        timed_pass(url)  # stored stats right: every later run writes what it set up only
        if "few" in cases:
            runs = []
            for _ in range(repeat):
                reset_providers(engine, sorted(rng.sample(range(1, providers + 1), min(100, providers))))
                runs.append(timed_pass(url))
                assert runs[-1]["changed"] == min(100, providers), runs[-1]
            show("few", "100 providers change (usual night)", runs)
        if "all" in cases:
            runs = []
            for _ in range(repeat):
                reset_providers(engine)
                runs.append(full_pass_rss(url))
                assert runs[-1]["changed"] == providers, runs[-1]
            show("all", "every provider changes", runs)
            before = max(run["before"] for run in runs) / 1024
            peak = max(run["peak"] for run in runs) / 1024
            figures["rss"] = peak
            print(f"  process running it: RSS {before:.0f} MiB before the pass, peak {peak:.0f} MiB", flush=True)

        if incremental:
            start = time.perf_counter()
            with session_scope(url) as session:
                first_incremental = stats.incremental_pass(session, overlap=timedelta(0))
            print(f"first incremental pass (no watermark yet: every provider with a listing or review)"
                  f" {(time.perf_counter() - start) * 1000:.0f} ms, {first_incremental.recomputed} providers")
            report_incremental(url, rng, providers, "")
            with engine.begin() as conn:
                conn.exec_driver_sql(APP_INDEXES)
            report_incremental(url, rng, providers, " [with the indexes the app could add]")
        dispose_engines()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0],
                        help="one run per scale, each on its own data (scale 1: 20,000 providers)")
    parser.add_argument("--case", choices=("few", "all", "both"), default="both",
                        help="100 providers change, every provider changes, or both")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measure (the best is kept)")
    parser.add_argument("--incremental", action="store_true", help="also time the incremental pass")
    args = parser.parse_args()
    cases = ["few", "all"] if args.case == "both" else [args.case]

    results = [bench_scale(scale, cases, args.repeat, args.incremental) for scale in args.scale]
    if len(results) > 1:
        print("\nsummary (ratios to the floor of the same scale; in brackets, to the floor at the stage's work_mem)")
        for figures in results:
            line = f"  scale {figures['scale']:>4g}:"
            if "few" in figures:
                line += f" 100 change {figures['few']:.2f}x ({figures['few_tuned']:.2f}x),"
            if "all" in figures:
                line += (f" all change {figures['all']:.2f}x ({figures['all_tuned']:.2f}x),"
                         f" peak RSS {figures['rss']:.0f} MiB,")
            print(line + f" floor with writes {figures['write_floor'] / figures['floor']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
