"""Events catch-up: Stripe calls per run while webhooks arrive normally, at 200 and 2,000
connected accounts, against listing every account each run (the previous design), measured
in the same run.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/4 \\
        python -m benchmarks.catchup_bench [--accounts 2000] [--small 200] [--runs 3] [--traffic 100]

Uses the Postgres and Redis named by DATABASE_URL / REDIS_URL (a scratch database is created
and dropped), else embedded ones; the fake Stripe API (harness/stripe_server.py) runs in
this process and counts the requests of the real SDK. Calls are what is measured, so the
worker's shared rate cap is lifted for the run.

The data: `--small` stripe_connect providers, then `--accounts` in all; every account had an
`account.updated` delivered two days ago. Before each steady-state run, `--traffic` events
(half the platform's, half connected accounts') are created in Stripe and delivered by webhook
to both endpoints, as in normal operation. Prints the first run (no state yet: every account
is listed once); per scale, the steady-state runs and the previous design's run (the platform
and every account, every handled type, over the same hour); then one run after a late Connect
delivery (the endpoint failed: every account is listed once) and the run after it. A
steady-state run costs one call per 20 handled types and per 100 platform events in its window
(the 10 minutes since the last run plus a 5-minute overlap): the platform's own volume, never
the number of accounts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

HOUR = 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="steady-state runs per scale")
    parser.add_argument("--traffic", type=int, default=100, help="webhooks delivered before each steady-state run")
    args = parser.parse_args()

    from harness.services import test_services
    from harness.stripe_server import FakeStripe, serve

    fake = FakeStripe()
    with tempfile.TemporaryDirectory(prefix="mw-catchup-bench-") as work, \
            test_services(Path(work)) as (database_url, redis_url), serve(fake) as base:
        os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "STRIPE_API_KEY": "sk_test_bench",
                           "STRIPE_API_BASE": base, "STRIPE_RATE_LIMIT_PER_S": "100000", "LOG_LEVEL": "ERROR"})
        from config import get_settings

        get_settings.cache_clear()
        from models.migrate import create_app_tables_if_absent, upgrade

        create_app_tables_if_absent(database_url)
        upgrade(database_url)
        return Bench(fake, args).run()


class Bench:
    def __init__(self, fake, args: argparse.Namespace) -> None:
        from domain.stripe_api import get_client

        self.fake, self.args = fake, args
        self.client = get_client()
        self.accounts: list[str] = []
        self.rng = random.Random(7)

    # --- data ----------------------------------------------------------------------------------

    def add_accounts(self, n: int) -> None:
        from models.db import session_scope
        from harness import factories
        from harness import stripe_events as se

        with session_scope() as session:
            new = [factories.provider(session, payment_mode="stripe_connect").stripeConnectAccountId
                   for _ in range(n)]
        now = int(time.time())
        self.deliver([se.account_updated(se.account(id=a), created=now - 2 * 24 * HOUR) for a in new],
                     received_ago=2 * 24 * HOUR)
        self.accounts += new

    def deliver(self, events: list[dict], received_ago: int) -> None:
        """Created in Stripe and delivered by webhook, `received_ago` seconds ago."""
        from sqlalchemy import text

        from domain.inbox import INSERT_EVENTS_SQL, event_from_dict, insert_params
        from models.db import session_scope
        from harness import stripe_events as se

        se.publish(self.fake, events)
        incoming = [event_from_dict(e, json.dumps(e), "connect" if e.get("account") else "platform", livemode=False)
                    for e in events]
        with session_scope() as session:
            session.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params(incoming))
            session.execute(text("UPDATE marketplace_worker.stripe_events "
                                 "SET received_at = now() - make_interval(secs => :ago) WHERE id = ANY(:ids)"),
                            {"ago": received_ago, "ids": [e.id for e in incoming]})

    def traffic(self) -> None:
        from harness import stripe_events as se

        now = int(time.time())
        half = self.args.traffic // 2
        platform = [se.event("invoice.updated", se.invoice(), created=now - 60) for _ in range(half)]
        connect = [se.event("payout.updated", se.payout(amount=100, status="in_transit"), created=now - 60,
                            account=self.rng.choice(self.accounts)) for _ in range(self.args.traffic - half)]
        self.deliver(platform + connect, received_ago=60)

    # --- runs ----------------------------------------------------------------------------------

    def calls(self, run) -> tuple[int, float, object]:
        before = len(self.fake.calls)
        started = time.perf_counter()
        result = run()
        return len(self.fake.calls) - before, time.perf_counter() - started, result

    def catch_up(self):
        from domain.catchup import catch_up
        from models.db import session_scope

        return catch_up(session_scope, self.client)

    def previous_design(self) -> None:
        """What a run cost before: the platform and every connected account, every handled type."""
        from domain.catchup import STRIPE_RETENTION_SECONDS, list_missed_events

        since = int(time.time()) - min(STRIPE_RETENTION_SECONDS - 60, HOUR + 600)
        for account in [None, *self.accounts]:
            list_missed_events(self.client, since, account)

    def scale(self) -> int:
        n = len(self.accounts)
        steady = []
        for _ in range(self.args.runs):
            self.traffic()
            count, seconds, result = self.calls(self.catch_up)
            assert not result.failed and result.gap is None, (result.failed, result.gap)
            steady.append((count, seconds))
        old, old_s, _ = self.calls(self.previous_design)
        counts = ", ".join(str(c) for c, _ in steady)
        mean_s = sum(s for _, s in steady) / len(steady)
        print(f"{n} accounts: steady-state runs: {counts} calls ({mean_s:.2f}s each); listing every account "
              f"(previous design): {old} calls ({old_s:.1f}s); ratio {steady[-1][0] / old:.4f}")
        return steady[-1][0]

    def run(self) -> int:
        from harness import stripe_events as se

        self.add_accounts(self.args.small)
        first, first_s, _ = self.calls(self.catch_up)
        print(f"{len(self.accounts)} accounts: first run (no state yet, every account listed once): {first} calls, "
              f"{first_s:.1f}s")
        small = self.scale()
        self.add_accounts(self.args.accounts - self.args.small)
        self.fake.reset()  # the previous listings' objects are not needed any more
        large = self.scale()
        print(f"Stripe calls per steady-state catch-up run at {len(self.accounts)} accounts: {large} "
              f"(at {self.args.small}: {small}; goal: a constant, not proportional to accounts)")

        now = int(time.time())
        self.deliver([se.event("payout.updated", se.payout(amount=1), created=now - 3 * HOUR,
                               account=self.accounts[0])], received_ago=60)
        gap, gap_s, result = self.calls(self.catch_up)
        self.traffic()
        after, _, _ = self.calls(self.catch_up)
        print(f"{len(self.accounts)} accounts, after a late Connect delivery ({result.gap}): {gap} calls ({gap_s:.1f}s) once, "
              f"then {after} on the next run")
        return 0 if small == large else 1


if __name__ == "__main__":
    raise SystemExit(main())
