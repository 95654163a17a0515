"""Retention, and the inbox's monthly partitions it works on.

The inbox (`stripe_events`) is range-partitioned by the month of `received_at`
(models/inbox.py). Three kinds of partition:

- one per month, `stripe_events_2027_01`: made ahead by `prepare_partitions` (the
  `prepare_inbox_partitions` job, daily: this month and the next two);
- `stripe_events_legacy`: the table as it was before partitioning, every time up to the first
  month the migration made (models/migrations/versions/0018_partitioned_inbox.py);
- `stripe_events_default`: whatever no other partition holds, so an insert never fails for
  want of a partition. Rows land there only when the job has not run for months, or when
  retention keeps the unfinished events of a month it drops (below). When the job makes a
  month's partition, it moves that month's rows out of DEFAULT into it.

Retention (`purge`):

1. A partition whose whole range is past `events_before` (a month, or the legacy table once its
   last month is) goes whole: in one transaction it is detached, its `parked`, `received` and
   `retrying` events are inserted back through the parent (they land in DEFAULT, with their
   original `received_at`, visible to the sweeper, replay and the CLI as before) and the table
   is dropped. DETACH takes ACCESS EXCLUSIVE on the inbox for that transaction (CONCURRENTLY
   is refused while a DEFAULT partition exists): catalog changes, the few unfinished events
   moved and a file unlinked, milliseconds, with a short `lock_timeout` (3 s) so a long query on
   the inbox makes retention try again the next night rather than stall the receivers behind
   it (inserts queue behind a waiting DETACH: they wait at most those 3 s, within the
   receiver's 10 s statement timeout).
   A month's partition is thus dropped once its last day is past retention: an event stays
   from INBOX_RETENTION_DAYS up to a month more.
2. In DEFAULT and the legacy table, `processed` and `ignored` events past retention are still
   deleted row by row, in small batches, each its own short transaction (rows picked by key,
   SKIP LOCKED so a row someone holds is left for the next night rather than waited on), with
   their ids in `stripe_event_ids`.
3. From the transaction of the last batch of events on, the ids of dropped months are deleted
   from `stripe_event_ids` (the key table that keeps event ids unique across partitions,
   domain/inbox.py): those older than the oldest month still in place, whose event is gone,
   in batches like the events' (and within the same budget). This is the part of the
   inbox's retention still row by row, on narrow rows with two indexes (no payload, no TOAST):
   about half the time of deleting the same events in batches, against a fifth of it for
   dropping their partition (benchmarks/retention_bench.py, 160,000 events).
4. Finished job runs past `job_runs_before`, in batches.

A purge may be given a time budget: it stops after the batch that spends it and says it is not
finished, and the caller runs it again for the rest. Every run picks what is past retention
afresh, so a run that never comes (its message lost, its worker killed) loses nothing: the next
one deletes what it would have.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg.errors import LockNotAvailable
from sqlalchemy import TextClause, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import EventStatus
from models.db import SessionFactory

log = logging.getLogger(__name__)

SCHEMA = "marketplace_worker"
PARENT = f"{SCHEMA}.stripe_events"
DEFAULT = "stripe_events_default"
# Statuses of events retention deletes; every other is still work, or an operator's turn.
FINISHED = (EventStatus.PROCESSED, EventStatus.IGNORED)
KEPT = tuple(status.value for status in EventStatus if status not in FINISHED)
_FINISHED_SQL = ", ".join(f"'{status.value}'" for status in FINISHED)
# How long a partition change waits for the inbox's lock before giving up until the next run.
PARTITION_LOCK_TIMEOUT = "3s"
# Months of partitions kept ready beyond the current one.
MONTHS_AHEAD = 2

_PARTITIONS = text(f"""
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = '{PARENT}'::regclass
""")
_BOUND = re.compile(r"FOR VALUES FROM \((MINVALUE|'[^']*')\) TO \((MAXVALUE|'[^']*')\)")

_DELETE_JOB_RUNS = text("""
DELETE FROM marketplace_worker.job_runs
WHERE id IN (
    SELECT id FROM marketplace_worker.job_runs
    WHERE started_at < :cutoff AND outcome <> 'running'
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
""")

@dataclass(frozen=True)
class Partition:
    name: str
    start: datetime | None  # None: MINVALUE, or the DEFAULT partition
    end: datetime | None  # None: MAXVALUE, or the DEFAULT partition

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT

    @property
    def is_month(self) -> bool:
        return self.start is not None and self.end is not None

    def overlaps(self, start: datetime, end: datetime) -> bool:
        if self.is_default:
            return False
        return (self.start is None or self.start < end) and (self.end is None or start < self.end)


def _bound(literal: str) -> datetime | None:
    return None if literal in ("MINVALUE", "MAXVALUE") else datetime.fromisoformat(literal.strip("'"))


def partitions(session: Session) -> list[Partition]:
    """The inbox's partitions, oldest range first, DEFAULT last."""
    found = []
    for name, bound in session.execute(_PARTITIONS):
        match = _BOUND.fullmatch(bound)
        if match is None:
            found.append(Partition(name, None, None))  # DEFAULT
        else:
            found.append(Partition(name, _bound(match[1]), _bound(match[2])))
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(found, key=lambda p: (p.is_default, p.start or datetime.min.replace(tzinfo=UTC), p.end or far))


def month_start(moment: datetime, ahead: int = 0) -> datetime:
    """The first instant (UTC) of the month `ahead` months after `moment`'s."""
    moment = moment.astimezone(UTC)
    index = moment.year * 12 + moment.month - 1 + ahead
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


# --- partitions made ahead -----------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    created: list[str]
    moved: int  # rows moved out of DEFAULT into the partitions created

    def counts(self) -> dict[str, int]:
        return {"partitions_created": len(self.created), "rows_moved": self.moved}


def prepare_partitions(sessions: SessionFactory, now: datetime, months_ahead: int = MONTHS_AHEAD) -> Prepared:
    """Make the partitions of this month and the next `months_ahead` that are missing, each in
    its transaction: the table is made apart, DEFAULT's rows of its month are moved into it,
    then it is attached. ATTACH takes SHARE UPDATE EXCLUSIVE on the inbox (inserts and reads
    go on) and ACCESS EXCLUSIVE on DEFAULT, whose rows are checked against the new range."""
    created, moved = [], 0
    for ahead in range(months_ahead + 1):
        start, end = month_start(now, ahead), month_start(now, ahead + 1)
        with sessions() as session:
            if any(p.overlaps(start, end) for p in partitions(session)):
                continue
            moved += _create_month(session, start, end)
        created.append(f"stripe_events_{start:%Y_%m}")
    return Prepared(created, moved)


def _create_month(session: Session, start: datetime, end: datetime) -> int:
    name = f"{SCHEMA}.stripe_events_{start:%Y_%m}"
    bounds = {"start": start, "end": end}
    session.execute(text(f"SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'"))
    # DEFAULT first: no insert may add a row of this month to it between the move and ATTACH.
    session.execute(text(f"LOCK TABLE {SCHEMA}.{DEFAULT} IN ACCESS EXCLUSIVE MODE"))
    session.execute(text(
        f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING COMPRESSION)"))
    moved = session.execute(text(f"""
        WITH moved AS (
            DELETE FROM {SCHEMA}.{DEFAULT} WHERE received_at >= :start AND received_at < :end RETURNING *
        )
        INSERT INTO {name} SELECT * FROM moved
    """), bounds).rowcount
    # The check lets ATTACH skip scanning the new table for rows outside its range.
    literal = {key: value.isoformat() for key, value in bounds.items()}
    session.execute(text(f"""
        ALTER TABLE {name} ADD CONSTRAINT stripe_events_{start:%Y_%m}_range
        CHECK (received_at >= '{literal["start"]}' AND received_at < '{literal["end"]}')
    """))
    session.execute(text(f"""
        ALTER TABLE {PARENT} ATTACH PARTITION {name}
        FOR VALUES FROM ('{literal["start"]}') TO ('{literal["end"]}')
    """))
    session.execute(text(f"ALTER TABLE {name} DROP CONSTRAINT stripe_events_{start:%Y_%m}_range"))
    return moved


# --- retention -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Purged:
    events: int  # deleted row by row
    job_runs: int
    transactions: int
    # False when the budget ran out before everything past retention was deleted.
    finished: bool = True
    months_dropped: int = 0  # partitions dropped whole
    events_kept: int = 0  # unfinished events of those partitions, moved to DEFAULT
    event_ids: int = 0  # rows deleted from stripe_event_ids

    def counts(self) -> dict[str, int | bool]:
        counts: dict[str, int | bool] = {
            "events_deleted": self.events, "job_runs_deleted": self.job_runs, "transactions": self.transactions}
        for key, value in (("months_dropped", self.months_dropped), ("events_kept", self.events_kept),
                           ("event_ids_deleted", self.event_ids)):
            if value:
                counts[key] = value
        return counts if self.finished else {**counts, "finished": False}


def drop_expired(sessions: SessionFactory, before: datetime) -> tuple[int, int]:
    """(partitions dropped, events kept): every partition whose whole range is before `before`,
    its unfinished events moved to DEFAULT first. One transaction per partition."""
    dropped = kept = 0
    with sessions() as session:
        expired = [p for p in partitions(session) if p.end is not None and p.end <= before]
    for partition in expired:
        try:
            with sessions() as session:
                session.execute(text(f"SET LOCAL lock_timeout = '{PARTITION_LOCK_TIMEOUT}'"))
                session.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {SCHEMA}.{partition.name}"))
                # No partition holds the detached range any more: these rows land in DEFAULT.
                moved = session.execute(text(
                    f"INSERT INTO {PARENT} SELECT * FROM {SCHEMA}.{partition.name} WHERE status = ANY(:kept)"
                ), {"kept": list(KEPT)}).rowcount
                session.execute(text(f"DROP TABLE {SCHEMA}.{partition.name}"))
        except OperationalError as error:
            if not isinstance(error.orig, LockNotAvailable):
                raise
            # A long query holds the inbox: the partition stays, for the next run.
            log.warning("inbox partition %s not dropped: the inbox stayed locked", partition.name)
            break
        dropped += 1
        kept += moved
    return dropped, kept


def _delete_events(row_partitions: list[str]) -> TextClause:
    """Up to :batch processed or ignored events before :cutoff from the partitions deleted row
    by row (the legacy table first, then DEFAULT), with their ids; returns their count."""
    picks, deletes = [], []
    for i, name in enumerate(row_partitions):
        taken = " - ".join(["CAST(:batch AS bigint)", *(f"(SELECT count(*) FROM pick_{j})" for j in range(i))])
        picks.append(f"""pick_{i} AS (
            SELECT id, received_at FROM {SCHEMA}.{name}
            WHERE status IN ({_FINISHED_SQL}) AND received_at < :cutoff
            LIMIT {taken}
            FOR UPDATE SKIP LOCKED
        )""")
        deletes.append(f"""gone_{i} AS (
            DELETE FROM {SCHEMA}.{name} WHERE (id, received_at) IN (SELECT id, received_at FROM pick_{i})
            RETURNING id
        )""")
    gone = " UNION ALL ".join(f"SELECT id FROM gone_{i}" for i in range(len(row_partitions)))
    return text(f"""
        WITH {", ".join(picks + deletes)},
        gone AS ({gone}),
        ids AS (DELETE FROM {SCHEMA}.stripe_event_ids WHERE id IN (SELECT id FROM gone))
        SELECT count(*) FROM gone
    """)


def _delete_event_ids(row_partitions: list[str]) -> TextClause:
    """Up to :batch ids whose event is gone, received in [:after, :upto): :upto is before every
    month still in place, so their events could only be in the partitions deleted row by row,
    the only ones looked in. Oldest first, from where the previous batch stopped, so the ids
    kept (their events unfinished, or locked) are not read again by every batch."""
    absent = " AND ".join(
        f"NOT EXISTS (SELECT FROM {SCHEMA}.{name} e WHERE e.id = k.id)" for name in row_partitions) or "true"
    return text(f"""
        DELETE FROM {SCHEMA}.stripe_event_ids
        WHERE id IN (
            SELECT k.id FROM {SCHEMA}.stripe_event_ids k
            WHERE k.received_at >= :after AND k.received_at < :upto AND {absent}
            ORDER BY k.received_at
            LIMIT :batch
            FOR UPDATE SKIP LOCKED
        )
        RETURNING received_at
    """)


def _in_batches(sessions: SessionFactory, work: Callable[[Session], int], batch: int,
                deadline: float | None) -> tuple[int, int, bool]:
    """(rows deleted, transactions, finished): transactions of `work` until one deletes less
    than `batch` rows, or until the monotonic clock passes `deadline`."""
    deleted = transactions = 0
    while True:
        with sessions() as session:
            count = work(session)
        transactions += 1
        deleted += count
        if count < batch:
            return deleted, transactions, True
        if deadline is not None and time.monotonic() >= deadline:
            return deleted, transactions, False


def purge(sessions: SessionFactory, *, events_before: datetime, job_runs_before: datetime, batch: int,
          budget: timedelta | None = None) -> Purged:
    """Drop the partitions past retention, then delete what is past retention row by row, events
    first; `sessions()` opens one committed transaction. With a `budget`, stop after the batch
    that spends it (at least one batch runs): the result says whether anything is left."""
    deadline = None if budget is None else time.monotonic() + budget.total_seconds()
    months, kept = drop_expired(sessions, events_before)
    with sessions() as session:
        remaining = partitions(session)
    row_partitions = [p.name for p in remaining if not p.is_month]  # the legacy table and DEFAULT
    months_left = [p.start for p in remaining if p.is_month]
    ids_upto = min([events_before, *months_left])
    delete_events, delete_ids = _delete_events(row_partitions), _delete_event_ids(row_partitions)
    progress = {"events": 0, "ids": 0, "events_done": False, "after": datetime.min.replace(tzinfo=UTC)}

    def events_then_ids(session: Session) -> int:
        # Events first, their ids with them; then, from the transaction of the last batch of
        # events on, the ids of the dropped months.
        if not progress["events_done"]:
            events = session.execute(delete_events, {"cutoff": events_before, "batch": batch}).scalar_one()
            progress["events"] += events
            if events >= batch:
                return events
            progress["events_done"] = True
        times = session.execute(delete_ids, {
            "after": progress["after"], "upto": ids_upto, "batch": batch}).scalars().all()
        progress["ids"] += len(times)
        if times:
            progress["after"] = max(times)
        return len(times)

    _, event_transactions, finished = _in_batches(sessions, events_then_ids, batch, deadline)
    done = {"months_dropped": months, "events_kept": kept}
    if not finished:
        return Purged(progress["events"], 0, event_transactions, finished=False, event_ids=progress["ids"], **done)
    job_runs, job_run_transactions, finished = _in_batches(
        sessions, lambda session: session.execute(
            _DELETE_JOB_RUNS, {"cutoff": job_runs_before, "batch": batch}).rowcount,
        batch, deadline)
    return Purged(progress["events"], job_runs, event_transactions + job_run_transactions, finished,
                  event_ids=progress["ids"], **done)
