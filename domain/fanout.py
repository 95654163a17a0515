"""Durable fan-out: the work a job publishes as task messages, recorded until it is done.

A job such as `reconcile_all` turns one beat message into one task message per account. The
broker alone would be the only record of that work, and a broker loses messages: a Redis
without persistence restarts empty, a failover or a flush drops its lists, a RabbitMQ queue
can be purged. So, as the inbox is for webhook events, `marketplace_worker.fanout_items` is
the truth:

- `record` adds one row per piece (task, key, args) in the job's transaction, before any
  message is published; a piece already pending for the same (task, key) is not added
  again, so an account waiting for its reconciliation is not queued twice;
- the task calls `start` first (False: the piece is finished, the message was a duplicate),
  `postpone` when it schedules a retry (the retry's message is due only after its
  countdown), and `finish` with its outcome, `ok` or `failed` (retries exhausted, or an error
  no retry cures: the piece is not retried for ever);
- the fan-out sweeper (beat, every minute) calls `due_for_sweep`, which claims the pieces
  whose message is lost and pushes their `due_at`, then re-enqueues them.

A piece counts as lost when it is not finished and either
  * not started `sweep_after` seconds after its message was due, while its queue holds no
    ready message (nothing ahead of it could still be its message; a piece prefetched by a
    worker may be sent twice, and its second message finds it finished), or
  * not started `stale_after` seconds after it was due, whatever the queue holds (a queue
    that never drains must not hide a lost piece), or
  * started, but past its lease (the task's hard time limit): the run died with its worker
    and its message went with the broker.

So after a broker loss every pending piece runs again within `sweep_after` plus a sweeper
period of the broker's return, without waiting for a visibility timeout or the next night.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from models.fanout import FanoutOutcome


@dataclass(frozen=True)
class Piece:
    id: int
    task: str
    key: str
    args: list[Any]


_RECORD = text(
    """
    INSERT INTO marketplace_worker.fanout_items (job, run_id, task, key, args)
    SELECT :job, :run_id, :task, p.key, p.args
    FROM unnest(CAST(:keys AS text[]), CAST(:args AS jsonb[])) AS p(key, args)
    ON CONFLICT (task, key) WHERE finished_at IS NULL DO NOTHING
    RETURNING id, key, args
    """
)


def record(session: Session, job: str, run_id: int | None, task: str,
           pieces: Iterable[tuple[str, list[Any]]]) -> list[Piece]:
    """Record the pieces (key, task args) a job is about to publish; returns the new ones, the
    only ones to publish (the others are already pending)."""
    pieces = list({key: args for key, args in pieces}.items())
    if not pieces:
        return []
    rows = session.execute(_RECORD, {
        "job": job, "run_id": run_id, "task": task,
        "keys": [key for key, _ in pieces], "args": [json.dumps(args) for _, args in pieces],
    })
    return sorted((Piece(row.id, task, row.key, row.args) for row in rows), key=lambda p: p.key)


def start(session: Session, item_id: int, lease_seconds: int) -> bool:
    """Mark the piece started (again, after a redelivery); False when it is already finished."""
    row = session.execute(
        text(
            "UPDATE marketplace_worker.fanout_items SET started_at = now(),"
            " lease_until = now() + make_interval(secs => :lease)"
            " WHERE id = :id AND finished_at IS NULL RETURNING id"
        ),
        {"id": item_id, "lease": lease_seconds},
    ).first()
    return row is not None


def postpone(session: Session, item_id: int, seconds: float) -> None:
    """A retry is scheduled: its message is due once the countdown is over."""
    session.execute(
        text(
            "UPDATE marketplace_worker.fanout_items SET due_at = now() + make_interval(secs => :seconds),"
            " started_at = NULL, lease_until = NULL WHERE id = :id AND finished_at IS NULL"
        ),
        {"id": item_id, "seconds": float(seconds)},
    )


def finish(session: Session, item_id: int, outcome: FanoutOutcome, error: str | None = None) -> None:
    session.execute(
        text(
            "UPDATE marketplace_worker.fanout_items SET finished_at = now(), outcome = :outcome, error = :error,"
            " lease_until = NULL WHERE id = :id AND finished_at IS NULL"
        ),
        {"id": item_id, "outcome": outcome, "error": error},
    )


_DUE = text(
    """
    WITH lost AS (
        SELECT id FROM marketplace_worker.fanout_items
        WHERE finished_at IS NULL AND enqueues < :max_enqueues
          AND ((started_at IS NULL AND due_at < now() - make_interval(secs => :sweep_after)
                AND task IN :idle_tasks)
               OR (started_at IS NULL AND due_at < now() - make_interval(secs => :stale_after))
               OR lease_until < now())
        ORDER BY due_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE marketplace_worker.fanout_items f
    SET due_at = now(), enqueues = f.enqueues + 1, started_at = NULL, lease_until = NULL
    FROM lost WHERE f.id = lost.id
    RETURNING f.id, f.task, f.key, f.args
    """
).bindparams(bindparam("idle_tasks", expanding=True))


def pending_tasks(session: Session) -> list[str]:
    """The tasks that have pieces not finished (the sweeper checks their queues)."""
    return list(session.execute(text(
        "SELECT DISTINCT task FROM marketplace_worker.fanout_items WHERE finished_at IS NULL"
    )).scalars())


# A piece whose task dies every time (killed at its hard time limit, or with its worker) is
# given up after this many messages, as `failed`, instead of being re-enqueued for ever.
MAX_ENQUEUES = 10

_GIVE_UP = text(
    f"""
    UPDATE marketplace_worker.fanout_items
    SET finished_at = now(), outcome = '{FanoutOutcome.FAILED}', lease_until = NULL,
        error = 'given up after ' || enqueues || ' messages: its task never finished'
    WHERE finished_at IS NULL AND enqueues >= :max_enqueues AND (lease_until < now()
          OR (started_at IS NULL AND due_at < now() - make_interval(secs => :stale_after)))
    RETURNING id
    """
)


def due_for_sweep(session: Session, *, sweep_after: int, stale_after: int, idle_tasks: list[str],
                  limit: int = 1000) -> list[Piece]:
    """Claim the pieces whose message is lost (see the module docstring) for re-enqueueing:
    their `due_at` moves to now, so a piece is not re-enqueued again before `sweep_after`."""
    session.execute(_GIVE_UP, {"max_enqueues": MAX_ENQUEUES, "stale_after": stale_after})
    rows = session.execute(_DUE, {
        "max_enqueues": MAX_ENQUEUES,
        "sweep_after": sweep_after, "stale_after": stale_after, "limit": limit,
        # An empty IN () is not SQL: a task name no piece has stands for "no idle queue".
        "idle_tasks": idle_tasks or [""],
    })
    return [Piece(row.id, row.task, row.key, row.args) for row in rows]


def purge_finished(session: Session, older_than_days: int, limit: int = 1000) -> int:
    """Delete up to `limit` pieces finished more than `older_than_days` ago."""
    return session.execute(text(
        """DELETE FROM marketplace_worker.fanout_items WHERE id IN (
               SELECT id FROM marketplace_worker.fanout_items
               WHERE finished_at < now() - make_interval(days => :days) LIMIT :limit)"""
    ), {"days": older_than_days, "limit": limit}).rowcount
