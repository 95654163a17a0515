"""Webhook receiver throughput, and end-to-end processing time.

    python -m benchmarks.receiver_bench [--events 20000] [--workers 2]

Uses the Postgres and Redis named by DATABASE_URL / REDIS_URL (a scratch
database is created and dropped), else embedded ones. Needs `wrk` (Debian
package `wrk`): it POSTs pre-signed, distinct `invoice.finalized` events over
keep-alive connections at concurrency 16 and 64, costing little CPU itself.

Prints, for each concurrency: accepted events/s, p50/p99 latency, and the
events found in the inbox afterwards; next to them, measured in the same run,
the bare rate of the same inbox INSERTs issued straight to Postgres by one
client, one commit per event (the ceiling a receiver without group commit
faces). Then end to end: the time from the first POST until every event is
processed by `--workers` Celery worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psycopg

from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
from harness import stripe_events as se
from harness.flow import ReceiverProcess
from harness.services import test_services
from harness.workers import WorkerProcess

SECRET = "whsec_benchmark_secret_0123456789"

WRK_SCRIPT = textwrap.dedent(
    """
    local counter = 0
    local threads = {}
    function setup(thread)
      thread:set("id", counter)
      counter = counter + 1
      table.insert(threads, thread)
    end
    function init(args)
      bodies, sigs = {}, {}
      local n = 0
      for line in io.lines(args[1]) do
        if n % tonumber(args[2]) == id then
          local tab = line:find("\\t")
          table.insert(sigs, line:sub(1, tab - 1))
          table.insert(bodies, line:sub(tab + 1))
        end
        n = n + 1
      end
      -- wrk calls thread 0's request() once to check the script, before sending anything:
      -- that call gets a health check, so the first body is not spent on it.
      sent = (id == 0) and -1 or 0
      answered, failed = 0, 0
    end
    function delay()
      -- Once a thread's bodies are all out, its connections idle on a slow health check
      -- until the last answer arrives, so fast health checks do not flood the latencies.
      if sent >= #bodies then return 1000 end
      return 0
    end
    function request()
      sent = sent + 1
      if sent < 1 or sent > #bodies then
        return wrk.format("GET", "/healthz")
      end
      return wrk.format("POST", "/webhooks/stripe",
        {["Content-Type"] = "application/json", ["Stripe-Signature"] = sigs[sent]}, bodies[sent])
    end
    function response(status, headers, body)
      if body:find('"status":"ok"', 1, true) then return end
      answered = answered + 1
      if status ~= 200 then failed = failed + 1 end
      if answered >= #bodies then wrk.thread:stop() end
    end
    function done(summary, latency, requests)
      local f, a = 0, 0
      for _, t in ipairs(threads) do
        f = f + t:get("failed")
        a = a + t:get("answered")
      end
      io.write(string.format("RESULT p50_us=%d p99_us=%d non200=%d accepted=%d requests=%d\\n",
        latency:percentile(50), latency:percentile(99), f, a - f, summary.requests))
    end
    """
)


def signed_lines(invoice_ids: list[int], stripe_ids: list[str]) -> list[str]:
    now = int(time.time())
    lines = []
    for app_id, stripe_id in zip(invoice_ids, stripe_ids):
        obj = se.invoice(shape="basil", id=stripe_id, app_invoice_id=app_id, amount=10_000,
                         status="open", include_payments=False)
        body = json.dumps(se.event("invoice.finalized", obj, created=now))
        lines.append(f"{se.sign(body, SECRET, now)}\t{body}")
    return lines


def seed_invoices(conninfo: str, count: int, offset: int) -> tuple[list[int], list[str]]:
    """Marketplace invoices the events are about, so the workers do real work."""
    with psycopg.connect(conninfo) as conn:
        conn.execute(
            """
            INSERT INTO "User" (id, email, "updatedAt") VALUES ('bench-user', 'bench@example.test', now())
            ON CONFLICT DO NOTHING;
            INSERT INTO marketplace.providers ("userId", "providerType", "businessName", "updatedAt")
            SELECT 'bench-user', 'service_provider', 'Bench', now()
            WHERE NOT EXISTS (SELECT 1 FROM marketplace.providers);
            """
        )
        rows = conn.execute(
            """
            INSERT INTO "Invoice" ("invoiceNumber", status, "amountCents", "stripeInvoiceId",
                "isMarketplaceInvoice", "clientUserId", "marketplaceProviderId", "updatedAt")
            SELECT 'BENCH-' || g, 'open', 10000, 'in_bench' || g, true, 'bench-user',
                   (SELECT min(id) FROM marketplace.providers), now()
            FROM generate_series(%s::int, %s::int) AS g
            RETURNING id, "stripeInvoiceId"
            """,
            (offset + 1, offset + count),
        ).fetchall()
    return [r[0] for r in rows], [r[1] for r in rows]


def bare_insert_rate(conninfo: str, lines: list[str]) -> float:
    """One client, one INSERT and one commit per event: what each request would cost alone."""
    events = [event_from_dict(json.loads(l.split("\t", 1)[1]), l.split("\t", 1)[1], "platform",
                              livemode=False) for l in lines]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        started = time.perf_counter()
        for event in events:
            conn.execute(INSERT_EVENTS_SQL, insert_params([event]))
        elapsed = time.perf_counter() - started
        conn.execute("DELETE FROM marketplace_worker.stripe_events WHERE endpoint = 'platform'")
    return len(events) / elapsed


def run_wrk(url: str, lines: list[str], concurrency: int, work: Path, conninfo: str) -> dict:
    """POST every line once; returns when all of them are in the inbox."""
    data = work / f"events-{concurrency}.tsv"
    data.write_text("\n".join(lines) + "\n")
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    threads = 2
    with psycopg.connect(conninfo, autocommit=True) as watch:  # one connection for all the polling
        before = count(watch)
        wrk = subprocess.Popen(
            ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", "600s", "--timeout", "10s",
             "-s", str(script), url, "--", str(data), str(threads)],
            stdout=subprocess.PIPE, text=True,
        )
        # wrk runs for its whole duration even when every thread has stopped: stop it (SIGINT
        # makes it print its summary) once the inbox has stopped growing.
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 2 and wrk.poll() is None:
            now_count = count(watch) - before
            if now_count != last:
                last, still_since = now_count, time.monotonic()
            time.sleep(0.5)  # light polling: the machine's CPU belongs to what is measured
    wrk.send_signal(signal.SIGINT)
    out = wrk.communicate(timeout=30)[0]
    result = dict(item.split("=") for item in out.split("RESULT ", 1)[1].split())
    with psycopg.connect(conninfo) as conn:
        # The receiver's own commit times: the rate excludes the load generator's start and stop.
        span = conn.execute(
            "SELECT extract(epoch FROM max(received_at) - min(received_at)) FROM "
            "(SELECT received_at FROM marketplace_worker.stripe_events ORDER BY received_at DESC LIMIT %s) t",
            (last,),
        ).fetchone()[0]
    return {"stored": last, "seconds": float(span), "p50_ms": int(result["p50_us"]) / 1000,
            "p99_ms": int(result["p99_us"]) / 1000, "non200": int(result["non200"]),
            "accepted": int(result["accepted"]), "requests": int(result["requests"])}


def count(conn: psycopg.Connection, where: str = "true") -> int:
    return conn.execute(f"SELECT count(*) FROM marketplace_worker.stripe_events WHERE {where}").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, test_services(Path(tmp)) as (database_url, redis_url):
        work = Path(tmp)
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "STRIPE_WEBHOOK_SECRETS": SECRET,
               "LOG_LEVEL": "WARNING"}
        os.environ.update(env)
        from models.migrate import create_app_tables_if_absent, upgrade

        create_app_tables_if_absent(database_url)
        upgrade(database_url)
        conninfo = database_url

        n = args.events
        print(f"{n} distinct signed invoice.finalized events per run; receiver: 1 process")
        ids, stripe_ids = seed_invoices(conninfo, n, 0)
        ceiling = bare_insert_rate(conninfo, signed_lines(ids, stripe_ids))
        print(f"ceiling  one client, INSERT + COMMIT per event: {ceiling:8.0f} events/s")

        offset = n
        with ReceiverProcess(env, work / "receiver.log") as receiver:
            for concurrency in (16, 64):
                ids, stripe_ids = seed_invoices(conninfo, n, offset)
                offset += n
                result = run_wrk(receiver.url, signed_lines(ids, stripe_ids), concurrency, work, conninfo)
                rate = result["stored"] / result["seconds"]
                print(f"c{concurrency:<3}     accepted {rate:8.0f} events/s ({rate / ceiling:.2f}x ceiling)  "
                      f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms  "
                      f"non-200 {result['non200']}  answered 200 {result['accepted']}, "
                      f"in inbox {result['stored']} (sent {n}; requests in the latencies {result['requests']})")

            # End to end: fresh events, workers already waiting on an empty queue.
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("DELETE FROM marketplace_worker.stripe_events")
            import redis

            redis.Redis.from_url(redis_url).flushdb()
            workers = [WorkerProcess(env, work / f"worker-{i}.log") for i in range(args.workers)]
            for worker in workers:
                worker.start()
            ids, stripe_ids = seed_invoices(conninfo, n, offset)
            sent = run_wrk(receiver.url, signed_lines(ids, stripe_ids), 64, work, conninfo)["stored"]
            with psycopg.connect(conninfo, autocommit=True) as watch:
                while count(watch, "status IN ('received', 'retrying')") > 0:
                    time.sleep(0.5)
            with psycopg.connect(conninfo) as conn:
                # From the first event's commit to the last event's processing, as the database saw it.
                elapsed = float(conn.execute(
                    "SELECT extract(epoch FROM max(processed_at) - min(received_at))"
                    " FROM marketplace_worker.stripe_events").fetchone()[0])
            for worker in workers:
                worker.stop()
            with psycopg.connect(conninfo, autocommit=True) as conn:
                done, parked, ignored = (count(conn, f"status = '{s}'") for s in ("processed", "parked", "ignored"))
            print(f"end to end with {args.workers} worker processes: {sent} events in {elapsed:.1f} s = "
                  f"{sent / elapsed:.0f} events/s (processed {done}, parked {parked}, ignored {ignored})")


if __name__ == "__main__":
    sys.exit(main())
