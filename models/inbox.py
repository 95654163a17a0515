"""The Stripe event inbox: every accepted webhook, committed before the 2xx.

`stripe_events` is range-partitioned by the month of `received_at` (migration 0018), so
retention drops a month's partition instead of deleting its rows one by one. A partitioned
table's unique keys must include the partition key, so the table's primary key is
(id, received_at) and the id's uniqueness across months is kept by `stripe_event_ids`, a key
table every insert goes through first (domain/inbox.py). The mapper keeps `id` alone as the
identity, so `session.get(StripeEvent, id)` and every lookup by id work as before.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

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


# The partitions of `stripe_events` (domain/retention.py makes and drops them): one per month
# (`stripe_events_2027_01`), the table as it was before partitioning (`stripe_events_legacy`,
# every month up to the migration's) and `stripe_events_default` (whatever no month holds).
# They are the parent's storage, not tables of their own: schema comparisons skip them.
PARTITION_NAME = re.compile(r"stripe_events_(?:legacy|default|\d{4}_\d{2})")


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

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        # The table's key is (id, received_at), as partitioning requires; an event is its id.
        return {"primary_key": [cls.__table__.c.id]}

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
        DateTime(timezone=True), primary_key=True, server_default=func.now()
    )
    status: Mapped[str] = mapped_column(Text, server_default=EventStatus.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StripeEventId(Base):
    """Every event id in the inbox, once: the uniqueness the partitioned inbox cannot hold.
    An insert claims the id here first and stores the event only when the claim is new."""

    __tablename__ = "stripe_event_ids"
    __table_args__ = (
        # Retention finds the ids of the months it dropped by their time.
        Index("ix_stripe_event_ids_received_at", "received_at"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
