"""Per-object high-water marks: only an event newer than the last one applied to a Stripe
object may overwrite what the worker mirrors of it.

Events are ordered by Stripe's `created`, then by event id (several events about one object
often share a second). Whatever order they arrive in, the state mirrored is the newest one's.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

_ADVANCE = text(
    """
    INSERT INTO marketplace_worker.stripe_object_versions AS old
        (object_id, object_type, event_created, event_id, updated_at)
    VALUES (:object_id, :object_type, :created, :event_id, now())
    ON CONFLICT (object_id) DO UPDATE
        SET event_created = excluded.event_created, event_id = excluded.event_id, updated_at = now()
        WHERE (old.event_created, old.event_id) < (excluded.event_created, excluded.event_id)
    RETURNING 1
    """
)


def advance(session: Session, object_id: str, object_type: str, created: int, event_id: str) -> bool:
    """Record (created, event_id) as the object's newest version; True when it is newer than
    every version recorded before, i.e. the caller may overwrite the object's mirrored state.

    The row lock taken here serializes concurrent writers of one object until commit."""
    row = session.execute(
        _ADVANCE,
        {"object_id": object_id, "object_type": object_type, "created": created, "event_id": event_id},
    ).first()
    return row is not None
