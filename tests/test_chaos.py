"""The chaos run, shortened (the full one: `python -m benchmarks.chaos`).

A few hundred events of realistic Stripe histories, 30 % delivered twice, in random order,
with 5 % hostile requests, to a real receiver and two real worker processes, while one worker
is SIGKILLed, Redis is restarted with messages in flight and Postgres is restarted. The
database must then equal a reference built from the accepted events processed once, in order,
by the same domain code (tests/support/chaos.py explains why that proves order, duplication
and fault independence).

It starts its own embedded Postgres and Redis whatever DATABASE_URL / REDIS_URL say: the
faults must hit nobody else.
"""

from __future__ import annotations

import pytest

from tests.support.chaos import HOSTILE, ChaosConfig, run_chaos

pytestmark = [pytest.mark.flow, pytest.mark.timeout(300)]


def test_nothing_accepted_is_lost_or_applied_twice_through_crashes_outages_duplicates_and_attacks(tmp_path):
    config = ChaosConfig(events=400, worker_kills=1, redis_restarts=1, postgres_restarts=1, rate=40, seed=8)
    report = run_chaos(config, tmp_path, log=lambda message: None)
    print(report.format())  # pytest shows it when an assertion fails

    assert report.drained, "events still received/retrying after the drain timeout"
    assert report.lost == []
    assert report.never_accepted == []
    assert report.applied_twice == []
    assert [m.describe() for m in report.mismatches] == []
    assert report.oracle == []
    assert report.parked == []

    hostile = [a for a in report.answers if a.delivery.kind != "genuine"]
    assert {a.delivery.kind for a in hostile} == set(HOSTILE)
    assert [(a.delivery.kind, a.status, a.outcome) for a in report.wrong_answers()] == []
    assert report.hostile_stored == []

    kinds = [f.kind for f in report.faults]
    assert kinds.count("kill_worker") == 1 and "restart_redis" in kinds and "restart_postgres" in kinds
    redis_restart = next(f for f in report.faults if f.kind == "restart_redis")
    assert redis_restart.in_flight > 0, "Redis was restarted with no message in flight"
    postgres_restart = next(f for f in report.faults if f.kind == "restart_postgres")
    if postgres_restart.at < report.delivery_seconds - postgres_restart.seconds:
        # Deliveries went on while Postgres was down: some were answered 503, then accepted.
        assert any(a.unavailable and a.status == 200 for a in report.answers)
