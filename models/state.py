"""Small pieces of state the worker's jobs keep between runs."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, SmallInteger, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base


class ObjectVersion(Base):
    """High-water mark per Stripe object: the newest event applied to it.

    Events are ordered by Stripe's `created`, then by the snapshot's lifecycle rank, then by
    event id, because several events about one object often share a second.
    """

    __tablename__ = "stripe_object_versions"
    __table_args__ = {"schema": WORKER_SCHEMA}

    object_id: Mapped[str] = mapped_column(Text, primary_key=True)
    object_type: Mapped[str] = mapped_column(Text)
    event_created: Mapped[int] = mapped_column(BigInteger)
    # How far along the object's own lifecycle the snapshot is: decides between snapshots of
    # one second before the (random) event id does.
    rank: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    event_id: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class Watermark(Base):
    """Where an incremental job got to: a time and a key id for keyset paging."""

    __tablename__ = "watermarks"
    __table_args__ = {"schema": WORKER_SCHEMA}

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    position_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=False))
    position_id: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class StripeInvoiceRead(Base):
    """The poller's to-do list of Stripe invoices to read from the API, each with when it is
    due: paid ones not yet linked to their charge (`unlinked`: retried with backoff until
    linked, never dropped), and draft or open ones with no news from Stripe for long
    (`stale`; open ones past their due date sooner). A run reads what is due, most overdue
    first, so its cost follows what is due, not how many invoices are open."""

    __tablename__ = "stripe_invoice_reads"
    __table_args__ = (
        Index("ix_stripe_invoice_reads_reason_due_at", "reason", "due_at"),
        {"schema": WORKER_SCHEMA},
    )

    invoice_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stripe_invoice_id: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)  # unlinked | stale
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Failed or fruitless reads in a row: the backoff of the next one.
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
