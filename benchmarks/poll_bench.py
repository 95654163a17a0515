"""Invoice poll cost against table size: it must follow what changed, not the table.

    python -m benchmarks.poll_bench [--sizes 1000000 100000] [--changed 1000]

Uses the Postgres named by DATABASE_URL (a scratch database per size, dropped afterwards),
else an embedded one. For each size it seeds that many marketplace invoices (and their
transactions, as a worker that has been running would have) with INSERT ... SELECT
generate_series, all last changed 30 days ago, sets the poll watermarks as if the previous
run had just finished, then changes `--changed` invoices: half are existing open invoices the
app marks paid (manual payments), half are new invoices without a transaction. One poll run
follows (Stripe reads off: no API key). Printed per size: the run's wall time and time in
SQL, the statements it issued (counted on the engine, before/after_cursor_execute) and the
slowest three, what it did, and the plan of its page query; then the ratios of the largest
size to the smallest. Cost that
follows the change gives ratios near 1, not the ratio of the sizes. Two idle runs (nothing
changed) before the change warm the process and give the floor.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sqlalchemy import event, text

N_PROVIDERS = 200

SEED_SQL = [
    # Users, providers (manual payments) and a listing each.
    """
    INSERT INTO "User" (id, email, "updatedAt")
    SELECT 'bench-user-' || g, 'bench' || g || '@example.test', now() FROM generate_series(1, :providers * 2) g
    """,
    """
    INSERT INTO marketplace.providers ("userId", "providerType", "businessName", "paymentMode", "updatedAt")
    SELECT 'bench-user-' || g, 'service_provider', 'Provider ' || g, 'manual', now()
    FROM generate_series(1, :providers) g
    """,
    # Invoices: 70% paid, 20% open, 5% draft, 5% void; all changed 30 days ago or earlier.
    """
    INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "isMarketplaceInvoice",
                           "marketplaceInvoiceType", "clientUserId", "marketplaceProviderId", description,
                           "issuedAt", "paidAt", "createdAt", "updatedAt")
    SELECT 'B-' || g, s.status, 1000 + g % 50000, true, 'service',
           'bench-user-' || (:providers + 1 + g % :providers), 1 + g % :providers, 'Service ' || g,
           t.at, CASE WHEN s.status = 'paid' THEN t.at END, t.at, t.at
    FROM generate_series(1, :invoices) g
    CROSS JOIN LATERAL (SELECT CASE WHEN g % 20 < 14 THEN 'paid' WHEN g % 20 < 18 THEN 'open'
                                    WHEN g % 20 < 19 THEN 'draft' ELSE 'void' END AS status) s
    CROSS JOIN LATERAL (SELECT (now() AT TIME ZONE 'UTC') - interval '30 days' - make_interval(secs => g) AS at) t
    """,
    # Their transactions, as earlier runs created them.
    """
    INSERT INTO marketplace.transactions ("clientUserId", "providerId", "invoiceType", "invoiceId",
        "serviceDescription", "totalCents", "platformFeeCents", "providerPayoutCents", status, "createdAt",
        "invoicedAt", "paidAt")
    SELECT i."clientUserId", i."marketplaceProviderId", 'service', i.id, i.description, i."amountCents",
           (i."amountCents" * 500 + 5000) / 10000, i."amountCents" - (i."amountCents" * 500 + 5000) / 10000,
           CASE i.status WHEN 'paid' THEN 'paid' WHEN 'open' THEN 'invoiced' WHEN 'void' THEN 'cancelled'
                         ELSE 'pending_invoice' END,
           i."createdAt", i."issuedAt", i."paidAt"
    FROM "Invoice" i
    """,
    """
    INSERT INTO marketplace_worker.invoice_transactions (invoice_id, transaction_id)
    SELECT "invoiceId", id FROM marketplace.transactions
    """,
    # The previous poll run finished just now: every status read to its end.
    """
    INSERT INTO marketplace_worker.watermarks (name, position_at, position_id)
    SELECT 'invoice_poll:' || s, (now() AT TIME ZONE 'UTC') - interval '1 second', 0
    FROM unnest(ARRAY['draft', 'open', 'paid', 'void']) s
    """,
]

CHANGE_SQL = [
    # Manual payments: the app marks open invoices paid.
    """
    UPDATE "Invoice" SET status = 'paid', "paidAt" = now() AT TIME ZONE 'UTC',
                         "amountPaidCents" = "amountCents", "updatedAt" = now() AT TIME ZONE 'UTC'
    WHERE id IN (SELECT id FROM "Invoice" WHERE status = 'open' ORDER BY id LIMIT :paid)
    """,
    # New invoices, no transaction yet.
    """
    INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "isMarketplaceInvoice", "clientUserId",
                           "marketplaceProviderId", description, "issuedAt", "updatedAt")
    SELECT 'NEW-' || g, 'open', 2500, true, 'bench-user-' || (:providers + 1), 1, 'New service ' || g,
           now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC'
    FROM generate_series(1, :new) g
    """,
]


def measure(server_env: dict[str, str], work_dir: Path, size: int, changed: int) -> dict:
    from tests.support.services import scratch_database

    with scratch_database(server_env["DATABASE_URL"], prefix="mw_pollbench") as url:
        os.environ["DATABASE_URL"] = url
        from config import get_settings
        from domain import polling
        from models.db import dispose_engines, get_engine, session_scope
        from models.migrate import create_app_tables_if_absent, upgrade

        get_settings.cache_clear()
        settings = get_settings()
        create_app_tables_if_absent(settings.database_url)
        upgrade(settings.database_url)
        engine = get_engine()
        started = time.perf_counter()
        with engine.begin() as conn:
            for sql in SEED_SQL:
                conn.execute(text(sql), {"providers": N_PROVIDERS, "invoices": size})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
            invoices = conn.execute(text('SELECT count(*) FROM "Invoice"')).scalar()
        seeded = time.perf_counter() - started
        # Idle runs first (nothing changed since the watermarks): the second one's cost is the
        # floor; the first warms the process (imports, compiled statements) so that every size
        # is measured alike.
        for _ in range(2):
            started = time.perf_counter()
            idle = polling.poll_invoices(session_scope, None, settings)
            idle_seconds = time.perf_counter() - started
            assert idle.created == idle.advanced == 0, idle.as_dict()
        with engine.begin() as conn:
            for sql in CHANGE_SQL:
                conn.execute(text(sql), {"paid": changed // 2, "new": changed - changed // 2,
                                         "providers": N_PROVIDERS})

        with engine.connect() as conn:
            plan = conn.execute(
                text("EXPLAIN " + polling._PAGE_SQL.text),
                {"status": "paid", "after_at": conn.execute(text(
                    "SELECT position_at - interval '2 minutes' FROM marketplace_worker.watermarks"
                    " WHERE name = 'invoice_poll:paid'")).scalar(),
                 "after_id": 0, "until": conn.execute(text("SELECT now() AT TIME ZONE 'UTC'")).scalar(),
                 "limit": settings.poll_batch_size},
            ).scalars().all()

        timings: list[tuple[float, str]] = []

        def before(conn, cursor, statement, *_args) -> None:
            conn.info["bench_started"] = time.perf_counter()

        def after(conn, cursor, statement, *_args) -> None:
            timings.append((time.perf_counter() - conn.info.pop("bench_started"), " ".join(statement.split())))

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        started = time.perf_counter()
        result = polling.poll_invoices(session_scope, None, settings)
        elapsed = time.perf_counter() - started
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
        dispose_engines()
        return {"size": size, "seconds": elapsed, "statements": len(timings), "result": result.as_dict(),
                "seed_seconds": seeded, "plan": plan, "idle_seconds": idle_seconds, "invoices": invoices,
                "sql_seconds": sum(t for t, _ in timings), "slowest": sorted(timings, reverse=True)[:3]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--changed", type=int, default=1_000)
    args = parser.parse_args(argv)

    from tests.support.services import test_services

    with tempfile.TemporaryDirectory(prefix="mw-pollbench-") as tmp, test_services(Path(tmp)) as (db_url, redis):
        # test_services made a scratch database beside the server's; each size gets its own.
        env = {"DATABASE_URL": db_url, "REDIS_URL": redis}
        os.environ.update(env)
        os.environ.pop("STRIPE_API_KEY", None)
        runs = [measure(env, Path(tmp), size, args.changed) for size in args.sizes]

    for run in runs:
        print(f"{run['invoices']:>10,} invoices, {args.changed:,} changed: poll {run['seconds'] * 1000:8.1f} ms "
              f"({run['sql_seconds'] * 1000:.1f} ms in SQL), {run['statements']:>5} statements  {run['result']}"
              f"  [idle run {run['idle_seconds'] * 1000:.1f} ms; seeded in {run['seed_seconds']:.0f} s]")
        for seconds, statement in run["slowest"]:
            print(f"            {seconds * 1000:7.1f} ms  {statement[:110]}")
        print("            page query plan: " + " / ".join(line.strip() for line in run["plan"]))
    big, small = max(runs, key=lambda r: r["size"]), min(runs, key=lambda r: r["size"])
    if big is not small:
        print(f"ratio {big['size'] // small['size']}x invoices: time x{big['seconds'] / small['seconds']:.2f}, "
              f"time in SQL x{big['sql_seconds'] / small['sql_seconds']:.2f}, "
              f"statements x{big['statements'] / small['statements']:.2f}")


if __name__ == "__main__":
    main()
