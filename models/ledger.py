"""What the worker records of the money moving around a marketplace transaction: Stripe's
charges, refunds and disputes as last seen (newest event wins, see domain/versions.py), the
invoice -> transaction key, the refunded amount per transaction, and the providers whose
stats need recomputing.

Charges, refunds and disputes are keyed by Stripe id and joined to an invoice through
`"Invoice"."stripeChargeId"` / `"stripePaymentIntentId"`, so a fact that arrives before the
invoice is linked to its payment is kept and counted once the link appears.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Identity, Index, Integer, Text, func
from sqlalchemy.orm import Mapped, foreign, mapped_column, relationship

from models.app import Transaction
from models.base import WORKER_SCHEMA, Base


class StripeCharge(Base):
    """A charge's cumulative refund state from its newest snapshot (`amount_refunded` can
    go down when a refund fails, so only the newest snapshot is trusted)."""

    __tablename__ = "stripe_charges"
    __table_args__ = (
        Index("ix_stripe_charges_payment_intent_id", "payment_intent_id"),
        {"schema": WORKER_SCHEMA},
    )

    charge_id: Mapped[str] = mapped_column(Text, primary_key=True)
    payment_intent_id: Mapped[str | None] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    amount_refunded: Mapped[int] = mapped_column(BigInteger)
    refunded: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StripeRefund(Base):
    """One refund as last seen; `succeeded` and `pending` refunds count, failed and canceled do not."""

    __tablename__ = "stripe_refunds"
    __table_args__ = (
        Index("ix_stripe_refunds_charge_id", "charge_id"),
        Index("ix_stripe_refunds_payment_intent_id", "payment_intent_id"),
        {"schema": WORKER_SCHEMA},
    )

    refund_id: Mapped[str] = mapped_column(Text, primary_key=True)
    charge_id: Mapped[str | None] = mapped_column(Text)
    payment_intent_id: Mapped[str | None] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StripeDispute(Base):
    """One dispute's newest status; an open one holds its transaction back from `completed`."""

    __tablename__ = "stripe_disputes"
    __table_args__ = (
        Index("ix_stripe_disputes_charge_id", "charge_id"),
        Index("ix_stripe_disputes_payment_intent_id", "payment_intent_id"),
        {"schema": WORKER_SCHEMA},
    )

    dispute_id: Mapped[str] = mapped_column(Text, primary_key=True)
    charge_id: Mapped[str | None] = mapped_column(Text)
    payment_intent_id: Mapped[str | None] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class StripeInvoicePayment(Base):
    """An InvoicePayment as last seen (`invoice_payment.paid`): which charge or PaymentIntent
    paid a Stripe invoice. Kept so that a payment seen before the app's invoice is known by
    its Stripe id is linked when it becomes known."""

    __tablename__ = "stripe_invoice_payments"
    __table_args__ = (
        Index("ix_stripe_invoice_payments_stripe_invoice_id", "stripe_invoice_id"),
        {"schema": WORKER_SCHEMA},
    )

    invoice_payment_id: Mapped[str] = mapped_column(Text, primary_key=True)
    stripe_invoice_id: Mapped[str] = mapped_column(Text)
    charge_id: Mapped[str | None] = mapped_column(Text)
    payment_intent_id: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    event_created: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class InvoiceTransaction(Base):
    """The worker's key from an invoice to its one transaction: `marketplace.transactions` has
    no unique key (nor any index) on "invoiceId", and its DDL is Prisma's, so the uniqueness
    and the fast lookup live here. Rows created by the app are adopted on first sight."""

    __tablename__ = "invoice_transactions"
    __table_args__ = {"schema": WORKER_SCHEMA}

    invoice_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    # Lets a new transaction and its key be inserted in one flush, each kind in one batch.
    transaction: Mapped[Transaction] = relationship(
        Transaction, primaryjoin=lambda: foreign(InvoiceTransaction.transaction_id) == Transaction.id
    )


class TransactionRefund(Base):
    """Refunded cents per `marketplace.transactions` row, kept current by the worker; a
    transaction without a row here has no refund. Provider stats join it."""

    __tablename__ = "transaction_refunds"
    __table_args__ = {"schema": WORKER_SCHEMA}

    # No foreign key: the transactions table is the main app's, its DDL is Prisma's.
    transaction_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    refunded_cents: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TouchedProvider(Base):
    """Providers whose transactions changed since the stats job last looked.

    Append-only, one row per touching transaction: a key on the provider would make every
    webhook of a busy provider wait for the previous one's commit (domain/stats.py says why
    claiming committed rows only is enough)."""

    __tablename__ = "touched_providers"
    __table_args__ = {"schema": WORKER_SCHEMA}

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    provider_id: Mapped[int] = mapped_column(Integer)
    touched_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
