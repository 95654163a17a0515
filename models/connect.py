"""What the worker knows of Stripe Connect money movements, for payouts reconciliation (SPEC §5).

Transfers and payouts are mirrored from two sources: webhook events and the reconciliation's
own API listings. Each row keeps the version it was written from, `(as_of, as_of_id)`: an
event's `(created, event id)`, or a listing's `(listing time, "~api")`. A write lands only when
it is not older, so the row holds the newest snapshot whatever order the sources arrive in.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base, one_of


class ConnectAccount(Base):
    """Reconciliation state of one connected account."""

    __tablename__ = "connect_accounts"
    __table_args__ = {"schema": WORKER_SCHEMA}

    account: Mapped[str] = mapped_column(Text, primary_key=True)
    # Set by a transfer or payout event: the account is reconciled on the next pass.
    dirty_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Unix seconds: transfers and payouts created before this were listed from the API.
    listed_until: Mapped[int | None] = mapped_column(BigInteger)
    last_reconciled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # `settings.payouts.schedule.interval`, read from the API only while the account's payouts
    # do not tell whether it is on manual payouts (it has made no standard payout yet).
    payout_interval: Mapped[str | None] = mapped_column(Text)
    payout_interval_read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ConnectTransfer(Base):
    """A platform transfer to a connected account, newest snapshot."""

    __tablename__ = "connect_transfers"
    __table_args__ = (
        Index("ix_connect_transfers_destination_created", "destination", "created"),
        Index("ix_connect_transfers_destination_payment", "destination_payment"),
        Index("ix_connect_transfers_transaction_id", "transaction_id"),
        Index("ix_connect_transfers_unmatched", "destination", postgresql_where=text("transaction_id IS NULL")),
        Index("ix_connect_transfers_destination_updated_at", "destination", "updated_at"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    destination: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    amount_reversed: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    # The `py_...` charge the transfer created on the connected account.
    destination_payment: Mapped[str | None] = mapped_column(Text)
    source_transaction: Mapped[str | None] = mapped_column(Text)
    transfer_group: Mapped[str | None] = mapped_column(Text)
    # metadata.marketplace_transaction_id, as Stripe holds it (a string).
    marketplace_transaction_id: Mapped[str | None] = mapped_column(Text)
    created: Mapped[int] = mapped_column(BigInteger)
    as_of: Mapped[int] = mapped_column(BigInteger)
    as_of_id: Mapped[str] = mapped_column(Text)
    # From the source charge, which only a listing expands (events carry its id): NULL until a
    # listing has seen it. The application fee of a destination charge is collected back from
    # the connected account, so the provider's net is the transfer less the fee net of its refunds.
    source_payment_intent: Mapped[str | None] = mapped_column(Text)
    destination_charge: Mapped[bool | None] = mapped_column(Boolean)
    application_fee_id: Mapped[str | None] = mapped_column(Text)
    application_fee_amount: Mapped[int | None] = mapped_column(BigInteger)
    application_fee_refunded: Mapped[int | None] = mapped_column(BigInteger)
    # `amount_reversed` when the fee was last read: a later reversal may have refunded part of it.
    fee_checked_reversed: Mapped[int | None] = mapped_column(BigInteger)
    # The transaction the transfer was matched to; NULL until one matches (then it is tried
    # again on each run). Reset when the keys it was matched by change.
    transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ConnectPayment(Base):
    """A `payment` balance transaction on an account on manual payouts: when a transfer's money
    (its `destination_payment`) is available there. Stripe itemizes automatic payouts only."""

    __tablename__ = "connect_payments"
    __table_args__ = (
        Index("ix_connect_payments_account", "account"),
        {"schema": WORKER_SCHEMA},
    )

    # The `py_...` payment (the balance transaction's source).
    id: Mapped[str] = mapped_column(Text, primary_key=True)
    account: Mapped[str] = mapped_column(Text)
    balance_transaction_id: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    available_on: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[int] = mapped_column(BigInteger)


class ConnectPayout(Base):
    """A connected account's payout to its bank, newest snapshot."""

    __tablename__ = "connect_payouts"
    __table_args__ = (
        Index("ix_connect_payouts_account_created", "account", "created"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    account: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    # Stripe lists the balance transactions of automatic payouts only.
    automatic: Mapped[bool] = mapped_column(Boolean)
    # `standard` or `instant`: instant payouts are never automatic, whatever the schedule.
    method: Mapped[str | None] = mapped_column(Text)
    reconciliation_status: Mapped[str | None] = mapped_column(Text)
    arrival_date: Mapped[int | None] = mapped_column(BigInteger)
    failure_code: Mapped[str | None] = mapped_column(Text)
    created: Mapped[int] = mapped_column(BigInteger)
    # When its balance transactions were stored: a payout's contents never change, so they
    # are listed once.
    items_listed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    as_of: Mapped[int] = mapped_column(BigInteger)
    as_of_id: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ConnectPayoutItem(Base):
    """A balance transaction a payout carried (`GET /v1/balance_transactions?payout=`)."""

    __tablename__ = "connect_payout_items"
    __table_args__ = (
        Index("ix_connect_payout_items_payout_id", "payout_id"),
        Index("ix_connect_payout_items_account_source", "account", "source"),
        {"schema": WORKER_SCHEMA},
    )

    balance_transaction_id: Mapped[str] = mapped_column(Text, primary_key=True)
    account: Mapped[str] = mapped_column(Text)
    payout_id: Mapped[str] = mapped_column(Text)
    # A transfer's `py_...` payment, or for `payout_failure` / `payout_cancel` the payout
    # whose money came back and was paid out again in this one.
    source: Mapped[str | None] = mapped_column(Text)
    type: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)


class DiscrepancyState(StrEnum):
    """Where a discrepancy stands; derived from its row (`resolved_at`, `acknowledged_at`)."""

    OPEN = "open"  # seen by the last run that covered it, nobody has acknowledged it
    ACKNOWLEDGED = "acknowledged"  # still seen, an operator acknowledged it at its current amounts
    RESOLVED = "resolved"  # a later run no longer saw it


class DiscrepancyChange(StrEnum):
    """A change in a discrepancy's history."""

    OPENED = "opened"  # first seen, or seen again after it was resolved
    AMOUNT_CHANGED = "amount_changed"  # expected or seen cents, or the currency, differ from the last run's
    ACKNOWLEDGED = "acknowledged"  # an operator's acknowledgement, with a note
    REOPENED = "reopened"  # its amount changed after it was acknowledged: the acknowledgement is cleared
    RESOLVED = "resolved"  # a run that covers it no longer sees it


class ReconcileDiscrepancy(Base):
    """Something reconciliation found wrong, kept open until a run that covers it no longer
    sees it. One row per (kind, subject): a rerun updates `last_seen_at`, never duplicates.
    An operator's acknowledgement holds while its amounts stay as they were acknowledged."""

    __tablename__ = "reconcile_discrepancies"
    __table_args__ = (
        UniqueConstraint("kind", "subject"),
        CheckConstraint(
            "(acknowledged_at IS NULL) = (acknowledged_by IS NULL) AND (acknowledged_at IS NULL) = (acknowledged_note IS NULL)",
            name="acknowledged_whole",
        ),
        Index("ix_reconcile_discrepancies_account", "account"),
        Index("ix_reconcile_discrepancies_resolved_at", "resolved_at"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    # The transaction id for transaction kinds, the transfer id for transfer kinds.
    subject: Mapped[str] = mapped_column(Text)
    account: Mapped[str] = mapped_column(Text)
    # No foreign key: the transactions table is the main app's.
    transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    expected_cents: Mapped[int | None] = mapped_column(BigInteger)
    seen_cents: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(Text)
    transfer_ids: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    payout_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The last acknowledgement, kept once resolved; cleared when the amounts change or when
    # the discrepancy comes back after it was resolved.
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    acknowledged_by: Mapped[str | None] = mapped_column(Text)
    acknowledged_note: Mapped[str | None] = mapped_column(Text)


class ReconcileDiscrepancyEvent(Base):
    """One change in a discrepancy's history, with its amounts at the time. Written in the same
    statement as the change itself; never updated."""

    __tablename__ = "reconcile_discrepancy_events"
    __table_args__ = (
        one_of("change", DiscrepancyChange, name="change"),
        Index("ix_reconcile_discrepancy_events_discrepancy_id", "discrepancy_id", "id"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    discrepancy_id: Mapped[int] = mapped_column(
        BigInteger,
        ForeignKey(f"{WORKER_SCHEMA}.reconcile_discrepancies.id", ondelete="CASCADE",
                   name="fk_reconcile_discrepancy_events_discrepancy_id"),
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    change: Mapped[str] = mapped_column(Text)
    # The operator's name for an acknowledgement; "reconcile" for the changes a run makes.
    by: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    expected_cents: Mapped[int | None] = mapped_column(BigInteger)
    seen_cents: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(Text)
