"""What the events catch-up and the Connect account sync keep between runs (SPEC §5)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Integer, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from models.base import WORKER_SCHEMA, Base


class CatchupWindow(Base):
    """The events catch-up's window of one scope: the platform (`platform`) or one connected
    account (`acct_...`). Scopes are listed apart so that webhooks of one never hide a gap in
    another; a connected account is listed only while it is flagged, so a healthy run does not
    cost a call per account."""

    __tablename__ = "catchup_windows"
    __table_args__ = {"schema": WORKER_SCHEMA}

    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    # Unix seconds: every event of the scope created before this was listed by catch-up.
    listed_until: Mapped[int | None] = mapped_column(BigInteger)
    # Set while the scope must be listed (a Connect endpoint gap, an operator, a failed listing).
    pending_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pending_reason: Mapped[str | None] = mapped_column(Text)
    # Unix seconds: the next listing reaches back at least this far (the gap's start, --since).
    list_from: Mapped[int | None] = mapped_column(BigInteger)
    # Failed listings in a row, and when the next may be tried.
    failures: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ConnectAccountState(Base):
    """A connected account as its newest applied snapshot left it (event or API read), and the
    durable to-do of an API read when two snapshots tied on `created`."""

    __tablename__ = "connect_account_states"
    __table_args__ = {"schema": WORKER_SCHEMA}

    account: Mapped[str] = mapped_column(Text, primary_key=True)
    # The newest snapshot is an `account.application.deauthorized`: Stripe no longer lets the
    # platform read the account, so catch-up does not list it.
    deauthorized: Mapped[bool] = mapped_column(Boolean, server_default="false")
    # Unix second of the newest tie: an API read sent after this second settles it.
    read_after: Mapped[int | None] = mapped_column(BigInteger)
    read_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    read_error: Mapped[str | None] = mapped_column(Text)
    read_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
