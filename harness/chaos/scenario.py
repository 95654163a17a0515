"""The chaos run's scenario: the app's rows seeded identically into the system under test and
the reference, and realistic Stripe histories about them (harness/stripe_events.py): invoice
lifecycles of every outcome in both invoice shapes, Connect onboarding, transfers, payouts and
deauthorizations."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

from harness import stripe_events as se

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
