"""Scheduled jobs: the schedule table against the job tasks, and a job's task run by beat's
message, by hand, or beside another run of its job; and the direction of the imports around
them (worker → tasks → domain)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import psycopg
import pytest

from tasks.base import job


def _job_tasks() -> dict:
    from tasks.base import JobTask
    from worker import get_app

    app = get_app()
    app.loader.import_default_modules()
    return {name: task for name, task in app.tasks.items() if isinstance(task, JobTask)}


def test_every_scheduled_job_has_its_task_and_every_job_task_is_scheduled_or_manual(services):
    from worker.schedule import JOBS

    job_tasks = _job_tasks()
    scheduled = {job.task for job in JOBS}
    assert len({job.name for job in JOBS}) == len(JOBS)
    assert scheduled <= set(job_tasks)
    assert {name for name, task in job_tasks.items() if not task.manual} <= scheduled
    assert {name for name in scheduled if job_tasks[name].manual} == set()
    for job in JOBS:
        assert job_tasks[job.task].job == job.name


def _runs(services, job: str) -> list[tuple]:
    with psycopg.connect(services["DATABASE_URL"]) as conn:
        return conn.execute(
            "SELECT slot, outcome, counts, reason FROM marketplace_worker.job_runs WHERE job = %s ORDER BY id",
            (job,),
        ).fetchall()


def test_a_job_task_records_its_counts_and_returns_them(db, services):
    from tasks.polling import complete_transactions

    assert complete_transactions() == {"completed": 0}
    assert _runs(services, "complete_transactions") == [(None, "ok", {"completed": 0}, None)]


def test_a_run_by_hand_returns_the_domain_result_and_records_its_counts(db, services):
    from domain.polling import PollResult
    from tasks.polling import poll_invoices

    result = poll_invoices.run_by_hand()
    assert isinstance(result, PollResult)
    [(slot, outcome, counts, _)] = _runs(services, "poll_invoices")
    assert (slot, outcome) == (None, "ok") and counts["created"] == result.created == 0


def test_a_job_task_beside_a_running_run_of_its_job_is_a_skipped_success(db, services):
    from domain.jobs import JobSkipped, run_once
    from tasks.polling import complete_transactions

    inside, release = threading.Event(), threading.Event()

    def holder() -> None:
        with run_once("complete_transactions"):
            inside.set()
            release.wait(20)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert inside.wait(20)
        assert complete_transactions().startswith("skipped: another run is in progress")
        with pytest.raises(JobSkipped):
            complete_transactions.run_by_hand()
    finally:
        release.set()
        thread.join(20)
    assert [outcome for _, outcome, _, _ in _runs(services, "complete_transactions")] == ["ok", "skipped", "skipped"]


def _then_probe(result: dict) -> None:
    from domain.jobs import run_once

    with run_once("then_probe") as run:  # skipped if the run that called it still held the lock
        run.counts = {"after": result["rows"]}


@job(manual=True, then=_then_probe)
def then_probe() -> dict:
    return {"rows": 1}


def test_then_runs_with_the_result_once_the_run_has_let_go_of_the_job(db, services):
    assert then_probe() == {"rows": 1}
    assert [(outcome, counts) for _, outcome, counts, _ in _runs(services, "then_probe")] == [
        ("ok", {"rows": 1}), ("ok", {"after": 1})]


# --- the layers around them -------------------------------------------------------------------

PROJECT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _modules(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(PROJECT)): _imports(path) for path in sorted((PROJECT / package).rglob("*.py"))}


def test_dependencies_point_from_worker_to_tasks_to_domain():
    def importing(package: str, prefix: str) -> set[str]:
        return {path for path, names in _modules(package).items()
                if any(name == prefix or name.startswith(prefix + ".") for name in names)}

    assert importing("tasks", "worker") == set()
    assert importing("domain", "tasks") == set()
    assert importing("domain", "worker") == set()
    # The inbox's bookkeeping is domain/inbox.py's; applying events is the task layer's alone.
    assert importing("worker", "domain.dispatch") == set()
    assert importing("domain", "domain.dispatch") == set()


def test_no_module_is_imported_both_ways():
    """No import cycle among the project's modules, lazy imports included (a package's
    `__init__` importing its own modules is not a cycle)."""
    modules = {}
    for package in ("worker", "tasks", "domain", "models", "config"):
        for path in sorted((PROJECT / package).rglob("*.py")):
            name = ".".join(path.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = _imports(path)
    graph = {name: {target for target in imported if target in modules and target != name
                    and not name.startswith(target + ".") and not target.startswith(name + ".")}
             for name, imported in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    both_ways = sorted((a, b) for a, targets in graph.items() for b in targets if a < b and reaches(b, a))
    assert both_ways == []
