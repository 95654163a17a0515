"""The chaos run, shortened (the full one: `python -m benchmarks.chaos`).

A few hundred events of realistic Stripe histories, 30 % delivered twice, in random order,
with 5 % hostile requests, to a real receiver and two real worker processes, while one worker
is SIGKILLed, Redis is restarted with messages in flight and Postgres is restarted. The
database must then equal a reference built from the accepted events processed once, in order,
by the same domain code (tests/support/chaos.py explains why that proves order, duplication
and fault independence). The run happens once; each test checks one promise of it.

It starts its own embedded Postgres and Redis whatever DATABASE_URL / REDIS_URL say: the
faults must hit nobody else.
"""

from __future__ import annotations

import pytest

from tests.support.chaos import HOSTILE, ChaosConfig, ChaosReport, run_chaos

pytestmark = [pytest.mark.flow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> ChaosReport:
    config = ChaosConfig(events=400, worker_kills=1, redis_restarts=1, postgres_restarts=1, rate=40, seed=8)
    result = run_chaos(config, tmp_path_factory.mktemp("chaos"), log=lambda message: None)
    print(result.format())  # shown with the first failing test
    return result


def test_the_faults_happened_while_events_were_in_flight(report):
    kinds = sorted(f.kind for f in report.faults if f.kind != "worker_exited")
    assert kinds == ["kill_worker", "restart_postgres", "restart_redis"]
    redis_restart = next(f for f in report.faults if f.kind == "restart_redis")
    assert redis_restart.in_flight > 0, "Redis was restarted with no message in flight"
    postgres_restart = next(f for f in report.faults if f.kind == "restart_postgres")
    if postgres_restart.at + postgres_restart.seconds < report.delivery_seconds:
        # Deliveries went on while Postgres was down: some were answered 503, retried, accepted.
        assert any(a.unavailable and a.status == 200 for a in report.answers)


def test_every_hostile_request_is_refused_with_its_status_and_nothing_of_it_stored(report):
    hostile = [a for a in report.answers if a.delivery.kind != "genuine"]
    assert {a.delivery.kind for a in hostile} == set(HOSTILE)
    assert [(a.delivery.kind, a.status, a.outcome) for a in report.wrong_answers()] == []
    assert report.hostile_stored == []


def test_nothing_accepted_is_lost(report):
    assert report.drained, "events still received/retrying after the drain timeout"
    assert report.never_accepted == []
    assert report.lost == []
    assert report.parked == []


def test_nothing_is_applied_twice(report):
    assert report.applied_twice == []


def test_the_database_equals_the_events_processed_once_in_order(report):
    assert report.reference.failures == {}
    assert [m.describe() for m in report.mismatches] == []


def test_every_invoice_ends_as_its_history_says(report):
    """Including invoices paid as they were finalized, whose events all share one second."""
    assert report.oracle == []
