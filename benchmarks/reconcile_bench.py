"""Connect payouts reconciliation at scale: Stripe calls, wall time against the rate cap, memory.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        python -m benchmarks.reconcile_bench [--accounts 2000] [--transfers 50000] [--payouts 6000] \\
        [--latency-ms 20] [--rate 40] [--workers 2] [--workloads baseline,mixed]

Uses the Postgres and Redis named by DATABASE_URL / REDIS_URL (a scratch database is created
and dropped per workload), else embedded ones.

To try the operator's command line on the same data, `desk` loads it into the empty database
DATABASE_URL names and serves the fake Stripe until interrupted (no workers, no measurement):

    createdb -h 127.0.0.1 -U postgres desk
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/desk \\
        python -m benchmarks.reconcile_bench --transfers 6000 --payouts 2000 --latency-ms 5 desk [--port 12111]

Two workloads of the same size, one after the other in the same run, each on a fresh database,
fake Stripe and workers:
- `baseline`: separate charges and transfers only. `--accounts` stripe_connect providers with
  skewed sizes (a few have several hundred transfers, so their lists take several pages), one
  paid transaction per platform transfer (`--transfers`), `--payouts` automatic payouts spread
  evenly over the accounts, each carrying a slice of its account's transfers (the newest slice
  of every account is not paid out yet): mostly paid, some in transit, some failed. 1% of the
  transfers are short, 0.5% partly reversed, and 1% of the accounts have a paid transaction with
  no transfer at all.
- `mixed`: the same, but half the transactions are destination charges (Stripe's own transfer
  of the whole charge, the platform fee collected back as an application fee, read through the
  transfers listing's expansion of the source charge), 5% are partially refunded with their
  transfer reversed proportionally (and the fee refunded proportionally), and 10% of the
  accounts are on manual payouts (their payouts are not itemized; their transfers' `payment`
  balance transactions say when the money is available).

The fake Stripe API (harness/stripe_server.py, with the transfers indexed by
destination, see indexed_fake) runs in a process of its own (so it does not share a GIL with the workers),
seeded with the same data, `--latency-ms` added to every request and its own 429 limit at
1.1x the worker's cap. The reconciliation runs in `--workers`
real Celery worker processes (`celery -A worker worker -Q reconciliation -c 1` each, started by
harness/workers.py) sharing
the Redis token bucket at STRIPE_RATE_LIMIT_PER_S = `--rate`; the clock runs from sending
`tasks.reconciliation.reconcile_all` until every account is reconciled.

Prints, per workload:
- Stripe calls made (counted by the fake) next to the minimum the data allows: per account
  ceil(n/100) pages (at least one) of its transfers, of its payouts, and of the balance
  transactions of each of its finished automatic payouts, or, on manual payouts, of its
  `payment` balance transactions; and the 429s the fake answered (goal: calls <= 1.05x);
- wall time next to calls / rate cap, the least time that many calls can take (goal <= 1.1x);
- peak RSS of each worker's pool process (VmHWM), next to its RSS idle before the run;
- a check of the outcome against what the generated data implies;
and then the mixed workload's ratios next to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

DAY = 86_400
HOUR = 3_600
FEE_BPS = 500


@dataclass
class Account:
    id: str
    provider_id: int
    manual: bool = False
    transfers: list[dict] = field(default_factory=list)
    payouts: list[tuple[dict, list[dict]]] = field(default_factory=list)  # (payout, its balance transactions)
    payments: list[dict] = field(default_factory=list)  # manual payouts: the transfers' `payment` BTs
    platform: list[dict] = field(default_factory=list)  # destination charges and their application fees


@dataclass
class Transaction:
    id: int
    provider_id: int
    total: int
    paid_at: int
    charge_id: str | None = None
    refunded: int = 0


@dataclass
class Dataset:
    accounts: list[Account]
    transactions: list[Transaction]
    expected: Counter  # outcome -> transactions


DESTINATION_SHARE = 0.5
REFUNDED_SHARE = 0.05
MANUAL_SHARE = 0.10


def _share(part: int, of: int, whole: int) -> int:
    return (2 * part * of + whole) // (2 * whole)


def generate(accounts: int, transfers: int, payouts: int, now: int, seed: int = 7, mixed: bool = False) -> Dataset:
    """The same data in every process that calls it with the same arguments. The mixed
    workload's choices come from a second generator, so the baseline stays what it was."""
    from harness import stripe_events as se

    rng = random.Random(seed)
    mix = random.Random(seed + 1)
    weights = [rng.paretovariate(1.2) for _ in range(accounts)]
    scale = (transfers - accounts) / sum(weights)
    counts = [1 + int(w * scale) for w in weights]
    for n in range(transfers - sum(counts)):  # rounding leftovers, one each
        counts[n % accounts] += 1
    payouts_of = [payouts // accounts + (1 if n < payouts % accounts else 0) for n in range(accounts)]

    data = Dataset([], [], Counter())
    txn_id = 0
    for a in range(accounts):
        account = Account(f"acct_bench{a:06d}", a + 1, manual=mixed and mix.random() < MANUAL_SHARE)
        created = sorted(now - 20 * DAY + rng.randrange(18 * DAY) for _ in range(counts[a]))
        kinds: dict[str, str] = {}  # transfer id -> what its amounts make it, before payouts
        for at in created:
            txn_id += 1
            total = 1_000 + (txn_id * 37) % 90_000
            base = _payout_cents(total)
            txn = Transaction(txn_id, account.provider_id, total, at - 60)
            roll = rng.random()
            short, reversed_only = roll < 0.01, 0.01 <= roll < 0.015
            destination = mixed and mix.random() < DESTINATION_SHARE
            refunded = mixed and not (short or reversed_only) and mix.random() < REFUNDED_SHARE
            if refunded:
                txn.refunded = total * mix.randrange(10, 60) // 100
            tr_id, py_id = f"tr_bench{txn_id:07d}", f"py_bench{txn_id:07d}"
            if destination:
                # Stripe's own transfer of the whole charge; the fee comes back as an application fee.
                txn.charge_id = f"ch_bench{txn_id:07d}"
                fee = total - base + (100 if short else 0)
                reversed_ = 500 if reversed_only else txn.refunded
                fee_refunded = _share(txn.refunded, fee, total) if refunded else 0
                fee_obj = se.application_fee(charge=txn.charge_id, account=account.id, amount=fee,
                                             id=f"fee_bench{txn_id:07d}", created=at)
                fee_obj |= {"amount_refunded": fee_refunded, "refunded": fee_refunded >= fee}
                account.platform += [
                    se.charge(amount=total, id=txn.charge_id, payment_intent=f"pi_bench{txn_id:07d}", created=at,
                              amount_refunded=txn.refunded, transfer=tr_id, transfer_group=f"group_{txn_id}",
                              application_fee=fee_obj["id"], application_fee_amount=fee,
                              transfer_data={"amount": None, "destination": account.id}),
                    fee_obj]
                transfer = se.transfer(id=tr_id, amount=total, amount_reversed=reversed_, destination=account.id,
                                       destination_payment=py_id, created=at, source_transaction=txn.charge_id,
                                       transfer_group=f"group_{txn_id}")
            else:
                amount = base - (100 if short else 0)
                reversed_ = 500 if reversed_only else _share(txn.refunded, base, total)
                transfer = se.transfer(id=tr_id, amount=amount, amount_reversed=reversed_, destination=account.id,
                                       destination_payment=py_id, created=at,
                                       metadata={"marketplace_transaction_id": str(txn_id)})
            kinds[tr_id] = "amount_mismatch" if short else "transfer_reversed" if reversed_only else "fine"
            data.transactions.append(txn)
            account.transfers.append(transfer)
            if account.manual:
                available_on = at + 4 * DAY
                if now - HOUR < available_on < now + DAY:  # not while the run goes on: its outcome would change
                    available_on = now + DAY
                account.payments.append(se.balance_transaction(
                    id=f"txn_{py_id}", amount=transfer["amount"], type="payment", source=py_id, fee=0, created=at,
                    available_on=available_on, status="available" if available_on <= now else "pending"))
        # Payout k carries the k-th slice of the transfers; the last slice waits for the next one.
        slices = payouts_of[a] + 1
        bounds = [len(created) * k // slices for k in range(slices + 1)]
        paid_out_in: dict[str, str] = {}
        for k in range(payouts_of[a]):
            carried = account.transfers[bounds[k]:bounds[k + 1]]
            roll = rng.random() if k == payouts_of[a] - 1 else 1.0
            status = "in_transit" if roll < 0.10 else "failed" if roll < 0.15 else "paid"
            at = (carried[-1]["created"] if carried else now - 10 * DAY) + 3_600
            payout = se.payout(id=f"po_bench{a:06d}_{k}", amount=sum(t["amount"] for t in carried), status=status,
                               created=at, arrival_date=at + 2 * DAY, automatic=not account.manual)
            bts = [se.balance_transaction(id=f"txn_bench{a:06d}_{k}", amount=-payout["amount"], type="payout",
                                          source=payout["id"], fee=0, created=at)]
            if not account.manual:
                bts += [se.balance_transaction(id=f"txn_{t['destination_payment']}", amount=t["amount"],
                                               type="payment", source=t["destination_payment"], fee=0, created=at)
                        for t in carried]
            account.payouts.append((payout, bts))
            paid_out_in.update((t["id"], status) for t in carried)
        available_on = {bt["source"]: bt["available_on"] for bt in account.payments}
        for t in account.transfers:
            if kinds[t["id"]] != "fine":
                data.expected[kinds[t["id"]]] += 1
            elif account.manual:
                data.expected["funds_available" if available_on[t["destination_payment"]] <= now
                              else "awaiting_funds"] += 1
            else:
                data.expected[{"paid": "paid_out", "failed": "payout_failed"}.get(paid_out_in.get(t["id"]),
                                                                                  "awaiting_payout")] += 1
        data.accounts.append(account)
    for account in data.accounts:
        if rng.random() < 0.01:
            txn_id += 1
            data.transactions.append(Transaction(txn_id, account.provider_id, 5_000, now - 5 * DAY))
            data.expected["missing_transfer"] += 1
    return data


def _payout_cents(total: int) -> int:
    return total - (total * FEE_BPS + 5_000) // 10_000


def minimum_calls(data: Dataset) -> int:
    """Pages the data takes at 100 per page; an empty list still takes one call. An account on
    manual payouts lists its `payment` balance transactions instead of its payouts' contents;
    one with no standard payout at all and transfers to reconcile has its schedule read."""
    pages = 0
    for account in data.accounts:
        pages += max(1, math.ceil(len(account.transfers) / 100)) + max(1, math.ceil(len(account.payouts) / 100))
        if account.manual:
            pages += max(1, math.ceil(len(account.payments) / 100)) if account.transfers else 0
        else:
            pages += sum(max(1, math.ceil(len(bts) / 100)) for payout, bts in account.payouts
                         if payout["status"] in ("paid", "failed", "canceled"))
        if not account.payouts and account.transfers:
            pages += 1
    return pages


# --- the fake Stripe server, in its own process ----------------------------------------------


def indexed_fake():
    """The fake, with the platform's transfers indexed by destination. The fake sorts and
    filters a whole collection on every list call: for 50,000 transfers that is tens of ms of
    CPU on its one event loop per call, more than the latency being simulated (Stripe's
    latency is what `--latency-ms` stands for). Requests are handled under the fake's lock,
    so the destination being listed can ride on the instance."""
    from harness.stripe_server import FakeStripe

    class IndexedFakeStripe(FakeStripe):
        def reset(self) -> None:
            with self._lock:
                self._order: dict = {}
                self._listing_destination: str | None = None
                super().reset()

        def _put(self, scope, coll, obj) -> None:
            super()._put(scope, coll, obj)
            self._order.pop((scope, coll), None)

        def _list(self, scope, coll, params, url, fixed):
            self._listing_destination = params.get("destination") if coll == "transfers" else None
            try:
                return super()._list(scope, coll, params, url, fixed)
            finally:
                self._listing_destination = None

        def _sorted(self, scope, coll) -> list[dict]:
            key = (scope, coll)
            if key not in self._order:
                ordered = super()._sorted(scope, coll)
                by_destination: dict[str, list[dict]] = {}
                for obj in ordered:
                    by_destination.setdefault(obj.get("destination"), []).append(obj)
                self._order[key] = (ordered, by_destination)
            ordered, by_destination = self._order[key]
            if self._listing_destination is not None:
                return by_destination.get(self._listing_destination, [])
            return ordered

    return IndexedFakeStripe()


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    from harness.stripe_server import make_app

    data = generate(args.accounts, args.transfers, args.payouts, args.now, mixed=args.mixed)
    fake = indexed_fake()
    for account in data.accounts:
        schedule = {"delay_days": 2, "interval": "manual" if account.manual else "daily"}
        fake.add("account", {"id": account.id, "object": "account", "created": args.now - 30 * DAY,
                             "settings": {"payouts": {"debit_negative_balances": True, "schedule": schedule,
                                                      "statement_descriptor": None}}})
        for obj in account.platform:
            fake.add(obj["object"], obj)
        for transfer in account.transfers:
            fake.add("transfer", transfer)
        for payout, bts in account.payouts:
            fake.add("payout", payout, account=account.id)
            for bt in bts:
                fake.add("balance_transaction", bt, account=account.id,
                         payout=payout["id"] if payout["automatic"] else None)
        for bt in account.payments:
            fake.add("balance_transaction", bt, account=account.id)
    fake.latency_s = args.latency_ms / 1000
    fake.rate_limit_per_s = args.rate_limit

    async def calls(request):
        statuses = Counter(c.status for c in fake.calls)
        paths = Counter(c.path for c in fake.calls if c.status == 200)
        return JSONResponse({"total": len(fake.calls), "statuses": statuses, "paths": paths})

    app = Starlette(routes=[Route("/_bench/calls", calls), Mount("/", make_app(fake))])
    print("seeded", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def desk(args: argparse.Namespace) -> None:
    """The data in the empty database DATABASE_URL names, and the fake Stripe serving it, for
    `marketplace-worker reconcile` and `discrepancies` run by hand."""
    import psycopg

    from models.migrate import create_app_tables_if_absent, upgrade

    database_url = os.environ.get("DATABASE_URL")
    if not database_url:
        sys.exit("desk: DATABASE_URL must name an empty scratch database")
    create_app_tables_if_absent(database_url)
    upgrade(database_url)
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        if conn.execute("SELECT EXISTS (SELECT FROM marketplace.providers)").fetchone()[0]:
            sys.exit("desk: the database already has providers; give it an empty scratch database")
    args.now, args.rate_limit = int(time.time()), None
    load_database(database_url, generate(args.accounts, args.transfers, args.payouts, args.now, mixed=args.mixed))
    # The fake answers at any rate; the command line's own cap would otherwise set the pace.
    print(f"export DATABASE_URL={database_url} STRIPE_API_KEY=sk_test_desk "
          f"STRIPE_API_BASE=http://127.0.0.1:{args.port} STRIPE_RATE_LIMIT_PER_S=200", flush=True)
    serve(args)


def bench_calls(base: str) -> dict:
    with urllib.request.urlopen(base + "/_bench/calls", timeout=30) as response:
        return json.load(response)


# --- the database --------------------------------------------------------------------------


def load_database(database_url: str, data: Dataset) -> None:
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SET session_replication_role = replica")  # FK triggers: the rows satisfy them
        with cur.copy('COPY "User" (id, email, "createdAt", "updatedAt") FROM STDIN') as copy:
            copy.write_row(("bclient", "client@bench.test", "now", "now"))
            for account in data.accounts:
                copy.write_row((f"bu{account.provider_id}", f"bu{account.provider_id}@bench.test", "now", "now"))
        with cur.copy('COPY marketplace.providers (id, "userId", "providerType", "businessName", '
                      '"stripeConnectAccountId", "stripeConnectOnboardingComplete", "stripeConnectPayoutsEnabled", '
                      '"paymentMode", "updatedAt") FROM STDIN') as copy:
            for account in data.accounts:
                copy.write_row((account.provider_id, f"bu{account.provider_id}", "service_provider",
                                f"Provider {account.provider_id}", account.id, True, True, "stripe_connect", "now"))
        with cur.copy('COPY "Invoice" (id, "invoiceNumber", status, "amountCents", "amountPaidCents", '
                      '"isMarketplaceInvoice", "clientUserId", "marketplaceProviderId", "stripeChargeId", '
                      '"updatedAt") FROM STDIN') as copy:
            for txn in data.transactions:
                copy.write_row((txn.id, f"B-{txn.id}", "paid", txn.total, txn.total, True, "bclient", txn.provider_id,
                                txn.charge_id, "now"))
        with cur.copy('COPY marketplace.transactions (id, "clientUserId", "providerId", "invoiceType", '
                      '"invoiceId", "serviceDescription", "totalCents", "platformFeeCents", "providerPayoutCents", '
                      'status, "createdAt", "invoicedAt", "paidAt") FROM STDIN') as copy:
            for txn in data.transactions:
                paid = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(txn.paid_at))
                copy.write_row((txn.id, "bclient", txn.provider_id, "service", txn.id, "Full groom", txn.total,
                                txn.total - _payout_cents(txn.total), _payout_cents(txn.total), "paid", paid, paid,
                                paid))
        # The worker's own keys and refund totals, as its event handling leaves them.
        with cur.copy("COPY marketplace_worker.invoice_transactions (invoice_id, transaction_id) FROM STDIN") as copy:
            for txn in data.transactions:
                copy.write_row((txn.id, txn.id))
        with cur.copy("COPY marketplace_worker.transaction_refunds (transaction_id, refunded_cents) FROM STDIN") as copy:
            for txn in data.transactions:
                if txn.refunded:
                    copy.write_row((txn.id, txn.refunded))
        for table in ('"Invoice"', "marketplace.transactions", "marketplace.providers"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        cur.execute("ANALYZE")


def outcome(database_url: str) -> tuple[Counter, Counter, int]:
    import psycopg

    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        statuses = Counter(dict(conn.execute(
            "SELECT status, count(*) FROM marketplace.transactions GROUP BY 1").fetchall()))
        kinds = Counter(dict(conn.execute(
            "SELECT kind, count(*) FROM marketplace_worker.reconcile_discrepancies WHERE resolved_at IS NULL "
            "GROUP BY 1").fetchall()))
        reconciled = conn.execute(
            "SELECT count(*) FROM marketplace_worker.connect_accounts WHERE last_reconciled_at IS NOT NULL"
        ).fetchone()[0]
    return statuses, kinds, reconciled


# --- peak memory -----------------------------------------------------------------------------


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _pool_kib(worker, field: str) -> int:
    """The largest `field` of the worker's pool processes (0 if it has none)."""
    return max((_vm_kib(pid, field) for pid in worker.pids()[1:]), default=0)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Measured:
    name: str
    calls: int
    minimum: int
    wall: float
    bound: float
    ok: bool

    @property
    def calls_ratio(self) -> float:
        return self.calls / self.minimum

    @property
    def wall_ratio(self) -> float:
        return self.wall / self.bound


def measure(args: argparse.Namespace, mixed: bool, server_env: dict[str, str | None]) -> Measured:
    """One workload on its own scratch database, fake Stripe and workers."""
    from models.migrate import create_app_tables_if_absent, upgrade
    from harness.services import test_services
    from harness.workers import WorkerProcess
    from worker.embedded import free_port

    name = "mixed" if mixed else "baseline"
    for key, value in server_env.items():  # the servers, not the previous workload's scratch database
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    now = int(time.time())
    t = time.monotonic()
    data = generate(args.accounts, args.transfers, args.payouts, now, mixed=mixed)
    manual = [a for a in data.accounts if a.manual]
    print(f"[{name}] data: {len(data.accounts)} accounts ({len(manual)} on manual payouts), "
          f"{sum(len(a.transfers) for a in data.accounts)} transfers "
          f"({sum(len(a.platform) for a in data.accounts) // 2} from destination charges, "
          f"{sum(1 for t in data.transactions if t.refunded)} transactions partially refunded), "
          f"{sum(len(a.payouts) for a in data.accounts)} payouts, "
          f"{sum(len(b) for a in data.accounts for _, b in a.payouts)} payout balance transactions, "
          f"{len(data.transactions)} paid transactions; largest account "
          f"{max(len(a.transfers) for a in data.accounts)} transfers ({time.monotonic() - t:.1f}s)", flush=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stripe_proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.reconcile_bench", "--accounts", str(args.accounts), "--transfers",
         str(args.transfers), "--payouts", str(args.payouts), "--latency-ms", str(args.latency_ms),
         "serve", "--port", str(port), "--now", str(now), "--rate-limit", str(args.rate * 1.1)]
        + (["--mixed"] if mixed else []),
        stdout=subprocess.PIPE, text=True)
    workers: list[WorkerProcess] = []
    with tempfile.TemporaryDirectory(prefix="mw-reconcile-bench-") as work, \
            test_services(Path(work)) as (database_url, redis_url):
        try:
            create_app_tables_if_absent(database_url)
            upgrade(database_url)
            load_database(database_url, data)
            assert stripe_proc.stdout.readline().strip() == "seeded", "fake Stripe did not start"
            _wait_for_port(port)
            env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url,
                   "STRIPE_API_KEY": "sk_test_bench", "STRIPE_API_BASE": base,
                   "STRIPE_RATE_LIMIT_PER_S": str(args.rate), "LOG_LEVEL": "WARNING"}
            os.environ.update(env)
            for n in range(args.workers):
                workers.append(WorkerProcess(env, Path(work) / f"worker{n}.log", 1, name=f"bench{n}",
                                             queues=["reconciliation"], log_level="WARNING"))
                workers[-1].start()
            from worker import app

            before = bench_calls(base)["total"]
            idle_rss = [_pool_kib(w, "VmRSS") for w in workers]

            start = time.monotonic()
            app.send_task("tasks.reconciliation.reconcile_all")
            while True:
                time.sleep(0.5)
                statuses, kinds, reconciled = outcome(database_url)
                if reconciled >= len(data.accounts):
                    # Read again: the last account may have committed between the reads above.
                    statuses, kinds, _ = outcome(database_url)
                    break
                for w in workers:
                    if not w.running:
                        raise RuntimeError(f"a worker died:\n{w.log_tail()}")
            wall = time.monotonic() - start
            pool_rss = [_pool_kib(w, "VmHWM") for w in workers]
            main_rss = [_vm_kib(w.proc.pid, "VmHWM") for w in workers]
            counted = bench_calls(base)
        finally:
            for w in workers:
                w.stop()
            stripe_proc.terminate()
            stripe_proc.wait(30)

    calls = counted["total"] - before
    minimum = minimum_calls(data)
    bound = calls / args.rate
    print(f"[{name}] Stripe calls: {calls} made, minimum the data allows {minimum}: ratio {calls / minimum:.3f} "
          f"(goal <= 1.05)")
    print(f"[{name}]   by endpoint: " + ", ".join(f"{p} {n}" for p, n in sorted(counted["paths"].items())))
    print(f"[{name}]   answers: " + ", ".join(f"{s} x{n}" for s, n in sorted(counted["statuses"].items())))
    print(f"[{name}] wall time: {wall:.1f}s with {args.workers} Celery worker processes, rate cap {args.rate:g}/s "
          f"(latency {args.latency_ms:g} ms): calls / rate = {bound:.1f}s, ratio {wall / bound:.3f} (goal <= 1.1)")
    print(f"[{name}] peak RSS (VmHWM): pool processes {', '.join(f'{k / 1024:.0f} MiB' for k in pool_rss)} "
          f"(idle before the run: {', '.join(f'{k / 1024:.0f} MiB' for k in idle_rss)}); "
          f"worker main processes {', '.join(f'{k / 1024:.0f} MiB' for k in main_rss)}")
    done = ("paid_out", "funds_available")
    fine = (*done, "awaiting_payout", "awaiting_funds")
    expected_kinds = {k: n for k, n in sorted(data.expected.items()) if k not in fine}
    expected_completed = sum(data.expected[k] for k in done)
    found_kinds = dict(sorted(kinds.items()))
    ok = statuses.get("completed", 0) == expected_completed and found_kinds == expected_kinds
    print(f"[{name}] outcome: {statuses.get('completed', 0)} completed (the data implies {expected_completed}: "
          f"paid out {data.expected['paid_out']}, funds available on manual payouts "
          f"{data.expected['funds_available']}); open discrepancies {found_kinds} (the data implies "
          f"{expected_kinds}): {'OK' if ok else 'MISMATCH'}", flush=True)
    return Measured(name, calls, minimum, wall, bound, ok)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--transfers", type=int, default=50_000)
    parser.add_argument("--payouts", type=int, default=6_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=40.0, help="STRIPE_RATE_LIMIT_PER_S for the workers")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workloads", default="baseline,mixed", help="comma-separated: baseline, mixed")
    server = sub.add_parser("serve", help="(internal) the fake Stripe server process")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--now", type=int, required=True)
    server.add_argument("--rate-limit", type=float, default=None)
    server.add_argument("--mixed", action="store_true")
    by_hand = sub.add_parser("desk", help="load the data into DATABASE_URL's empty database and serve the fake "
                                          "Stripe for the command line until interrupted")
    by_hand.add_argument("--port", type=int, default=12111)
    by_hand.add_argument("--mixed", action="store_true")
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args)
        return 0
    if args.mode == "desk":
        desk(args)
        return 0

    server_env = {key: os.environ.get(key) for key in ("DATABASE_URL", "REDIS_URL")}
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if not names or set(names) - {"baseline", "mixed"}:
        parser.error("--workloads takes baseline and/or mixed")
    results = {name: measure(args, name == "mixed", server_env) for name in names}
    if {"baseline", "mixed"} <= results.keys():
        base, mixed = results["baseline"], results["mixed"]
        print(f"mixed against baseline (same run): calls/minimum {mixed.calls_ratio:.3f} vs {base.calls_ratio:.3f} "
              f"({mixed.calls_ratio / base.calls_ratio:.3f}x); wall/(calls/rate) {mixed.wall_ratio:.3f} vs "
              f"{base.wall_ratio:.3f} ({mixed.wall_ratio / base.wall_ratio:.3f}x); calls {mixed.calls} vs "
              f"{base.calls} ({mixed.calls / base.calls:.3f}x), wall {mixed.wall:.1f}s vs {base.wall:.1f}s "
              f"({mixed.wall / base.wall:.3f}x)")
    return 0 if all(r.ok for r in results.values()) else 1


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("fake Stripe did not listen")


if __name__ == "__main__":
    sys.exit(main())
