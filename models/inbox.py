"""The Stripe event inbox: every accepted webhook, committed before the 2xx."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base, one_of


class EventStatus(StrEnum):
    RECEIVED = "received"  # stored, not applied yet
    RETRYING = "retrying"  # an attempt failed; another is scheduled
    PROCESSED = "processed"
    IGNORED = "ignored"  # a type or an account the worker does not act on; `last_error` says why
    PARKED = "parked"  # attempts exhausted or the payload cannot be applied: an operator's turn

    @classmethod
    def pending(cls) -> tuple[EventStatus, ...]:
        """Statuses of an event still to be applied."""
        return (cls.RECEIVED, cls.RETRYING)

    @classmethod
    def settled(cls) -> tuple[EventStatus, ...]:
        """Statuses no worker touches again (short of an operator's replay)."""
        return (cls.PROCESSED, cls.IGNORED, cls.PARKED)


class Endpoint(StrEnum):
    PLATFORM = "platform"  # the platform's webhook endpoint
    CONNECT = "connect"  # the Connect endpoint: events of connected accounts
    CATCHUP = "catchup"  # read from Stripe's events API by catch-up or backfill


class StripeEvent(Base):
    __tablename__ = "stripe_events"
    __table_args__ = (
        one_of("status", EventStatus, name="status"),
        one_of("endpoint", Endpoint, name="endpoint"),
        # The sweeper and the CLI look events up by status and age.
        Index("ix_stripe_events_status_received_at", "status", "received_at"),
        Index("ix_stripe_events_created", "created"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    account: Mapped[str | None] = mapped_column(Text)
    livemode: Mapped[bool] = mapped_column(Boolean)
    api_version: Mapped[str | None] = mapped_column(Text)
    # Stripe's `created` (unix seconds): with the id, the order of events about one object.
    created: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    endpoint: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    status: Mapped[str] = mapped_column(Text, server_default=EventStatus.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
