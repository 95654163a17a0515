"""Providers whose stats may have changed, for the stats job's incremental pass."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

# A plain INSERT: it locks nothing another transaction waits for, so webhooks of one
# provider run side by side. The stats pass claims the committed rows (domain/stats.py).
_TOUCH = text(
    """
    INSERT INTO marketplace_worker.touched_providers (provider_id)
    SELECT unnest(CAST(:ids AS integer[]))
    """
)


def touch_providers(session: Session, provider_ids: Iterable[int]) -> None:
    ids = sorted({int(i) for i in provider_ids if i is not None})
    if ids:
        session.execute(_TOUCH, {"ids": ids})
