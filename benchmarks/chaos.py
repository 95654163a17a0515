"""The chaos run: nothing accepted is lost or applied twice, whatever the faults.

    python -m benchmarks.chaos [--events 20000] [--broker redis|amqp] [--seed N] [--rate DELIVERIES_PER_S] [--logs DIR]

Starts its own embedded Postgres and Redis (so its faults hit nothing else, whatever
DATABASE_URL / REDIS_URL say), a receiver process, two worker processes and beat, then
delivers `--events` events of realistic Stripe histories (invoice lifecycles of every outcome
in both invoice shapes, refunds, disputes, Connect onboarding, transfers and reversals,
payouts, deauthorizations): 30 % of them twice, all in random order, mixed with 5 % hostile
requests (forged, wrongly signed, stale, unsigned, malformed, not an event, oversize), while
it SIGKILLs a worker process tree 5 times (restarting it), restarts the broker once with
messages in flight and restarts Postgres once (connections cut; the receiver answers 503
meanwhile and the client retries as Stripe does). The broker is the embedded Redis, or with
`--broker amqp` the machine's RabbitMQ (a vhost of the run's own; RABBITMQ_URL names another
server), restarted with `rabbitmqctl stop_app` / `start_app`. The receiver, workers and beat
run as the worker's least-privilege database role.

After the drain it builds the reference: the accepted distinct events processed once each, in
order (created, then id), by the same domain code in this process, on a second database seeded
identically; the provider-stats full pass runs on both and the databases are compared table by
table. The reference runs the same code without faults, duplicates or disorder, so equality
proves the outcome does not depend on them; an oracle computed from the histories alone
checks the outcome of every invoice on top. How it works: harness/chaos/__init__.py.

Prints events accepted, rejections by reason (and whether each was the right answer),
processed, parked (with errors), lost, applied twice, mismatches against the reference and
the time to drain after the last fault. Exits 1 if anything is lost, applied twice,
mismatched, or wrongly answered. `--logs DIR` keeps the processes' logs.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from harness.chaos.run import ChaosConfig, run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="distinct Stripe events to generate")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a run (histories, order, fault moments)")
    parser.add_argument("--rate", type=float, default=None,
                        help="deliveries per second (default: as fast as the receiver answers)")
    parser.add_argument("--worker-kills", type=int, default=5)
    parser.add_argument("--broker", choices=("redis", "amqp"), default="redis",
                        help="amqp: the machine's RabbitMQ (quorum queues), restarted during the run")
    parser.add_argument("--logs", type=Path, default=None, help="copy the processes' logs here")
    args = parser.parse_args()
    # A SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C: the servers started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.broker == "amqp":
        from harness.brokers import rabbitmq_missing

        missing = rabbitmq_missing()
        if missing:
            print(f"--broker amqp: {missing}", file=sys.stderr)
            return 2
    config = ChaosConfig(events=args.events, seed=args.seed, rate=args.rate, worker_kills=args.worker_kills,
                         broker=args.broker)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mw-chaos-") as tmp:
        work = Path(tmp)
        try:
            report = run_chaos(config, work, log=log)
        finally:
            if args.logs is not None:
                shutil.copytree(work, args.logs, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("postgres", "beat-schedule*", "*.pid"))
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
