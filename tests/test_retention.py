"""Retention (domain/retention.py): a purge given a time budget stops and leaves the rest to
the next run; the nightly job sends that run itself, so a backlog of months is purged through
short tasks, and a run whose message is lost is made up by the next one. Whatever the number of
runs, exactly the processed and ignored events past retention go, and the finished job runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import retention
from models.db import session_scope
from harness.brokers import broker_run
from harness.flow import WorkerProcess, wait_for

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
