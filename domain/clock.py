"""Time as the main app's tables store it: naive UTC (Prisma's TIMESTAMP(3))."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def from_unix(seconds: int | float | None) -> datetime | None:
    """A Stripe timestamp (unix seconds) as naive UTC; None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
