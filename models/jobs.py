"""Scheduled job runs: one row per attempt, including the attempts that were skipped."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, DateTime, Index, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base, one_of


class JobOutcome(StrEnum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # another run held the job's lock or had this beat slot already


class JobRun(Base):
    __tablename__ = "job_runs"
    __table_args__ = (
        one_of("outcome", JobOutcome, name="outcome"),
        # Once per slot: one running or successful run of a job per beat slot, whichever beat
        # process fired it (the duplicates are recorded as skipped); a failed run leaves the
        # slot to a retry.
        Index(
            "uq_job_runs_job_slot", "job", "slot",
            unique=True, postgresql_where=text("outcome IN ('running', 'ok')"),
        ),
        Index("ix_job_runs_job_started_at", "job", "started_at"),
        Index("ix_job_runs_started_at", "started_at"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job: Mapped[str] = mapped_column(Text)
    # The beat slot (grid instant) the run was fired for; NULL for a manual run.
    slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(Text)
    counts: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    # Why a skipped attempt did not run.
    reason: Mapped[str | None] = mapped_column(Text)
