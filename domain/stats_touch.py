"""Providers whose stats may have changed, for the stats job's incremental pass."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.orm import Session

_TOUCH = text(
    """
    INSERT INTO marketplace_worker.touched_providers (provider_id, touched_at)
    SELECT DISTINCT unnest(CAST(:ids AS integer[])), now()
    ON CONFLICT (provider_id) DO UPDATE SET touched_at = now()
    """
)


def touch_providers(session: Session, provider_ids: Iterable[int]) -> None:
    ids = sorted({int(i) for i in provider_ids if i is not None})
    if ids:
        session.execute(_TOUCH, {"ids": ids})
