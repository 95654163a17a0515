"""Soak: a steady stream of webhooks for minutes; memory of the receiver and the workers, and
processing lag.

    python -m benchmarks.soak [--minutes 10] [--rate 500]

Starts its own embedded Postgres and Redis (harness/chaos/servers.py `Servers`, whatever
DATABASE_URL / REDIS_URL say), one receiver process (`marketplace-worker webhook`), two worker
processes (`celery -A worker worker`, 2 pool processes each) and `celery -A worker beat` (inbox
sweeper and incremental provider stats at their default cadences; the jobs that call Stripe
are off). Then posts `--rate` signed events per second for `--minutes`: realistic invoice
lifecycles (every outcome, both invoice shapes, refunds and disputes), two hundred invoices in
progress at a time, each invoice's events in order, about marketplace invoices seeded
beforehand; bodies of Stripe's size (benchmarks/receiver_bench.py `stripe_body`: full objects,
pretty-printed).

Reports:
- the rate achieved and any answer other than 200;
- the RSS of the receiver and of each worker (main process and pool children together) at the
  start, taken after a warm-up of 10 % of the run (at least 30 s: imports, connection pools and
  caches filled), and at the end of the stream, with the growth, which must stay under 10 %,
  and the peak;
- processing lag (`processed_at - received_at` in the inbox): p50, p99 and max over the whole
  run and over its last minute, the backlog when the stream stops and the time to drain it.

Exits 1 when an RSS grew by 10 % or more, or an event was not processed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import psycopg

from benchmarks.receiver_bench import stripe_body
from harness import stripe_events as se
from harness.chaos.deliveries import PATHS, SECRETS
from harness.chaos.run import settings_env, wait_drained, worker_env
from harness.chaos.scenario import GeneratedEvent, prepare_database
from harness.chaos.servers import Servers
from harness.flow import ReceiverProcess
from harness.services import scratch_database
from harness.workers import BeatProcess, WorkerProcess, schedule_env

ACTIVE_INVOICES = 200
PROVIDERS = 200
CLIENTS = 2_000
EVENTS_PER_INVOICE = 6  # fewer than the lifecycles' average: more invoices than needed
GROWTH_LIMIT = 0.10


def amount_of(invoice_id: int) -> int:
    """The seeded amount of an invoice; the SQL seed computes the same."""
    return 500 + (invoice_id * 7_919) % 200_000


def seed(conninfo: str, invoices: int) -> None:
    params = {"users": PROVIDERS + CLIENTS, "providers": PROVIDERS, "clients": CLIENTS, "invoices": invoices}
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            """INSERT INTO "User" (id, email, "updatedAt")
               SELECT 'soak-user-' || g, 'soak-user-' || g || '@example.test', now()
               FROM generate_series(1, %(users)s) g""", params)
        conn.execute(
            """INSERT INTO marketplace.providers (id, "userId", "providerType", "businessName", "paymentMode",
                   "updatedAt")
               SELECT g, 'soak-user-' || g, 'service_provider', 'Soak provider ' || g, 'stripe', now()
               FROM generate_series(1, %(providers)s) g""", params)
        conn.execute(
            """INSERT INTO "Invoice" (id, "invoiceNumber", status, "amountCents", "amountPaidCents", currency,
                   "isMarketplaceInvoice", "marketplaceInvoiceType", "clientUserId", "marketplaceProviderId",
                   "updatedAt")
               SELECT g, 'SOAK-' || g, 'open', 500 + (g::bigint * 7919) %% 200000, 0, 'usd', true, 'service',
                      'soak-user-' || (%(providers)s + 1 + g %% %(clients)s), 1 + g %% %(providers)s, now()
               FROM generate_series(1, %(invoices)s) g""", params)


class Stream:
    """Events of many invoices in progress at once, each invoice's in its own order."""

    def __init__(self, rng: random.Random, start: int) -> None:
        self.rng = rng
        self.start = start
        self.next_invoice = itertools.count(1)
        self.active: list[list[dict]] = []

    def _lifecycle(self) -> list[dict]:
        invoice_id = next(self.next_invoice)
        outcome = se.OUTCOMES[invoice_id % len(se.OUTCOMES)]
        timeline = se.invoice_lifecycle(
            str(invoice_id), amount_of(invoice_id), shape=se.SHAPES[invoice_id // len(se.OUTCOMES) % 2],
            outcome=outcome, start=self.start + invoice_id * 60,
            dispute_outcome="won" if outcome == "paid_disputed" else None,
        )
        return list(reversed(timeline))

    def next(self) -> GeneratedEvent:
        while len(self.active) < ACTIVE_INVOICES:
            self.active.append(self._lifecycle())
        slot = self.rng.randrange(len(self.active))
        event = self.active[slot].pop()
        if not self.active[slot]:
            self.active[slot] = self._lifecycle()
        return GeneratedEvent(event["id"], event["type"], "connect" if event.get("account") else "platform",
                              event["created"], stripe_body(event))


class Sampler(threading.Thread):
    """RSS of each watched process tree every few seconds."""

    def __init__(self, trees: dict[str, callable], every: float = 5.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.trees = trees
        self.every = every
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.stopping = threading.Event()

    @staticmethod
    def rss(pid: int) -> int:
        try:
            main = psutil.Process(pid)
            return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def sample(self) -> None:
        self.samples.append((time.monotonic(), {name: self.rss(pid()) for name, pid in self.trees.items()}))

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.sample()

    def at(self, moment: float) -> dict[str, int]:
        return min(self.samples, key=lambda s: abs(s[0] - moment))[1]

    def peak(self, name: str) -> int:
        return max(s[1][name] for s in self.samples)


async def post_stream(url: str, stream: Stream, rate: float, seconds: float, connections: int) -> dict:
    """Posts on a fixed schedule (event i at start + i/rate) over keep-alive connections.

    A bare HTTP/1.1 client on asyncio streams: the load generator shares the machine's CPUs
    with everything it measures, and a full HTTP library costs several times more per request.
    """
    host, _, port = url.removeprefix("http://").partition(":")
    answers: dict[int, int] = {}
    retried = 0
    next_index = itertools.count()
    started = time.monotonic()
    sent = 0

    async def connection() -> None:
        nonlocal retried, sent
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while True:
                index = next(next_index)
                due = started + index / rate
                if due - started >= seconds:
                    return
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                event = stream.next()
                sent += 1
                while True:
                    head = (f"POST {PATHS[event.endpoint]} HTTP/1.1\r\nHost: {host}\r\n"
                            f"Content-Type: application/json; charset=utf-8\r\n"
                            f"Stripe-Signature: {se.sign(event.body, SECRETS[event.endpoint])}\r\n"
                            f"Content-Length: {len(event.body)}\r\n\r\n").encode()
                    writer.write(head + event.body)
                    status_line, _, headers = (await reader.readuntil(b"\r\n\r\n")).partition(b"\r\n")
                    length = next(int(line.split(b":", 1)[1]) for line in headers.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:"))
                    await reader.readexactly(length)
                    status = int(status_line.split()[1])
                    if status != 503:
                        answers[status] = answers.get(status, 0) + 1
                        break
                    retried += 1
                    await asyncio.sleep(0.5)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return {"sent": sent, "seconds": time.monotonic() - started, "answers": answers, "retried": retried}


def lag(conninfo: str, since_seconds_before_end: float | None, stream_end_db) -> tuple[float, float, float, int]:
    where = "processed_at IS NOT NULL"
    params: dict = {}
    if since_seconds_before_end is not None:
        where += " AND received_at >= %(end)s - make_interval(secs => %(window)s) AND received_at <= %(end)s"
        params = {"end": stream_end_db, "window": since_seconds_before_end}
    with psycopg.connect(conninfo) as conn:
        p50, p99, worst, n = conn.execute(
            f"""SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at)),
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at)),
                       max(extract(epoch FROM processed_at - received_at)), count(*)
                FROM marketplace_worker.stripe_events WHERE {where}""",
            params,
        ).fetchone()
    return float(p50 or 0), float(p99 or 0), float(worst or 0), n


def mib(n: int) -> str:
    return f"{n / 2**20:7.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0, help="events posted per second")
    parser.add_argument("--workers", type=int, default=2, choices=range(1, 9), metavar="1..8")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (requests in flight at most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # A SIGTERM (a `timeout`, a CI cancel) unwinds like Ctrl-C: the servers started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    seconds = args.minutes * 60
    warmup = max(30.0, seconds * 0.10)
    invoices = int(args.rate * seconds / EVENTS_PER_INVOICE) + 2 * ACTIVE_INVOICES
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mw-soak-") as tmp, Servers(Path(tmp)) as servers, \
            scratch_database(servers.server_url, "soak") as database_url:
        work = Path(tmp)
        env = worker_env(database_url, servers.redis_url) | schedule_env({"sweep_inbox": 60, "incremental_stats": 60})
        with settings_env(env):
            prepare_database(database_url)
            seed(database_url, invoices)
            log(f"seeded {invoices} marketplace invoices; starting receiver, {args.workers} workers and beat")
            from celery import Celery

            probe = Celery("soak-probe", broker=servers.redis_url, set_as_current=False)
            workers = {n: WorkerProcess(env, work / f"worker-{n}.log", 2, probe, name=f"soak{n}")
                       for n in range(1, args.workers + 1)}
            try:
                with ReceiverProcess(env, work / "receiver.log") as receiver, BeatProcess(env, work):
                    for worker in workers.values():
                        worker.start()
                    trees = {"receiver": lambda: receiver.proc.pid}
                    trees |= {f"worker {n}": (lambda w=w: w.proc.pid) for n, w in workers.items()}
                    # The broker holds the backlog: shown, not judged.
                    sampler = Sampler(trees | {"redis": servers.redis_pid})
                    sampler.sample()
                    idle = sampler.samples[0][1]
                    sampler.start()
                    log(f"posting {args.rate:.0f} events/s for {seconds:.0f} s (warm-up {warmup:.0f} s)")
                    stream = Stream(random.Random(args.seed), int(time.time()) - 200 * se.DAY)
                    stream_started = time.monotonic()
                    result = asyncio.run(post_stream(receiver.url, stream, args.rate, seconds, args.connections))
                    stream_ended = time.monotonic()
                    sampler.sample()
                    sampler.stopping.set()
                    with psycopg.connect(database_url) as conn:
                        stream_end_db = conn.execute("SELECT now()").fetchone()[0]
                        backlog = conn.execute(
                            "SELECT count(*) FROM marketplace_worker.stripe_events "
                            "WHERE status IN ('received', 'retrying')").fetchone()[0]
                    log(f"stream done: {result['sent']} events in {result['seconds']:.1f} s; backlog {backlog}; "
                        f"draining")
                    drained = wait_drained(database_url, 1800)
                    drain_seconds = time.monotonic() - stream_ended
            finally:
                for worker in workers.values():
                    worker.stop()
                probe.close()

        with psycopg.connect(database_url) as conn:
            statuses = dict(conn.execute(
                "SELECT status, count(*) FROM marketplace_worker.stripe_events GROUP BY 1").fetchall())
        whole = lag(database_url, None, None)
        last_minute = lag(database_url, 60, stream_end_db)

    start = sampler.at(stream_started + warmup)
    end = sampler.at(stream_ended)
    print(f"\nsoak: {args.rate:.0f} events/s asked for {seconds:.0f} s; {args.workers} workers x 2 processes, "
          f"1 receiver, on {psutil.cpu_count()} CPUs")
    print(f"posted {result['sent']} events in {result['seconds']:.1f} s = {result['sent'] / result['seconds']:.0f}/s "
          f"({result['sent'] / result['seconds'] / args.rate:.0%} of the rate asked); answers "
          f"{dict(sorted(result['answers'].items()))}, 503s retried {result['retried']}")
    kept_up = (result["sent"] - backlog) / result["seconds"]
    print(f"inbox: {dict(sorted(statuses.items()))}; processed {kept_up:.0f} events/s while the stream ran "
          f"({'kept up' if backlog < args.rate * 5 else 'did not keep up'}); backlog when it stopped {backlog}, "
          f"drained {'in' if drained else 'NOT within'} {drain_seconds:.1f} s")
    print(f"RSS          idle        start (after {warmup:.0f} s)  end        growth   peak")
    grew = False
    for name in trees:
        growth = end[name] / start[name] - 1 if start[name] else float("inf")
        grew |= growth >= GROWTH_LIMIT
        print(f"  {name:<10} {mib(idle[name])}  {mib(start[name])}        {mib(end[name])}  {growth:+7.1%}  "
              f"{mib(sampler.peak(name))}")
    print(f"  (redis      {mib(idle['redis'])}  {mib(start['redis'])}        {mib(end['redis'])}  "
          f"{end['redis'] / start['redis'] - 1:+7.1%}  {mib(sampler.peak('redis'))}: the broker holds the backlog)")
    for label, (p50, p99, worst, n) in (("whole run", whole), ("last minute of the stream", last_minute)):
        print(f"processing lag, {label} ({n} events): p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {worst * 1000:.0f} ms")
    unprocessed = sum(v for k, v in statuses.items() if k not in ("processed", "ignored"))
    verdict = not grew and not unprocessed and drained
    print(f"verdict: {'OK' if verdict else 'FAILED'} (RSS growth limit {GROWTH_LIMIT:.0%})")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
