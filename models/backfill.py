"""Where a backfill from Stripe's history got to (`marketplace-worker backfill`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base


class BackfillCursor(Base):
    """One stream of a backfill (`invoices`, `charges`, `refunds`, `disputes` of the platform,
    or `connect` of one connected account): the list position after the last page applied,
    saved in the transaction that applied it, so a rerun asks Stripe for no page twice."""

    __tablename__ = "backfill_cursors"
    __table_args__ = {"schema": WORKER_SCHEMA}

    stream: Mapped[str] = mapped_column(Text, primary_key=True)
    # `platform`, or the connected account (`acct_...`).
    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    # Unix seconds: the run's --since. A run with another one starts the stream over.
    since: Mapped[int] = mapped_column(BigInteger)
    # The last object of the last page applied, and its `created`: where the next page starts.
    starting_after: Mapped[str | None] = mapped_column(Text)
    last_created: Mapped[int | None] = mapped_column(BigInteger)
    pages: Mapped[int] = mapped_column(Integer, server_default="0")
    objects: Mapped[int] = mapped_column(Integer, server_default="0")
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
