"""Invoice poll cost against table size: it must follow what changed, not the table.

    python -m benchmarks.poll_bench [--sizes 1000000 100000] [--changed 1000]
                                    [--open 100000 1000] [--due 100] [--part changes|reads|both]

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

Part two (`reads`): the Stripe reads of a run must follow what is due, not how many Stripe
invoices are open. For each `--open` count it seeds that many open Stripe-backed invoices with
no news from Stripe, on the to-do list as earlier runs left them, `--due` of them due now and
the rest later, and serves the due ones from the fake Stripe API (harness/stripe_server.py,
through the real SDK). One poll run reads them (nothing else changed); printed per count: time,
statements, Stripe calls; then the ratios of the largest count to the smallest.
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
    from harness.services import scratch_database

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
            assert idle.created == idle.advanced == 0, idle.counts()
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
        return {"size": size, "seconds": elapsed, "statements": len(timings), "result": result.counts(),
                "seed_seconds": seeded, "plan": plan, "idle_seconds": idle_seconds, "invoices": invoices,
                "sql_seconds": sum(t for t, _ in timings), "slowest": sorted(timings, reverse=True)[:3]}


READS_SEED_SQL = [
    SEED_SQL[0],
    SEED_SQL[1],
    # Open invoices collected through Stripe, no event for 7 hours (past POLL_STALE_AFTER_SECONDS).
    """
    INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "isMarketplaceInvoice",
                           "marketplaceInvoiceType", "clientUserId", "marketplaceProviderId", description,
                           "stripeInvoiceId", "issuedAt", "createdAt", "updatedAt")
    SELECT 'S-' || g, 'open', 10000, true, 'service', 'bench-user-' || (:providers + 1 + g % :providers),
           1 + g % :providers, 'Service ' || g, 'in_bench' || lpad(g::text, 16, '0'), t.at, t.at, t.at
    FROM generate_series(1, :invoices) g
    CROSS JOIN LATERAL (SELECT (now() AT TIME ZONE 'UTC') - interval '7 hours' AS at) t
    """,
    SEED_SQL[3],
    SEED_SQL[4],
    SEED_SQL[5],
    # The to-do list as earlier runs left it: `due` invoices due now, the others within hours.
    """
    INSERT INTO marketplace_worker.stripe_invoice_reads (invoice_id, stripe_invoice_id, reason, due_at)
    SELECT id, "stripeInvoiceId", 'stale',
           CASE WHEN id <= :due THEN now() - interval '1 minute'
                ELSE now() + make_interval(secs => 60 + id % 18000) END
    FROM "Invoice"
    """,
]


def measure_reads(server_env: dict[str, str], open_count: int, due: int) -> dict:
    from harness import stripe_events as se
    from harness.services import scratch_database
    from harness.stripe_server import FakeStripe, serve

    fake = FakeStripe()
    with scratch_database(server_env["DATABASE_URL"], prefix="mw_pollbench") as url, serve(fake) as api:
        os.environ.update({"DATABASE_URL": url, "STRIPE_API_KEY": "sk_test_pollbench", "STRIPE_API_BASE": api})
        from config import get_settings
        from domain import polling
        from domain.stripe_api import get_client
        from models.db import dispose_engines, get_engine, session_scope
        from models.migrate import create_app_tables_if_absent, upgrade

        get_settings.cache_clear()
        settings = get_settings().model_copy(update={"poll_stripe_reads_per_run": due,
                                                     "stripe_rate_limit_per_s": 10_000.0})
        create_app_tables_if_absent(settings.database_url)
        upgrade(settings.database_url)
        engine = get_engine()
        with engine.begin() as conn:
            for sql in READS_SEED_SQL:
                conn.execute(text(sql), {"providers": N_PROVIDERS, "invoices": open_count, "due": due})
            due_ids = conn.execute(text(
                'SELECT id, "stripeInvoiceId" FROM "Invoice" WHERE id <= :due ORDER BY id'), {"due": due}).all()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        for invoice_id, stripe_id in due_ids:
            fake.add("invoices", se.invoice(id=stripe_id, app_invoice_id=str(invoice_id), status="open"))
        client = get_client(settings)
        statements = 0

        def count(*_args) -> None:
            nonlocal statements
            statements += 1

        event.listen(engine, "after_cursor_execute", count)
        started = time.perf_counter()
        result = polling.poll_invoices(session_scope, client, settings)
        elapsed = time.perf_counter() - started
        event.remove(engine, "after_cursor_execute", count)
        dispose_engines()
        get_settings.cache_clear()
        return {"open": open_count, "seconds": elapsed, "statements": statements, "result": result.counts(),
                "calls": fake.call_count()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--changed", type=int, default=1_000)
    parser.add_argument("--open", type=int, nargs="+", default=[100_000, 1_000])
    parser.add_argument("--due", type=int, default=100)
    parser.add_argument("--part", choices=("changes", "reads", "both"), default="both")
    args = parser.parse_args(argv)

    from harness.services import test_services

    with tempfile.TemporaryDirectory(prefix="mw-pollbench-") as tmp, test_services(Path(tmp)) as (db_url, redis):
        # test_services made a scratch database beside the server's; each size gets its own.
        env = {"DATABASE_URL": db_url, "REDIS_URL": redis}
        os.environ.update(env)
        os.environ.pop("STRIPE_API_KEY", None)
        runs = [measure(env, Path(tmp), size, args.changed) for size in args.sizes] \
            if args.part != "reads" else []
        reads = [measure_reads(env, count, args.due) for count in args.open] if args.part != "changes" else []

    for run in runs:
        print(f"{run['invoices']:>10,} invoices, {args.changed:,} changed: poll {run['seconds'] * 1000:8.1f} ms "
              f"({run['sql_seconds'] * 1000:.1f} ms in SQL), {run['statements']:>5} statements  {run['result']}"
              f"  [idle run {run['idle_seconds'] * 1000:.1f} ms; seeded in {run['seed_seconds']:.0f} s]")
        for seconds, statement in run["slowest"]:
            print(f"            {seconds * 1000:7.1f} ms  {statement[:110]}")
        print("            page query plan: " + " / ".join(line.strip() for line in run["plan"]))
    if runs:
        big, small = max(runs, key=lambda r: r["size"]), min(runs, key=lambda r: r["size"])
        if big is not small:
            print(f"ratio {big['size'] // small['size']}x invoices: time x{big['seconds'] / small['seconds']:.2f}, "
                  f"time in SQL x{big['sql_seconds'] / small['sql_seconds']:.2f}, "
                  f"statements x{big['statements'] / small['statements']:.2f}")
    for run in reads:
        print(f"{run['open']:>10,} open Stripe invoices, {args.due} due: poll {run['seconds'] * 1000:8.1f} ms, "
              f"{run['statements']:>5} statements, {run['calls']} Stripe calls  {run['result']}")
    if len(reads) > 1:
        big, small = max(reads, key=lambda r: r["open"]), min(reads, key=lambda r: r["open"])
        print(f"ratio {big['open'] // small['open']}x open invoices: time x{big['seconds'] / small['seconds']:.2f}, "
              f"statements x{big['statements'] / small['statements']:.2f}, "
              f"Stripe calls x{big['calls'] / small['calls']:.2f}")


if __name__ == "__main__":
    main()
