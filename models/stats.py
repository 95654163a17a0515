"""State of the provider stats passes (domain/stats.py)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import BigInteger, DateTime, Integer, Numeric
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base


class ProviderStatsRecomputed(Base):
    """When a provider's stats were last recomputed from fresh data, by the database clock.

    The nightly full pass stages every provider's values at one moment and applies them over
    minutes; it leaves alone a provider recomputed after that moment, whose values are newer.
    No foreign key to `marketplace.providers`: the app owns that table and may delete rows.
    """

    __tablename__ = "provider_stats_recomputed"
    __table_args__ = {"schema": WORKER_SCHEMA}

    provider_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    recomputed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProviderStatsStaged(Base):
    """The nightly full pass's fresh values of the providers whose stored stats differ, each
    with the moment its aggregate began; the pass's range tasks apply them (domain/stats.py).

    Computed once per pass, because any range's aggregate reads about the whole transactions
    table. Unlogged: after a database crash it is empty and the ranges write nothing until the
    next pass stages again; nothing else depends on it.
    """

    __tablename__ = "provider_stats_staged"
    __table_args__ = {"schema": WORKER_SCHEMA, "prefixes": ["UNLOGGED"]}

    provider_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    total_listings: Mapped[int] = mapped_column(Integer)
    total_transactions: Mapped[int] = mapped_column(Integer)
    total_revenue_cents: Mapped[int] = mapped_column(BigInteger)
    average_rating: Mapped[Decimal] = mapped_column(Numeric(3, 2))
    staged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
