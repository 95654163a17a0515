"""Webhook receiver throughput, and end-to-end processing time.

    python -m benchmarks.receiver_bench [--events 20000] [--processes 2] [--workers 2]
    python -m benchmarks.receiver_bench --e2e [--events 20000] [--workers 2] [--order created|interleaved]
    python -m benchmarks.receiver_bench --peer [--events 20000]

Uses the Postgres and Redis named by DATABASE_URL / REDIS_URL (a scratch
database is created and dropped), else embedded ones. Needs `wrk` (Debian
package `wrk`): it POSTs pre-signed, distinct events over keep-alive
connections, costing little CPU itself. Bodies are what Stripe sends: the
objects' full set of fields (`stripe_sized`), pretty-printed
(harness/stripe_events.py `encode`); their sizes are printed.

Default: for a receiver of 1 and of `--processes` processes, at concurrency 16
and 64, accepted events/s, p50/p99 latency, events per commit (each process has
its own group commit), and the events found in the inbox afterwards; next to
them, measured in the same run, the bare rate of the same inbox INSERTs issued
straight to Postgres by one client, one commit per event (the ceiling a
receiver without group commit faces). Then end to end on `invoice.finalized`
events: the time from the first POST until every event is processed by
`--workers` Celery worker processes (`-c 2` each, as docker-compose.yml runs them).

`--e2e`: end to end on a marketplace's mix instead: invoices of providers of
the three payment modes (manual, stripe, stripe_connect) finalized and paid,
partly and fully refunded, disputed (lost and won), voided, and the connected
accounts' payouts on the Connect endpoint; and, in the same run as the
baseline, the same events about invoices the app does not have (little work).
Prints events/s, CPU per event (workers, receiver, the database's backends),
p99 processing lag (received_at to processed_at), the ratios, and checks every
event processed, none parked, and the transactions' statuses against the plan.
Deliveries go in Stripe's order (by creation: an invoice's burst of events
together); `--order interleaved` spreads one invoice's events among 64 others'.

`--peer`: our receiver and @supabase/stripe-sync-engine (benchmarks/peer.py,
Node 20+) in turn, three rounds at c64 on the same bodies: events/s and p99,
and the ratios (median of the rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import psycopg

from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from harness import stripe_events as se
from harness.flow import ReceiverProcess
from harness.services import test_services
from harness.workers import WorkerProcess

SECRET = "whsec_benchmark_secret_0123456789"
CONNECT_SECRET = "whsec_benchmark_connect_0123456789"
PLATFORM_PATH, CONNECT_PATH = "/webhooks/stripe", "/webhooks/stripe/connect"

# One delivery a line: path, signature, body. A pretty-printed body's newlines are written as
# \x01 (JSON text never holds a raw control character) and restored by the script.
WRK_SCRIPT = textwrap.dedent(
    """
    local counter = 0
    local threads = {}
    function setup(thread)
      thread:set("id", counter)
      counter = counter + 1
      table.insert(threads, thread)
    end
    function init(args)
      paths, bodies, sigs = {}, {}, {}
      local n = 0
      for line in io.lines(args[1]) do
        if n % tonumber(args[2]) == id then
          local tab1 = line:find("\\t")
          local tab2 = line:find("\\t", tab1 + 1)
          table.insert(paths, line:sub(1, tab1 - 1))
          table.insert(sigs, line:sub(tab1 + 1, tab2 - 1))
          table.insert(bodies, (line:sub(tab2 + 1):gsub("\\1", "\\n")))
        end
        n = n + 1
      end
      -- wrk calls thread 0's request() once to check the script, before sending anything:
      -- that call gets a health check, so the first body is not spent on it.
      sent = (id == 0) and -1 or 0
      answered, failed = 0, 0
    end
    function delay()
      -- Once a thread's bodies are all out, its connections idle on a slow health check
      -- until the last answer arrives, so fast health checks do not flood the latencies.
      if sent >= #bodies then return 1000 end
      return 0
    end
    function request()
      sent = sent + 1
      if sent < 1 or sent > #bodies then
        return wrk.format("GET", "/healthz")
      end
      return wrk.format("POST", paths[sent],
        {["Content-Type"] = "application/json; charset=utf-8", ["Stripe-Signature"] = sigs[sent]}, bodies[sent])
    end
    function response(status, headers, body)
      if body:find('"status":"ok"', 1, true) or body:find('"ok":true', 1, true) then return end  -- health checks
      answered = answered + 1
      if status ~= 200 then failed = failed + 1 end
      if answered >= #bodies then wrk.thread:stop() end
    end
    function done(summary, latency, requests)
      local f, a = 0, 0
      for _, t in ipairs(threads) do
        f = f + t:get("failed")
        a = a + t:get("answered")
      end
      io.write(string.format("RESULT p50_us=%d p99_us=%d non200=%d accepted=%d requests=%d\\n",
        latency:percentile(50), latency:percentile(99), f, a - f, summary.requests))
    end
    """
)


# Stripe's objects carry many more fields than the worker reads; the harness builds the ones
# it reads. These fill in the rest with their usual values (empty, null or a typical value),
# so a body weighs what Stripe sends: an invoice event ~9 KB pretty-printed.
_ADDRESS = {"city": "San Francisco", "country": "US", "line1": "510 Townsend Street", "line2": "Suite 300",
            "postal_code": "94103", "state": "CA"}
_INVOICE = {
    "account_tax_ids": None, "application": None, "automatic_tax": {
        "disabled_reason": None, "enabled": False, "liability": None, "provider": None, "status": None},
    "automatically_finalizes_at": None, "confirmation_secret": None, "custom_fields": None,
    "customer_address": _ADDRESS, "customer_email": "jenny.rosen@example.com", "customer_name": "Jenny Rosen",
    "customer_phone": "+14155550123", "customer_shipping": {"address": _ADDRESS, "name": "Jenny Rosen",
                                                            "phone": "+14155550123"},
    "customer_tax_exempt": "none", "customer_tax_ids": [], "default_payment_method": None,
    "default_source": None, "default_tax_rates": [], "discounts": [], "ending_balance": 0, "footer": None,
    "from_invoice": None, "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1Nv0FGQ9RKHgCVdK/"
    "test_YWNjdF8xTnYwRkdROVJLSGdDVmRLLF9QbkVHbnZ0aVhBcGRhZlR0TVJ6dUJ3UVRrd1NvZ2F0LDkzNDU0OTk20200Jf7VTdr7",
    "invoice_pdf": "https://pay.stripe.com/invoice/acct_1Nv0FGQ9RKHgCVdK/test_YWNjdF8xTnYwRkdROVJLSGdDVmRLLF9Q"
    "bkVHbnZ0aVhBcGRhZlR0TVJ6dUJ3UVRrd1NvZ2F0LDkzNDU0OTk20200Jf7VTdr7/pdf?s=ap",
    "issuer": {"type": "self"}, "latest_revision": None, "payment_settings": {
        "default_mandate": None, "payment_method_options": {
            "acss_debit": None, "bancontact": None, "card": {"request_three_d_secure": "automatic"},
            "customer_balance": None, "konbini": None, "sepa_debit": None, "us_bank_account": None},
        "payment_method_types": None},
    "post_payment_credit_notes_amount": 0, "pre_payment_credit_notes_amount": 0, "receipt_number": None,
    "rendering": {"amount_tax_display": None, "pdf": {"page_size": "auto"}, "template": None,
                  "template_version": None},
    "shipping_cost": None, "shipping_details": None, "starting_balance": 0, "statement_descriptor": None,
    "subscription": None, "subtotal_excluding_tax": None, "test_clock": None, "threshold_reason": None,
    "total_discount_amounts": [], "total_excluding_tax": None, "total_pretax_credit_amounts": [],
    "total_taxes": [], "webhooks_delivered_at": None,
}
_LINE = {
    "discount_amounts": [], "discountable": True, "discounts": [], "metadata": {}, "parent": {
        "invoice_item_details": {"credited_items": None, "invoice_item": "ii_1QpX2oQ9RKHgCVdKa8wVvBZc",
                                 "proration": False, "proration_details": {"credited_items": None},
                                 "subscription": None},
        "subscription_item_details": None, "type": "invoice_item_details"},
    "period": {"end": 1738339200, "start": 1738339200},
    "pretax_credit_amounts": [], "pricing": {
        "price_details": {"price": "price_1QpX2nQ9RKHgCVdKQ5y9n6Ch", "product": "prod_RioFZlJ1j6rH0s"},
        "type": "price_details", "unit_amount_decimal": "10000"},
    "subscription": None, "taxes": [],
}
_CHARGE = {
    "billing_details": {"address": _ADDRESS, "email": "jenny.rosen@example.com", "name": "Jenny Rosen",
                        "phone": None, "tax_id": None},
    "calculated_statement_descriptor": "MARKETPLACE", "fraud_details": {}, "payment_method":
    "pm_1QpX2oQ9RKHgCVdKHh9yYw1b", "payment_method_details": {"card": {
        "amount_authorized": None, "authorization_code": None, "brand": "visa", "checks": {
            "address_line1_check": "pass", "address_postal_code_check": "pass", "cvc_check": "pass"},
        "country": "US", "exp_month": 8, "exp_year": 2027, "extended_authorization": {"status": "disabled"},
        "fingerprint": "Xt5EWLLDS7FJjR1c", "funding": "credit", "incremental_authorization": {
            "status": "unavailable"}, "installments": None, "last4": "4242", "mandate": None,
        "multicapture": {"status": "unavailable"}, "network": "visa", "network_token": {"used": False},
        "overcapture": {"maximum_amount_capturable": 0, "status": "unavailable"}, "regulated_status":
        "unregulated", "three_d_secure": None, "wallet": None}, "type": "card"},
    "radar_options": {}, "receipt_email": None, "receipt_number": None, "receipt_url":
    "https://pay.stripe.com/receipts/invoices/CAcaFwoVYWNjdF8xTnYwRkdROVJLSGdDVmRLKJf7vL0GMgY9jGnvzXs6LBZ?s=ap",
    "review": None, "shipping": None, "source": None, "statement_descriptor": None,
    "statement_descriptor_suffix": None,
}


def stripe_sized(event: dict) -> dict:
    """`event` with its object's remaining fields filled in, as Stripe sends it (in place)."""
    obj = event["data"]["object"]
    extra = {"invoice": _INVOICE, "charge": _CHARGE}.get(obj.get("object"), {})
    for key, value in extra.items():
        obj.setdefault(key, value)
    if obj.get("object") == "invoice":
        for line in obj.get("lines", {}).get("data", []):
            for key, value in _LINE.items():
                line.setdefault(key, value)
    return event


def _split_lines(invoice: dict) -> None:
    """An invoice of three lines (the service, a fee, an add-on) adding up to its total, as a
    marketplace order usually has."""
    lines = invoice.get("lines", {}).get("data", [])
    if len(lines) != 1:
        return
    first, amount = lines[0], lines[0]["amount"]
    parts = [amount - 2 * (amount // 4), amount // 4, amount // 4]
    invoice["lines"]["data"] = [dict(first, id=f"{first['id']}{n or ''}", amount=part) for n, part in enumerate(parts)]
    invoice["lines"]["total_count"] = 3


def stripe_body(event: dict) -> bytes:
    """The event's body as Stripe sends it: its object's full fields, pretty-printed."""
    if event["data"]["object"].get("object") == "invoice":
        _split_lines(event["data"]["object"])
    return se.encode(stripe_sized(event))


def delivery(event: dict, path: str = PLATFORM_PATH, now: int | None = None) -> str:
    """One line of the wrk script's file: the event's Stripe body, signed."""
    body = stripe_body(event)
    now = now or int(time.time())
    secret = CONNECT_SECRET if path == CONNECT_PATH else SECRET
    return f"{path}\t{se.sign(body, secret, now)}\t{body.decode().replace(chr(10), chr(1))}"


def body_of(line: str) -> str:
    return line.split("\t", 2)[2].replace("\x01", "\n")


def describe_sizes(lines: list[str]) -> str:
    sizes = sorted(len(body_of(line).encode()) for line in lines)
    return (f"bodies {sum(sizes) / len(sizes) / 1000:.1f} KB mean, {sizes[len(sizes) // 2] / 1000:.1f} KB median, "
            f"{sizes[-1] / 1000:.1f} KB max (pretty-printed)")


def signed_lines(invoice_ids: list[int], stripe_ids: list[str]) -> list[str]:
    now = int(time.time())
    lines = []
    for app_id, stripe_id in zip(invoice_ids, stripe_ids):
        obj = se.invoice(shape="basil", id=stripe_id, app_invoice_id=str(app_id), amount=10_000,
                         status="open", include_payments=False)
        lines.append(delivery(se.event("invoice.finalized", obj, created=now), now=now))
    return lines


def seed_invoices(conninfo: str, count: int, offset: int) -> tuple[list[int], list[str]]:
    """Marketplace invoices the events are about, so the workers do real work."""
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            """
            INSERT INTO "User" (id, email, "updatedAt") VALUES ('bench-user', 'bench@example.test', now())
            ON CONFLICT DO NOTHING;
            INSERT INTO marketplace.providers ("userId", "providerType", "businessName", "updatedAt")
            SELECT 'bench-user', 'service_provider', 'Bench', now()
            WHERE NOT EXISTS (SELECT 1 FROM marketplace.providers);
            """
        )
        rows = conn.execute(
            """
            INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "stripeInvoiceId",
                "isMarketplaceInvoice", "clientUserId", "marketplaceProviderId", "updatedAt")
            SELECT 'BENCH-' || g, 'open', 10000, 'in_bench' || g, true, 'bench-user',
                   (SELECT min(id) FROM marketplace.providers), now()
            FROM generate_series(%s::int, %s::int) AS g
            RETURNING id, "stripeInvoiceId"
            """,
            (offset + 1, offset + count),
        ).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows]


def bare_insert_rate(conninfo: str, lines: list[str]) -> float:
    """One client, one INSERT and one commit per event: what each request would cost alone."""
    events = [event_from_dict(json.loads(body_of(line)), body_of(line), "platform", livemode=False)
              for line in lines]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        started = time.perf_counter()
        for event in events:
            conn.execute(INSERT_EVENTS_SQL, insert_params([event]))
        elapsed = time.perf_counter() - started
        conn.execute("DELETE FROM marketplace_worker.stripe_events WHERE endpoint = 'platform'")
    return len(events) / elapsed


# How a run's stored events are counted, and the span of their commits, where they are stored.
INBOX = (
    "SELECT count(*) FROM marketplace_worker.stripe_events",
    # A commit's rows share their received_at (now(), the transaction's start): one a commit.
    "SELECT extract(epoch FROM max(received_at) - min(received_at)), count(DISTINCT received_at) FROM "
    "(SELECT received_at FROM marketplace_worker.stripe_events ORDER BY received_at DESC LIMIT %s) t",
)
# The peer upserts each invoice event into stripe.invoices, one statement and commit each.
PEER_INVOICES = (
    "SELECT count(*) FROM stripe.invoices",
    "SELECT extract(epoch FROM max(updated_at) - min(updated_at)), count(*) FROM "
    "(SELECT updated_at FROM stripe.invoices ORDER BY updated_at DESC LIMIT %s) t",
)


def run_wrk(url: str, lines: list[str], concurrency: int, work: Path, conninfo: str, store=INBOX) -> dict:
    """POST every line once; returns when all of them are stored (`store`: INBOX, PEER_INVOICES)."""
    count_sql, span_sql = store
    data = work / f"events-{concurrency}.tsv"
    data.write_text("\n".join(lines) + "\n")
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    threads = 2
    with psycopg.connect(conninfo, autocommit=True) as watch:  # one connection for all the polling
        before = watch.execute(count_sql).fetchone()[0]
        started = time.monotonic()
        wrk = subprocess.Popen(
            ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", "600s", "--timeout", "10s",
             "-s", str(script), url, "--", str(data), str(threads)],
            stdout=subprocess.PIPE, text=True,
        )
        # wrk runs for its whole duration even when every thread has stopped: stop it (SIGINT
        # makes it print its summary) once the store has stopped growing (after wrk has read
        # its bodies and begun).
        last, still_since = 0, time.monotonic()
        while wrk.poll() is None and (time.monotonic() - still_since < 2 or
                                      (last == 0 and time.monotonic() - started < 120)):
            now_count = watch.execute(count_sql).fetchone()[0] - before
            if now_count != last:
                last, still_since = now_count, time.monotonic()
            time.sleep(0.5)  # light polling: the machine's CPU belongs to what is measured
    wrk.send_signal(signal.SIGINT)
    out = wrk.communicate(timeout=30)[0]
    result = dict(item.split("=") for item in out.split("RESULT ", 1)[1].split())
    with psycopg.connect(conninfo) as conn:
        # The server's own commit times: the rate excludes the load generator's start and stop.
        span, run_commits = conn.execute(span_sql, (last,)).fetchone()
    return {"stored": last, "seconds": float(span), "commits": run_commits, "p50_ms": int(result["p50_us"]) / 1000,
            "p99_ms": int(result["p99_us"]) / 1000, "non200": int(result["non200"]),
            "accepted": int(result["accepted"]), "requests": int(result["requests"])}


def count(conn: psycopg.Connection, where: str = "true") -> int:
    return conn.execute(f"SELECT count(*) FROM marketplace_worker.stripe_events WHERE {where}").fetchone()[0]


# --- end to end on a marketplace's mix ---------------------------------------------------------

MODES = ("manual", "stripe", "stripe_connect")
# (invoice_lifecycle's outcome, dispute outcome, the transaction's status once every event is applied)
PLAN = (
    ("paid", None, "paid"),
    ("paid", None, "paid"),
    ("paid_partial_refund", None, "paid"),
    ("paid_full_refund", None, "refunded"),
    ("paid_disputed", "lost", "refunded"),
    ("paid_disputed", "won", "paid"),
    ("void", None, "cancelled"),
    ("payment_failed_then_paid", None, "paid"),
)
PAYOUTS_PER_ACCOUNT = 4
ORDERS = ("created", "interleaved")
GROUP = 64  # invoices in progress together in the interleaved order


def seed_marketplace(conninfo: str, invoices: int, accounts: int) -> tuple[list[int], list[str], list[str]]:
    """Providers of each payment mode (`accounts` connected ones) and `invoices` draft
    marketplace invoices spread over them, known to Stripe by their `metadata.invoiceId` only
    (the mirror fills `stripeInvoiceId`). Returns the invoices' ids and modes, and the accounts."""
    connect_accounts = [f"acct_bench{n:06d}" for n in range(accounts)]
    with psycopg.connect(conninfo) as conn:
        conn.execute("""INSERT INTO "User" (id, email, "updatedAt") VALUES ('bench-client', 'client@example.test',
                        now()) ON CONFLICT DO NOTHING""")
        providers: dict[str, list[int]] = {}
        for mode in MODES:
            owners = connect_accounts if mode == "stripe_connect" else [None] * max(accounts, 1)
            providers[mode] = []
            for n, account in enumerate(owners):
                user_id = f"bench-{mode}-{n}"
                conn.execute("""INSERT INTO "User" (id, email, "updatedAt") VALUES (%s, %s, now())
                                ON CONFLICT DO NOTHING""", (user_id, f"{user_id}@example.test"))
                providers[mode].append(conn.execute(
                    """INSERT INTO marketplace.providers ("userId", "providerType", "businessName", "paymentMode",
                           "stripeConnectAccountId", "stripeConnectOnboardingComplete",
                           "stripeConnectPayoutsEnabled", "updatedAt")
                       VALUES (%s, 'service_provider', %s, %s, %s, %s, %s, now()) RETURNING id""",
                    (user_id, f"Bench {mode} {n}", mode, account, account is not None, account is not None),
                ).fetchone()[0])
        ids, modes = [], []
        for n in range(invoices):
            mode = MODES[n % len(MODES)]
            provider = providers[mode][(n // len(MODES)) % len(providers[mode])]
            ids.append(conn.execute(
                """INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "isMarketplaceInvoice",
                       "clientUserId", "marketplaceProviderId", "updatedAt")
                   VALUES (%s, 'draft', 10000, true, 'bench-client', %s, now()) RETURNING id""",
                (f"MIX-{n}-{time.monotonic_ns()}", provider),
            ).fetchone()[0])
            modes.append(mode)
    return ids, modes, connect_accounts


def marketplace_lines(invoice_ids: list[int], accounts: list[str], *, strangers: bool = False,
                      order: str = "created") -> tuple[list[str], dict[str, int]]:
    """Every invoice's timeline (PLAN, in turn) and every account's payouts, a group's timelines
    in `order` (ORDERS); and the transactions' statuses planned.
    `strangers`: invoices without the app's `metadata.invoiceId` (not the marketplace's)."""
    now = int(time.time())
    start = now - 120 * 86_400  # late enough for a dispute's close, 75 days on
    timelines: list[list[tuple[dict, str]]] = []
    expected: dict[str, int] = {}
    for n, app_id in enumerate(invoice_ids):
        outcome, dispute, status = PLAN[n % len(PLAN)]
        tl = se.invoice_lifecycle(str(app_id), 10_000, outcome=outcome, dispute_outcome=dispute, start=start + n)
        if strangers:
            for event in tl:
                if event["data"]["object"].get("object") == "invoice":
                    event["data"]["object"]["metadata"] = {}
        timelines.append([(event, PLATFORM_PATH) for event in tl])
        expected[status] = expected.get(status, 0) + 1
    for n, account in enumerate(accounts):
        for k in range(PAYOUTS_PER_ACCOUNT):
            tl = se.payout_history(account, 5_000 + k, start=start + 86_400 * (k + 1) + n)
            timelines.append([(event, CONNECT_PATH) for event in tl])
    if order == "created":
        # Stripe's order: by creation, so an invoice's burst (charge.succeeded, invoice_payment.paid,
        # invoice.paid, invoice.payment_succeeded, invoice.updated, all in one second) arrives together.
        deliveries = sorted((pair for tl in timelines for pair in tl), key=lambda pair: pair[0]["created"])
    else:
        # Adversarial: GROUP invoices advance a step at a time, so one invoice's events sit about
        # GROUP deliveries apart, in messages that workers apply side by side (row lock waits).
        timelines.sort(key=lambda tl: hash(tl[0][0]["id"]))
        deliveries = []
        for first in range(0, len(timelines), GROUP):
            group = timelines[first:first + GROUP]
            deliveries += [tl[step] for step in range(max(map(len, group))) for tl in group if step < len(tl)]
    return [delivery(event, path, now) for event, path in deliveries], expected


class ProcessCPU:
    """CPU seconds of process trees (a worker's main process and its pool), between two reads."""

    def __init__(self, pids: list[int]) -> None:
        self.roots = [psutil.Process(pid) for pid in pids]
        self.start = self._read()

    def _read(self) -> dict[int, float]:
        seen = {}
        for root in self.roots:
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    seen[proc.pid] = times.user + times.system
        return seen

    def seconds(self) -> float:
        end = self._read()
        return sum(value - self.start.get(pid, 0.0) for pid, value in end.items())


def end_to_end(receiver: ReceiverProcess, env: dict, redis_url: str, conninfo: str, lines: list[str],
               worker_count: int, work: Path, label: str) -> dict:
    """POST `lines` at c64 to a receiver whose workers wait on an empty queue; returns once every
    event is applied (or parked)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("DELETE FROM marketplace_worker.stripe_events")
        conn.execute("DELETE FROM marketplace_worker.stripe_event_ids")
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    workers = [WorkerProcess(env, work / f"worker-{label}-{i}.log", concurrency=2, log_level="WARNING")
               for i in range(worker_count)]
    for worker in workers:
        worker.start()
    try:
        cpu = ProcessCPU([w.proc.pid for w in workers])
        receiver_cpu = ProcessCPU([receiver.proc.pid])
        with psycopg.connect(conninfo, autocommit=True) as watch:
            backends = ProcessCPU(database_backends(watch))
            sent = run_wrk(receiver.url, lines, 64, work, conninfo)
            deadline = time.monotonic() + 900
            while count(watch, "status IN ('received', 'retrying')") > 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            # The workers' connections opened during the run: counted from their start.
            backends.roots += [psutil.Process(pid) for pid in database_backends(watch)
                               if pid not in {p.pid for p in backends.roots}]
            cpu_seconds, receiver_seconds, database_seconds = cpu.seconds(), receiver_cpu.seconds(), backends.seconds()
    finally:
        for worker in workers:
            worker.stop()
    with psycopg.connect(conninfo) as conn:
        # From the first event's commit to the last event's processing, as the database saw it.
        elapsed, p99_lag = conn.execute(
            "SELECT extract(epoch FROM max(processed_at) - min(received_at)),"
            " extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY processed_at - received_at))"
            " FROM marketplace_worker.stripe_events WHERE processed_at IS NOT NULL").fetchone()
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM marketplace_worker.stripe_events GROUP BY status").fetchall())
        for type, error, n in conn.execute(
                "SELECT type, left(last_error, 120), count(*) FROM marketplace_worker.stripe_events"
                " WHERE status NOT IN ('processed', 'ignored') GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 5"):
            print(f"  {label}: {n} {type} left {error}")
    events = sent["stored"]
    return {"events": events, "sent": len(lines), "seconds": float(elapsed), "rate": events / float(elapsed),
            "cpu_ms": cpu_seconds / events * 1000, "receiver_cpu_ms": receiver_seconds / events * 1000,
            "database_cpu_ms": database_seconds / events * 1000, "p99_lag_s": float(p99_lag), "statuses": statuses,
            "receiver_p99_ms": sent["p99_ms"], "non200": sent["non200"]}


def database_backends(conn: psycopg.Connection) -> list[int]:
    return [row[0] for row in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]


def transaction_statuses(conninfo: str, invoice_ids: list[int]) -> dict[str, int]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """SELECT status, count(*) FROM marketplace.transactions WHERE "invoiceId" = ANY(%s) GROUP BY status""",
            (invoice_ids,)).fetchall()
    return dict(rows)


def print_e2e(label: str, r: dict) -> None:
    print(f"{label:<13} {r['events']:6d} events in {r['seconds']:6.1f} s = {r['rate']:6.0f} events/s   "
          f"worker CPU {r['cpu_ms']:5.2f} ms/event   p99 lag {r['p99_lag_s']:6.2f} s\n"
          f"{'':14}CPU per event: receiver {r['receiver_cpu_ms']:.2f} ms, Postgres (this database's backends) "
          f"{r['database_cpu_ms']:.2f} ms; receiver p99 {r['receiver_p99_ms']:.0f} ms, non-200 {r['non200']}; "
          f"inbox {r['statuses']}")


def run_e2e(receiver: ReceiverProcess, env: dict, redis_url: str, conninfo: str, events: int, workers: int,
            work: Path, order: str) -> int:
    per_invoice = 9.6  # PLAN's events per invoice, on average, with a payout history per 25 invoices
    invoices = max(len(PLAN) * 3, int(events / per_invoice))
    accounts = max(1, invoices // 100)
    ids, modes, connect_accounts = seed_marketplace(conninfo, invoices, accounts)
    lines, expected = marketplace_lines(ids, connect_accounts, order=order)
    # The baseline: the same deliveries about invoices the app does not have (nothing to apply).
    stranger_ids = [10_000_000 + n for n in range(len(ids))]
    baseline_lines, _ = marketplace_lines(stranger_ids, [f"acct_stranger{n:06d}" for n in range(accounts)],
                                          strangers=True, order=order)
    print(f"marketplace mix: {invoices} invoices ({', '.join(f'{modes.count(m)} {m}' for m in MODES)}), "
          f"{accounts} connected accounts x {PAYOUTS_PER_ACCOUNT} payouts; {len(lines)} events; "
          f"{describe_sizes(lines)}")
    print(f"workers: {workers} processes x -c 2; wrk c64; receiver: {os.environ.get('WEBHOOK_PROCESSES', '1')} process(es)")
    base = end_to_end(receiver, env, redis_url, conninfo, baseline_lines, workers, work, "baseline")
    print_e2e("little work", base)
    real = end_to_end(receiver, env, redis_url, conninfo, lines, workers, work, "mix")
    print_e2e("marketplace", real)
    print(f"ratios (marketplace / little work): events/s {real['rate'] / base['rate']:.2f}x, "
          f"worker CPU per event {real['cpu_ms'] / base['cpu_ms']:.2f}x, p99 lag {real['p99_lag_s'] / max(base['p99_lag_s'], 1e-3):.2f}x")
    got = transaction_statuses(conninfo, ids)
    waiting = {s: n for s, n in real["statuses"].items() if s not in ("processed", "ignored")}
    ok = got == expected and not waiting and real["events"] == len(lines)
    print(f"transactions by status {dict(sorted(got.items()))} (planned {dict(sorted(expected.items()))}); "
          f"events stored {real['events']} of {len(lines)}, not processed {waiting or 0}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def compare_with_peer(receiver: ReceiverProcess, conninfo: str, events: int, work: Path, rounds: int = 3) -> None:
    """Our receiver and the peer in turn, `rounds` times at c64, on the same bodies (signed afresh
    each round, the stores emptied between rounds so every event is new to both)."""
    from benchmarks.peer import start_peer
    from worker.embedded import free_port

    now = int(time.time())
    events_ = [se.event("invoice.finalized", se.invoice(shape="basil", app_invoice_id=str(n), amount=10_000,
                                                        status="open"), created=now) for n in range(events)]
    bodies = [stripe_body(e) for e in events_]
    print(f"peer comparison: {events} invoice.finalized events, {describe_sizes(sign_all(bodies))}; c64, "
          f"{rounds} rounds in turn; our receiver: {os.environ.get('WEBHOOK_PROCESSES', '1')} process(es)")
    ours, theirs = [], []
    with start_peer(conninfo, SECRET, free_port()) as peer_url:
        peer_base = peer_url.rsplit("/webhooks/", 1)[0]
        for round_ in range(1, rounds + 1):
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("TRUNCATE marketplace_worker.stripe_event_ids, marketplace_worker.stripe_events")
            a = run_wrk(receiver.url, sign_all(bodies), 64, work, conninfo)
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("TRUNCATE stripe.invoices")
            b = run_wrk(peer_base, sign_all(bodies), 64, work, conninfo, store=PEER_INVOICES)
            for label, r, into in (("ours", a, ours), ("peer", b, theirs)):
                rate = r["stored"] / r["seconds"]
                into.append((rate, r["p99_ms"]))
                print(f"round {round_} {label}  {rate:6.0f} events/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                      f"non-200 {r['non200']}  stored {r['stored']} of {events}")
    rate_ratio = sorted(a[0] / b[0] for a, b in zip(ours, theirs))[rounds // 2]
    p99_ratio = sorted(a[1] / b[1] for a, b in zip(ours, theirs))[rounds // 2]
    print(f"ours / peer, median of {rounds} rounds: events/s {rate_ratio:.2f}x (goal >= 2x), "
          f"p99 {p99_ratio:.2f}x (goal <= 0.5x)")


def sign_all(bodies: list[bytes]) -> list[str]:
    now = int(time.time())
    return [f"{PLATFORM_PATH}\t{se.sign(body, SECRET, now)}\t{body.decode().replace(chr(10), chr(1))}"
            for body in bodies]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2, help="receiver processes, measured beside 1")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes (-c 2 each)")
    parser.add_argument("--e2e", action="store_true", help="end to end on a marketplace's mix")
    parser.add_argument("--order", choices=ORDERS, default="created", help="the mix's delivery order")
    parser.add_argument("--peer", action="store_true",
                        help="our receiver and stripe-sync-engine in turn (benchmarks/peer.py; Node 20+)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, test_services(Path(tmp)) as (database_url, redis_url):
        work = Path(tmp)
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "STRIPE_WEBHOOK_SECRETS": SECRET,
               "STRIPE_CONNECT_WEBHOOK_SECRETS": CONNECT_SECRET, "LOG_LEVEL": "WARNING"}
        os.environ.update(env)
        from models.migrate import create_app_tables_if_absent, upgrade

        create_app_tables_if_absent(database_url)
        upgrade(database_url)
        conninfo = database_url
        n = args.events

        if args.peer:
            with ReceiverProcess(env, work / "receiver.log") as receiver:
                compare_with_peer(receiver, conninfo, n, work)
            return 0
        if args.e2e:
            with ReceiverProcess(env, work / "receiver.log") as receiver:
                return run_e2e(receiver, env, redis_url, conninfo, n, args.workers, work, args.order)

        ids, stripe_ids = seed_invoices(conninfo, n, 0)
        sample = signed_lines(ids, stripe_ids)
        print(f"{n} distinct signed invoice.finalized events per run; {describe_sizes(sample)}")
        ceiling = bare_insert_rate(conninfo, sample)
        print(f"ceiling  one client, INSERT + COMMIT per event: {ceiling:8.0f} events/s")

        offset = n
        for processes in sorted({1, args.processes}):
            with ReceiverProcess({**env, "WEBHOOK_PROCESSES": str(processes)}, work / "receiver.log") as receiver:
                for concurrency in (16, 64):
                    ids, stripe_ids = seed_invoices(conninfo, n, offset)
                    offset += n
                    result = run_wrk(receiver.url, signed_lines(ids, stripe_ids), concurrency, work, conninfo)
                    rate = result["stored"] / result["seconds"]
                    print(f"{processes} proc c{concurrency:<3} accepted {rate:6.0f} events/s ({rate / ceiling:.2f}x ceiling)  "
                          f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  "
                          f"{result['stored'] / max(result['commits'], 1):.1f} events/commit  "
                          f"non-200 {result['non200']}  in inbox {result['stored']} of {n} "
                          f"(requests in the latencies {result['requests']})")

        # End to end on events matching invoices whose only news is their finalization.
        with ReceiverProcess(env, work / "receiver.log") as receiver:
            ids, stripe_ids = seed_invoices(conninfo, n, offset)
            r = end_to_end(receiver, env, redis_url, conninfo, signed_lines(ids, stripe_ids), args.workers, work,
                           "finalized")
            print_e2e("finalized", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
