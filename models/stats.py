"""State of the provider stats passes (domain/stats.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer
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
