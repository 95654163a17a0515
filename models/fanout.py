"""Work a scheduled job fanned out: one row per task message it published, kept until the
task is done, so a broker that loses the message does not lose the work (domain/fanout.py)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base, one_of


class FanoutOutcome(StrEnum):
    OK = "ok"
    FAILED = "failed"  # the task failed for good, or never finished (given up by the sweeper)


class FanoutItem(Base):
    __tablename__ = "fanout_items"
    __table_args__ = (
        one_of("outcome", FanoutOutcome, name="outcome"),
        # One pending piece per (task, key): a job that fans out an account already waiting for
        # its reconciliation (the previous run's, or the other job's) adds nothing.
        Index("uq_fanout_items_task_key_pending", "task", "key", unique=True,
              postgresql_where=text("finished_at IS NULL")),
        # The sweeper reads the pending part only.
        Index("ix_fanout_items_due_at_pending", "due_at", postgresql_where=text("finished_at IS NULL")),
        Index("ix_fanout_items_created_at", "created_at"),
        {"schema": WORKER_SCHEMA},
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    job: Mapped[str] = mapped_column(Text)  # the job that fanned it out (job_runs.job)
    run_id: Mapped[int | None] = mapped_column(BigInteger)  # its job_runs.id
    task: Mapped[str] = mapped_column(Text)  # the Celery task name the message is for
    key: Mapped[str] = mapped_column(Text)  # what the piece is about (an account id)
    args: Mapped[list[Any]] = mapped_column(JSONB)  # the task's positional arguments
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # When its current message became runnable: published, or a retry's countdown over.
    due_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    enqueues: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A started piece can still be running until then (its task's hard time limit).
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
