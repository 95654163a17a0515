"""Retention (domain/retention.py): a month's partition entirely past retention is dropped
whole, its unfinished events kept (moved to DEFAULT, still visible to the sweeper, replay and
the CLI), a month not entirely past is untouched; the job keeps partitions ready ahead and
moves DEFAULT's rows into the month made for them. What is still deleted row by row (the
legacy table, DEFAULT): a purge given a time budget stops and leaves the rest to the next run;
the nightly job sends that run itself, so a backlog of months is purged through short tasks,
and a run whose message is lost is made up by the next one. Whatever the number of runs,
exactly the processed and ignored events past retention go, and the finished job runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from domain import retention
from models.db import session_scope
from harness.brokers import broker_run
from harness.flow import wait_for
from harness.workers import WorkerProcess

NOW = datetime.now(UTC)
OLD, RECENT = NOW - timedelta(days=120), NOW - timedelta(days=10)


def backlog(session: Session, expired: int) -> set[str]:
    """`expired` processed or ignored events past retention, and events that must stay: old
    parked, received and retrying ones, a recent processed one. Returns the ids that stay."""
    events = {f"evt_expired_{i}": ("processed" if i % 4 else "ignored", OLD) for i in range(expired)}
    stay = {"evt_old_parked": ("parked", OLD), "evt_old_received": ("received", OLD),
            "evt_old_retrying": ("retrying", OLD), "evt_recent_processed": ("processed", RECENT)}
    for event_id, (status, received_at) in {**events, **stay}.items():
        session.execute(text(
            "INSERT INTO marketplace_worker.stripe_events (id, type, livemode, created, payload, endpoint,"
            " status, received_at) VALUES (:id, 'invoice.paid', false, 1, '{}', 'platform', :status, :at)"
        ), {"id": event_id, "status": status, "at": received_at})
    # Job runs: three old finished ones go; an old one still running and a recent one stay.
    for outcome, started_at in (("ok", OLD), ("failed", OLD), ("skipped", OLD), ("running", OLD), ("ok", RECENT)):
        session.execute(text(
            "INSERT INTO marketplace_worker.job_runs (job, outcome, started_at) VALUES ('probe', :outcome, :at)"
        ), {"outcome": outcome, "at": started_at})
    session.commit()
    return set(stay)


def events_left(session: Session) -> set[str]:
    session.rollback()
    return set(session.execute(text("SELECT id FROM marketplace_worker.stripe_events")).scalars())


def probe_runs_left(session: Session) -> list[tuple[str, datetime]]:
    session.rollback()
    return session.execute(text(
        "SELECT outcome, started_at FROM marketplace_worker.job_runs WHERE job = 'probe' ORDER BY id")).all()


def purge_runs(session: Session) -> list[tuple[str, dict]]:
    session.rollback()
    return [(outcome, counts) for outcome, counts in session.execute(text(
        "SELECT outcome, counts FROM marketplace_worker.job_runs WHERE job = 'purge_inbox' ORDER BY id"))]


def purge(**kwargs) -> retention.Purged:
    return retention.purge(session_scope, events_before=NOW - timedelta(days=90),
                           job_runs_before=NOW - timedelta(days=30), **kwargs)


def test_a_purge_out_of_budget_stops_after_a_batch_and_the_next_runs_finish_it(db):
    stay = backlog(db, 9)

    runs = [purge(batch=2, budget=timedelta(0))]
    while not runs[-1].finished:
        runs.append(purge(batch=2, budget=timedelta(0)))

    # One batch per run, events first: 2 + 2 + 2 + 2 + 1 events, then 2 + 1 job runs.
    assert [(run.events, run.job_runs, run.finished) for run in runs] == [
        (2, 0, False), (2, 0, False), (2, 0, False), (2, 0, False), (1, 2, False), (0, 1, True)]
    assert events_left(db) == stay
    assert [outcome for outcome, _ in probe_runs_left(db)] == ["running", "ok"]


def test_a_run_whose_next_run_is_lost_is_made_up_by_the_next_beat_run(db, monkeypatch):
    import tasks.maintenance
    from config import get_settings

    stay = backlog(db, 6)
    settings = get_settings().model_copy(update={"retention_run_seconds": 0.001, "retention_batch_size": 4})
    monkeypatch.setattr(tasks.maintenance, "get_settings", lambda: settings)
    sent = []
    monkeypatch.setattr(tasks.maintenance.purge_inbox, "apply_async", lambda *a, **kw: sent.append(1))

    assert tasks.maintenance.purge_inbox() == {
        "events_deleted": 4, "job_runs_deleted": 0, "transactions": 1, "finished": False}
    assert sent == [1]  # the next run's message, which the broker loses
    assert tasks.maintenance.purge_inbox() == {"events_deleted": 2, "job_runs_deleted": 3, "transactions": 2}
    assert sent == [1]
    assert events_left(db) == stay


@pytest.fixture
def impatient_worker(services, work_dir):
    """A worker whose purge runs stop after one batch of 3 rows, on a broker of its own."""
    with broker_run("redis", services, RETENTION_RUN_SECONDS="0.001", RETENTION_BATCH_SIZE="3") as run:
        worker = WorkerProcess(run.env, work_dir / "retention-worker.log", probe=run.app)
        worker.start()
        try:
            yield run
        finally:
            worker.stop()
            run.app.close()


@pytest.mark.flow
def test_a_backlog_beyond_one_run_is_purged_by_runs_that_send_the_next(impatient_worker, db):
    stay = backlog(db, 20)

    impatient_worker.app.send_task("tasks.maintenance.purge_inbox")

    def last_run_finished() -> bool:
        runs = purge_runs(db)
        return bool(runs) and runs[-1][0] == "ok" and "finished" not in runs[-1][1]

    wait_for(last_run_finished, timeout=60, message="the purge's last run")
    runs = purge_runs(db)
    assert {outcome for outcome, _ in runs} == {"ok"}
    # 20 events in batches of 3, one batch per run, then the 3 old job runs.
    assert [counts["events_deleted"] for _, counts in runs] == [3, 3, 3, 3, 3, 3, 2, 0]
    assert sum(counts["job_runs_deleted"] for _, counts in runs) == 3
    assert [counts.get("finished", True) for _, counts in runs] == [False] * 7 + [True]
    assert events_left(db) == stay
    assert [outcome for outcome, _ in probe_runs_left(db)] == ["running", "ok"]


# --- partitions --------------------------------------------------------------------------------

def insert_at(session: Session, events: dict[str, tuple[str, datetime]], *, with_ids: bool = True) -> None:
    for event_id, (status, received_at) in events.items():
        session.execute(text(
            "INSERT INTO marketplace_worker.stripe_events (id, type, livemode, created, payload, endpoint,"
            " status, received_at) VALUES (:id, 'invoice.paid', false, 1, '{}', 'platform', :status, :at)"
        ), {"id": event_id, "status": status, "at": received_at})
        if with_ids:
            session.execute(text("INSERT INTO marketplace_worker.stripe_event_ids VALUES (:id, :at)"),
                            {"id": event_id, "at": received_at})
    session.commit()


def partition_of(session: Session) -> dict[str, str]:
    session.rollback()
    try:
        return dict(session.execute(text(
            "SELECT id, tableoid::regclass::text FROM marketplace_worker.stripe_events")).all())
    finally:
        session.rollback()  # no lock held on the inbox while a partition is detached


def ids_left(session: Session) -> set[str]:
    session.rollback()
    try:
        return set(session.execute(text("SELECT id FROM marketplace_worker.stripe_event_ids")).scalars())
    finally:
        session.rollback()


def test_a_month_past_retention_is_dropped_whole_and_its_unfinished_events_stay_visible(db):
    from domain.inbox import due_for_sweep, mark_for_replay, recent_events
    from models import StripeEvent

    # Two months far ahead, so that "past retention" is a cutoff in their future.
    month = retention.month_start(NOW, 6)
    following = retention.month_start(NOW, 7)
    retention.prepare_partitions(session_scope, month)
    gone = {f"evt_month_{i}": ("processed" if i % 2 else "ignored", month + timedelta(days=i)) for i in range(6)}
    kept = {"evt_month_parked": ("parked", month + timedelta(days=3)),
            "evt_month_received": ("received", month + timedelta(days=4)),
            "evt_month_retrying": ("retrying", month + timedelta(days=5))}
    # The next month is only partly past the cutoff: nothing of it goes, not even its old rows.
    untouched = {"evt_next_early": ("processed", following + timedelta(days=1)),
                 "evt_next_late": ("processed", following + timedelta(days=20))}
    insert_at(db, {**gone, **kept, **untouched})
    assert set(partition_of(db).values()) == {f"marketplace_worker.stripe_events_{month:%Y_%m}",
                                              f"marketplace_worker.stripe_events_{following:%Y_%m}"}

    purged = retention.purge(session_scope, events_before=following + timedelta(days=10),
                             job_runs_before=NOW - timedelta(days=30), batch=1000)

    assert purged.months_dropped >= 1 and purged.events_kept == 3
    where = partition_of(db)
    assert set(where) == set(kept) | set(untouched)
    assert {where[i] for i in kept} == {"marketplace_worker.stripe_events_default"}
    assert {where[i] for i in untouched} == {f"marketplace_worker.stripe_events_{following:%Y_%m}"}
    with session_scope() as session:
        names = {p.name for p in retention.partitions(session)}
        assert f"stripe_events_{month:%Y_%m}" not in names and f"stripe_events_{following:%Y_%m}" in names
        # Kept with their original receipt, found by id, by the CLI, the sweeper and replay.
        assert session.get(StripeEvent, "evt_month_parked").received_at == kept["evt_month_parked"][1]
        assert {e.id for e in recent_events(session, limit=100)} == set(kept) | set(untouched)
        # These months are ahead of the clock: a negative threshold puts the sweeper there.
        year_on = -int(timedelta(days=400).total_seconds())
        assert set(due_for_sweep(session, year_on)) == {"evt_month_received", "evt_month_retrying"}
        assert mark_for_replay(session, "evt_month_parked") == ["evt_month_parked"]
    # The dropped month's ids went from the key table; the kept events' ids stay.
    assert ids_left(db) == set(kept) | set(untouched)

    # The layout of today, for whoever runs next: this month's partition and the next two.
    retention.prepare_partitions(session_scope, NOW)


def _server_has_lz4(session: Session) -> bool:
    try:
        with session.begin_nested():
            session.execute(text("CREATE TEMPORARY TABLE lz4_probe (t text COMPRESSION lz4)"))
            session.execute(text("DROP TABLE lz4_probe"))
        return True
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) != "0A000":  # feature_not_supported: built without it
            raise
        return False


def test_every_partition_compresses_new_payloads_with_lz4_those_there_and_those_made_later(db):
    """Migration 0019: half the database's CPU per stored event. Every partition there (the
    legacy table, the months made, DEFAULT) and a month the job makes afterwards store new
    payloads with lz4; on a server built without lz4 (the embedded one), all with pglz."""
    method = "lz4" if _server_has_lz4(db) else "pglz"
    db.commit()
    later, farther = retention.month_start(NOW, 18), retention.month_start(NOW, 30)
    with session_scope() as session:
        there = retention.partitions(session)
    payload = '{"lines": [%s]}' % ", ".join(['{"amount": 100}'] * 400)  # 6 KB: compressed as it is stored

    def store(partition: str, received_at: datetime) -> None:
        db.execute(text(
            "INSERT INTO marketplace_worker.stripe_events (id, type, livemode, created, payload, endpoint, status,"
            " received_at) VALUES (:id, 'invoice.paid', false, 1, CAST(:payload AS jsonb), 'platform', 'received', :at)"
        ), {"id": f"evt_lz4_{partition}", "at": received_at, "payload": payload})
        db.commit()

    for partition in there:
        store(partition.name, farther if partition.is_default
              else partition.end - timedelta(days=1) if partition.end else partition.start + timedelta(days=1))
    made = f"stripe_events_{later:%Y_%m}"
    assert retention.prepare_partitions(session_scope, later, months_ahead=0).created == [made]
    store(made, later + timedelta(days=2))
    try:
        stored = db.execute(text("SELECT id, tableoid::regclass::text, pg_column_compression(payload)"
                                 " FROM marketplace_worker.stripe_events")).all()
        assert sorted(tuple(row) for row in stored) == sorted(
            (f"evt_lz4_{name}", f"marketplace_worker.{name}", method) for name in [p.name for p in there] + [made])
        assert "stripe_events_default" in {p.name for p in there} and len(there) >= 3  # DEFAULT and at least two ranges
    finally:
        db.rollback()
        db.execute(text(f"DROP TABLE marketplace_worker.{made}"))
        db.commit()


def test_the_job_makes_partitions_ahead_and_moves_default_rows_into_the_month_made_for_them(db):
    import tasks.maintenance

    assert tasks.maintenance.prepare_inbox_partitions() is not None
    with session_scope() as session:
        layout = retention.partitions(session)
    for ahead in range(3):
        start, end = retention.month_start(NOW, ahead), retention.month_start(NOW, ahead + 1)
        assert any(p.overlaps(start, end) for p in layout), start
    assert layout[-1].is_default

    # A month with no partition: its event lands in DEFAULT (the insert does not fail)...
    far = retention.month_start(NOW, 12)
    insert_at(db, {"evt_far": ("received", far + timedelta(days=2))})
    assert partition_of(db) == {"evt_far": "marketplace_worker.stripe_events_default"}

    # ...and moves to its month when the job, reaching that month, makes its partition.
    prepared = retention.prepare_partitions(session_scope, far)
    assert prepared.created[0] == f"stripe_events_{far:%Y_%m}" and prepared.moved == 1
    assert partition_of(db) == {"evt_far": f"marketplace_worker.stripe_events_{far:%Y_%m}"}
    assert retention.prepare_partitions(session_scope, far).created == []  # made once
