"""Per-object high-water marks: only an event newer than the last one applied to a Stripe
object may overwrite what the worker mirrors of it.

Events are ordered by Stripe's `created`; within one second (an invoice paid as it is
finalized sends all its events in the same second) by the snapshot's own progress, its
`rank` (an invoice's `paid` snapshot is newer than its `open` one), and last by event id.
Whatever order they arrive in, the state mirrored is the newest one's.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

# The version id of a Connect account, transfer or payout read from the API rather than
# delivered by an event: not an event id, and above every `evt_...` (code point order), so a
# read beats an event of its second, and of two versions that tie the later write wins (an
# event's own redelivery rewrites the same data). Invoices read by polling are recorded below
# every event instead (domain.polling.API_READ_EVENT_ID): their snapshots of one second are
# ordered by their progress first.
API_READ_ID = "~api"

_ADVANCE_SQL = """
    INSERT INTO marketplace_worker.stripe_object_versions AS old
        (object_id, object_type, event_created, rank, event_id, updated_at)
    VALUES (:object_id, :object_type, :created, :rank, :event_id, now())
    ON CONFLICT (object_id) DO UPDATE
        SET event_created = excluded.event_created, rank = excluded.rank, event_id = excluded.event_id,
            updated_at = now()
        WHERE (old.event_created, old.rank, old.event_id)
            < (excluded.event_created, excluded.rank, excluded.event_id)
    RETURNING 1
"""
_ADVANCE = text(_ADVANCE_SQL)


def advance(
    session: Session, object_id: str, object_type: str, created: int, event_id: str, rank: int = 0
) -> bool:
    """Record (created, rank, event_id) as the object's newest version; True when it is newer than
    every version recorded before, i.e. the caller may overwrite the object's mirrored state.

    The row lock taken here serializes concurrent writers of one object until commit."""
    row = session.execute(
        _ADVANCE,
        {"object_id": object_id, "object_type": object_type, "created": created, "rank": rank,
         "event_id": event_id},
    ).first()
    return row is not None


def advancing(write: str | None, also: str = "NULL") -> TextClause:
    """One statement that advances an object's version as `advance` does and, only when it is
    newer, stores the snapshot: `write`, an `INSERT ... SELECT ... FROM newer` (one row when
    the version advanced, none otherwise). Half the round trips of `advance` then the write.
    `also`: an expression returned beside the answer, from the same statement: what the
    snapshot replaced, say (it reads the tables as they stood before the statement: Postgres
    shows no part of a statement what another part writes), or locks to take with the version."""
    written = f", written AS ({write})" if write else ""
    return text(f"WITH newer AS ({_ADVANCE_SQL}){written} SELECT EXISTS (SELECT 1 FROM newer), {also}")


def advance_writing_seeing(session: Session, statement: TextClause, object_id: str, object_type: str,
                           created: int, event_id: str, rank: int = 0, **values: Any) -> tuple[bool, Any]:
    """Run an `advancing` statement with the snapshot's `values`; returns what `advance` would,
    and its `also`."""
    newer, before = session.execute(statement, {
        "object_id": object_id, "object_type": object_type, "created": created, "rank": rank,
        "event_id": event_id, **values,
    }).one()
    return newer, before


def advance_writing(session: Session, statement: TextClause, object_id: str, object_type: str, created: int,
                    event_id: str, rank: int = 0, **values: Any) -> bool:
    """`advance_writing_seeing` for what `advance` would return alone."""
    return advance_writing_seeing(session, statement, object_id, object_type, created, event_id, rank, **values)[0]


# `advance` for several versions at once, in two statements: the answers first, each as if
# the versions were advanced one after the other in order (newer than the row as it stood,
# and than every earlier version of its object in the list), the rows locked; then each
# object's newest one written as `advance` writes it. Compared in the database, in its
# collation, as `advance` compares. The rows are read one by one by key: a plan cached
# while the versions table was small would otherwise scan all of it for every batch.
_NEWER_IN_ORDER = text(
    """
    WITH wanted AS (
        SELECT * FROM unnest(CAST(:object_ids AS text[]), CAST(:created AS bigint[]),
                             CAST(:ranks AS smallint[]), CAST(:event_ids AS text[]))
            WITH ORDINALITY AS w(object_id, event_created, rank, event_id, ord)
    ), old AS (
        SELECT v.object_id, v.event_created, v.rank, v.event_id
        FROM (SELECT DISTINCT object_id FROM wanted ORDER BY object_id) w
        CROSS JOIN LATERAL (
            SELECT * FROM marketplace_worker.stripe_object_versions v WHERE v.object_id = w.object_id FOR UPDATE
        ) v
    )
    SELECT (old.object_id IS NULL OR (old.event_created, old.rank, old.event_id)
                                     < (w.event_created, w.rank, w.event_id))
           AND NOT EXISTS (
               SELECT 1 FROM wanted e
               WHERE e.object_id = w.object_id AND e.ord < w.ord
                 AND (e.event_created, e.rank, e.event_id) >= (w.event_created, w.rank, w.event_id)
           ) AS newer
    FROM wanted w LEFT JOIN old USING (object_id)
    ORDER BY w.ord
    """
)

_ADVANCE_ALL = text(
    """
    INSERT INTO marketplace_worker.stripe_object_versions AS old
        (object_id, object_type, event_created, rank, event_id, updated_at)
    SELECT DISTINCT ON (object_id) object_id, object_type, event_created, rank, event_id, now()
    FROM unnest(CAST(:object_ids AS text[]), CAST(:object_types AS text[]), CAST(:created AS bigint[]),
                CAST(:ranks AS smallint[]), CAST(:event_ids AS text[]))
        AS w(object_id, object_type, event_created, rank, event_id)
    ORDER BY object_id, event_created DESC, rank DESC, event_id DESC
    ON CONFLICT (object_id) DO UPDATE
        SET event_created = excluded.event_created, rank = excluded.rank, event_id = excluded.event_id,
            updated_at = now()
        WHERE (old.event_created, old.rank, old.event_id)
            < (excluded.event_created, excluded.rank, excluded.event_id)
    """
)


def advance_all(session: Session, wanted: list[tuple[str, str, int, str, int]]) -> list[bool]:
    """`advance` for each (object_id, object_type, created, event_id, rank) in turn: the same
    answers and the same rows, in two statements whatever their number.

    The answers are read before the rows are written, and an object with no version row yet
    has nothing to lock: the caller must hold a lock that serializes every writer of these
    objects (the invoice snapshots' `"Invoice"` rows, domain/invoice_mirror.py)."""
    if not wanted:
        return []
    object_ids, object_types, created, event_ids, ranks = (list(column) for column in zip(*wanted))
    newer = session.execute(_NEWER_IN_ORDER, {
        "object_ids": object_ids, "created": created, "ranks": ranks, "event_ids": event_ids,
    }).scalars().all()
    session.execute(_ADVANCE_ALL, {
        "object_ids": object_ids, "object_types": object_types, "created": created, "ranks": ranks,
        "event_ids": event_ids,
    })
    return list(newer)
