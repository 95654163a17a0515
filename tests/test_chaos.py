"""The chaos run, shortened (the full one: `python -m benchmarks.chaos`).

A few hundred events of realistic Stripe histories, 30 % delivered twice, in random order,
with 5 % hostile requests, to a real receiver and two real worker processes (as the worker's
least-privilege database role), while one worker is SIGKILLed, the broker is restarted with
messages in flight and Postgres is restarted. It runs once on Redis and once on RabbitMQ
(skipped, with the reason, where no RabbitMQ answers). The
database must then equal a reference built from the accepted events processed once, in order,
by the same domain code (harness/chaos/__init__.py explains why that proves order, duplication
and fault independence). The run happens once; each test checks one promise of it.

It starts its own embedded Postgres and Redis whatever DATABASE_URL / REDIS_URL say, and a
vhost of its own on the machine's RabbitMQ: the faults must hit nobody else (a RabbitMQ
restart cuts every client of that server, so nothing else should use it meanwhile).
"""

from __future__ import annotations

import pytest

from harness.brokers import BROKERS, rabbitmq_missing
from harness.chaos.deliveries import HOSTILE
from harness.chaos.report import ChaosReport
from harness.chaos.run import ChaosConfig, run_chaos

pytestmark = [pytest.mark.flow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", params=BROKERS)
def report(request, tmp_path_factory) -> ChaosReport:
    if request.param == "amqp" and rabbitmq_missing():
        pytest.skip(f"amqp variant: {rabbitmq_missing()}")
    # Every fault within the first 60 % of the deliveries: at 40 a second, the 40 % left take
    # longer than any fault's outage, so deliveries go on during each of them and after it.
    config = ChaosConfig(events=400, worker_kills=1, broker_restarts=1, postgres_restarts=1, rate=40, seed=8,
                         fault_window=(0.2, 0.6), broker=request.param)
    result = run_chaos(config, tmp_path_factory.mktemp("chaos"), log=lambda message: None)
    print(result.format())  # shown with the first failing test
    return result


def test_the_faults_happened_while_events_were_in_flight(report):
    kinds = sorted(f.kind for f in report.faults if f.kind != "worker_exited")
    assert kinds == ["kill_worker", "restart_broker", "restart_postgres"]
    broker_restart = next(f for f in report.faults if f.kind == "restart_broker")
    assert broker_restart.in_flight > 0, "the broker was restarted with no message in flight"
    postgres_restart = next(f for f in report.faults if f.kind == "restart_postgres")
    assert postgres_restart.at + postgres_restart.seconds < report.delivery_seconds, \
        "Postgres was still down when the last delivery was answered"
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
