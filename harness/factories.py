"""Rows of the main application's tables, as its Prisma client would write them.

Each factory flushes and returns the model; the caller commits when a worker
process must see the rows.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy.orm import Session

from domain.clock import utcnow
from models import Invoice, Provider, Review, ServiceListing, Tenant, Transaction, User

_seq = itertools.count(1)


def user(session: Session, **fields) -> User:
    n = next(_seq)
    now = utcnow()
    row = User(
        id=f"cuser{n:08d}", email=f"user{n}@example.test", name=f"User {n}",
        entitlements=["MARKETPLACE_ACCESS"], createdAt=now, updatedAt=now,
    )
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def tenant(session: Session, **fields) -> Tenant:
    n = next(_seq)
    now = utcnow()
    row = Tenant(name=f"Kennel {n}", slug=f"kennel-{n}", createdAt=now, updatedAt=now)
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def provider(session: Session, *, payment_mode: str = "manual", **fields) -> Provider:
    n = next(_seq)
    now = utcnow()
    owner = fields.pop("owner", None) or user(session)
    row = Provider(
        userId=owner.id, providerType="service_provider", businessName=f"Groomers {n}",
        stripeConnectAccountId=f"acct_test{n:08d}" if payment_mode == "stripe_connect" else None,
        stripeConnectOnboardingComplete=payment_mode == "stripe_connect",
        stripeConnectPayoutsEnabled=payment_mode == "stripe_connect",
        paymentMode=payment_mode, totalListings=0, totalTransactions=0, totalRevenueCents=0,
        averageRating=Decimal("0.00"), status="active", createdAt=now, updatedAt=now,
    )
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def listing(session: Session, provider_row: Provider, **fields) -> ServiceListing:
    n = next(_seq)
    now = utcnow()
    row = ServiceListing(
        providerId=provider_row.id, title=f"Full groom #{n}", category="grooming",
        priceCents=5000, status="active", createdAt=now, updatedAt=now,
    )
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def invoice(
    session: Session,
    provider_row: Provider | None = None,
    *,
    client: User | None = None,
    listing_row: ServiceListing | None = None,
    amount_cents: int = 10_000,
    status: str = "open",
    stripe: bool = True,
    **fields,
) -> Invoice:
    """A marketplace invoice (or, with `isMarketplaceInvoice=False`, any invoice)."""
    n = next(_seq)
    now = utcnow()
    provider_row = provider_row or provider(session)
    client = client or user(session)
    row = Invoice(
        tenantId=provider_row.tenantId, invoiceNumber=f"INV-{n:08d}", status=status,
        amountCents=amount_cents, amountPaidCents=0, currency="usd",
        dueAt=now + timedelta(days=14), issuedAt=now if status != "draft" else None,
        stripeInvoiceId=f"in_test{n:010d}" if stripe else None,
        isMarketplaceInvoice=True, marketplaceInvoiceType="service",
        clientUserId=client.id, marketplaceProviderId=provider_row.id,
        marketplaceListingId=listing_row.id if listing_row else None,
        description=None, createdAt=now, updatedAt=now,
    )
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def transaction(session: Session, invoice_row: Invoice, **fields) -> Transaction:
    """A transaction row written directly, for tests that start from an existing one."""
    now = utcnow()
    fee = (invoice_row.amountCents * 500 + 5000) // 10_000
    row = Transaction(
        clientUserId=invoice_row.clientUserId, providerId=invoice_row.marketplaceProviderId,
        listingId=invoice_row.marketplaceListingId, invoiceType="service",
        tenantId=invoice_row.tenantId, invoiceId=invoice_row.id, serviceDescription="Service",
        totalCents=invoice_row.amountCents, platformFeeCents=fee,
        providerPayoutCents=invoice_row.amountCents - fee, status="invoiced", createdAt=now,
        invoicedAt=now,
    )
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def review(session: Session, transaction_row: Transaction, rating: int, **fields) -> Review:
    row = Review(
        transactionId=transaction_row.id, providerId=transaction_row.providerId,
        reviewerUserId=transaction_row.clientUserId, rating=rating, createdAt=utcnow(),
    )
    _apply(row, fields)
    session.add(row)
    session.flush()
    return row


def _apply(row, fields: dict) -> None:
    for name, value in fields.items():
        if not hasattr(type(row), name):
            raise TypeError(f"{type(row).__name__} has no column {name}")
        setattr(row, name, value)


def at(days_ago: float = 0) -> datetime:
    return utcnow() - timedelta(days=days_ago)
