"""`marketplace-worker`: the operator's command line (SPEC §6).

Every command exits 0 when it did its job and non-zero with a one-line reason
when it could not.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from config import ConfigError
from models import EventStatus

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marketplace-worker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", help="create or upgrade the worker's own tables (marketplace_worker schema)")

    p = sub.add_parser("webhook", help="serve the Stripe webhook receiver")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)

    p = sub.add_parser("dev", help="run the whole stack locally on embedded Postgres and Redis")
    p.add_argument("--data-dir", default=".dev-data", help="where the embedded servers keep data")
    p.add_argument("--port", type=int, default=8000, help="receiver port")
    p.add_argument("--flower-port", type=int, default=5555)

    p = sub.add_parser("events", help="list inbox events")
    p.add_argument("--status", choices=list(EventStatus))
    p.add_argument("--type")
    p.add_argument("--limit", type=int, default=50)

    p = sub.add_parser("replay", help="re-enqueue an event, or every parked one")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("event_id", nargs="?")
    target.add_argument("--parked", action="store_true")

    sub.add_parser("poll", help="run one invoice poll now")

    p = sub.add_parser("stats", help="recompute provider stats")
    p.add_argument("--full", action="store_true", help="every provider, not just touched ones")
    p.add_argument("--provider", type=int, help="one provider id")

    p = sub.add_parser(
        "reconcile", help="reconcile Stripe Connect transfers and payouts; exits 3 while discrepancies are open"
    )
    p.add_argument("--account", help="one connected account (acct_...)")
    p.add_argument("--since", help="start of the window, YYYY-MM-DD (UTC)")

    p = sub.add_parser(
        "catch-up", help="store the events Stripe has that the endpoints never received; exits 1 if a scope failed"
    )
    p.add_argument("--account", help="one connected account (acct_...); default: the platform and flagged accounts")
    p.add_argument("--since", help="list from this date, YYYY-MM-DD (UTC), at most 30 days back; "
                                   "without --account, every connected account too")

    p = sub.add_parser(
        "backfill", help="build the ledger from Stripe's history (list endpoints); resumable; exits 1 if a part failed"
    )
    p.add_argument("--since", required=True, help="invoices, charges, refunds, disputes, transfers and payouts "
                                                  "created from this date, YYYY-MM-DD (UTC)")
    p.add_argument("--account", help="only this connected account's transfers and payouts (acct_...)")
    p.add_argument("--restart", action="store_true", help="start over even where a run with this date got")

    p = sub.add_parser("jobs", help="recent scheduled job runs")
    p.add_argument("--limit", type=int, default=30)
    p.add_argument("--job", help="one job, e.g. poll_invoices")
    return parser


@command("migrate")
def _migrate(args: argparse.Namespace) -> int:
    from config import get_settings
    from models.migrate import upgrade

    upgrade(get_settings().database_url)
    print("migrations applied")
    return 0


@command("webhook")
def _webhook(args: argparse.Namespace) -> int:
    from worker.receiver import serve

    serve(args.host, args.port)
    return 0


@command("events")
def _events(args: argparse.Namespace) -> int:
    from domain.inbox import recent_events
    from models.db import session_scope

    with session_scope() as session:
        rows = recent_events(session, limit=args.limit, status=args.status, type=args.type)
        print(f"{'EVENT':<32} {'TYPE':<34} {'STATUS':<10} {'TRIES':>5}  {'RECEIVED (UTC)':<19}  LAST ERROR")
        for e in rows:
            received = e.received_at.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{e.id:<32} {e.type:<34} {e.status:<10} {e.attempts:>5}  {received:<19}  {e.last_error or ''}")
    return 0


@command("replay")
def _replay(args: argparse.Namespace) -> int:
    from domain.inbox import mark_for_replay
    from models.db import session_scope
    from tasks.events import enqueue_events
    from worker import get_app

    get_app()  # the broker the events are enqueued on
    with session_scope() as session:
        try:
            ids = mark_for_replay(session, None if args.parked else args.event_id)
        except LookupError as error:
            print(f"marketplace-worker replay: {error}", file=sys.stderr)
            return 1
    if ids:
        enqueue_events(ids)
    print(f"re-enqueued {len(ids)} event(s)")
    return 0


@command("stats")
def _stats(args: argparse.Namespace) -> int:
    from config import get_settings
    from domain import stats
    from models import Provider
    from models.db import get_engine, session_scope
    from tasks.stats import full_stats, incremental_stats

    if args.full and args.provider is not None:
        print("marketplace-worker stats: --full and --provider cannot be combined", file=sys.stderr)
        return 2
    settings = get_settings()

    def show(changes: list[stats.StatsChange]) -> None:
        for change in changes:
            print(change.describe())

    if args.full:
        def full_pass() -> stats.FullPassResult:
            with get_engine().connect() as connection:
                return stats.full_pass(connection, batch_size=settings.stats_full_batch_size, on_changes=show)

        full = full_stats.run_by_hand(full_pass)
        print(f"{full.changed} of {full.providers} provider(s) changed")
        return 0
    if args.provider is not None:
        with session_scope() as session:
            if session.get(Provider, args.provider) is None:
                print(f"marketplace-worker stats: no provider {args.provider}", file=sys.stderr)
                return 1
            result = stats.recompute_providers(session, [args.provider])
    else:
        result = incremental_stats.run_by_hand()
    show(result.changes)
    print(f"{len(result.changes)} of {result.recomputed} provider(s) changed")
    return 0


@command("jobs")
def _jobs(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC

    from domain.jobs import recent_runs
    from models.db import session_scope

    def moment(value) -> str:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"

    with session_scope() as session:
        runs = recent_runs(session, limit=args.limit, job=args.job)
    print(f"{'JOB':<22} {'SLOT (UTC)':<19}  {'STARTED (UTC)':<19}  {'TOOK':>8}  {'OUTCOME':<8} DETAIL")
    for run in runs:
        took = f"{(run.finished_at - run.started_at).total_seconds():.1f}s" if run.finished_at else "-"
        detail = run.error or run.reason or (json.dumps(run.counts) if run.counts is not None else "")
        print(f"{run.job:<22} {moment(run.slot):<19}  {moment(run.started_at):<19}  {took:>8}  {run.outcome:<8} {detail}")
    return 0


@command("poll")
def _poll(args: argparse.Namespace) -> int:
    from tasks.polling import poll_invoices

    result = poll_invoices.run_by_hand()
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(result.skipped.items()))
    print(
        f"created {result.created}, advanced {result.advanced}, "
        f"refreshed from Stripe {result.refreshed_from_stripe}, skipped {sum(result.skipped.values())}"
        + (f" ({skipped})" if skipped else "")
    )
    return 0


@command("reconcile")
def _reconcile(args: argparse.Namespace) -> int:
    """Exit 0: no open discrepancy (in the account, with --account); 3: some are open."""
    from collections import Counter
    from datetime import UTC, datetime

    from config import get_settings
    from domain.connect import run as connect_run
    from domain.connect.reader import reader_for
    from models.db import get_engine, session_scope
    from tasks.reconciliation import reconcile_all

    since = None
    if args.since:
        try:
            since = int(datetime.strptime(args.since, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
        except ValueError:
            print("marketplace-worker reconcile: --since must be a date, YYYY-MM-DD", file=sys.stderr)
            return 2
    settings = get_settings()
    reader = reader_for(settings)
    if args.account:
        done = connect_run.reconcile_accounts(session_scope, get_engine(), reader, [args.account],
                                              settings=settings, since=since)
        if done.results[0].skipped == "no_provider":
            print(f"marketplace-worker reconcile: no stripe_connect provider has {args.account}", file=sys.stderr)
            return 1
    else:
        done = reconcile_all.run_by_hand(lambda: connect_run.reconcile_active(
            session_scope, get_engine(), reader, settings=settings, since=since))
    for result in done.results:
        if args.account or result.skipped or result.completed or result.opened or result.resolved:
            print(result.describe())
    print(done.describe())

    with session_scope() as session:
        discrepancies = connect_run.open_discrepancies(session, args.account)
    if not discrepancies:
        print("no open discrepancies")
        return 0
    by_kind = Counter(d.kind for d in discrepancies)
    print(f"{len(discrepancies)} open discrepancies: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())))
    print(f"{'KIND':<19} {'SUBJECT':<28} {'ACCOUNT':<22} {'EXPECTED':>12} {'SEEN':>12}  {'FIRST SEEN (UTC)':<16}  DETAIL")
    for d in discrepancies:
        first_seen = d.first_seen_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{d.kind:<19} {d.subject:<28} {d.account:<22} {_money(d.expected_cents):>12} "
              f"{_money(d.seen_cents):>12}  {first_seen:<16}  {d.detail}")
    return 3


@command("catch-up")
def _catch_up(args: argparse.Namespace) -> int:
    """Exit 0: every scope listed; 1: some could not be (named on stderr); 2: bad arguments."""
    import time
    from datetime import UTC, datetime

    from domain import catchup
    from domain.stripe_api import get_client
    from models.db import session_scope
    from tasks.events import catch_up_events, enqueue_stored
    from worker import get_app

    since = None
    if args.since:
        try:
            since = int(datetime.strptime(args.since, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
        except ValueError:
            print("marketplace-worker catch-up: --since must be a date, YYYY-MM-DD", file=sys.stderr)
            return 2
        now = int(time.time())
        if since > now:
            print("marketplace-worker catch-up: --since is in the future", file=sys.stderr)
            return 2
        if since < now - catchup.STRIPE_RETENTION_SECONDS:
            print("marketplace-worker catch-up: --since is older than the 30 days of events Stripe keeps",
                  file=sys.stderr)
            return 2
    if args.account:
        with session_scope() as session:
            if args.account not in catchup.connect_accounts(session):
                reason = ("is deauthorized: Stripe no longer shows the platform its events"
                          if catchup.is_deauthorized(session, args.account) else "belongs to no stripe_connect provider")
                print(f"marketplace-worker catch-up: {args.account} {reason}", file=sys.stderr)
                return 1
    client = get_client()
    get_app()  # the broker the stored events are enqueued on
    result = catch_up_events.run_by_hand(lambda: enqueue_stored(catchup.catch_up(
        session_scope, client, accounts=[args.account] if args.account else None, since=since)))
    if result.gap:
        print(f"every connected account flagged: {result.gap}")
    print(f"listed {len(result.scopes)} scope(s) with {result.calls} Stripe call(s): {result.listed} event(s), "
          f"{len(result.stored)} new and enqueued; {result.reads.read} account(s) read to settle ties")
    if result.failed:
        for scope, error in sorted(result.failed.items()):
            print(f"{scope}: {error}")
        first = sorted(result.failed)[0]
        print(f"marketplace-worker catch-up: {len(result.failed)} scope(s) could not be listed "
              f"(first: {first}); they stay flagged and are retried", file=sys.stderr)
        return 1
    return 0


@command("backfill")
def _backfill(args: argparse.Namespace) -> int:
    """Exit 0: everything backfilled; 1: a stream or an account failed (rerun to resume); 2: bad arguments."""
    import time
    from datetime import UTC, datetime

    from domain import backfill, catchup
    from domain.jobs import run_job
    from domain.stripe_api import get_client
    from models.db import session_scope

    try:
        since = int(datetime.strptime(args.since, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    except ValueError:
        print("marketplace-worker backfill: --since must be a date, YYYY-MM-DD", file=sys.stderr)
        return 2
    if since > time.time():
        print("marketplace-worker backfill: --since is in the future", file=sys.stderr)
        return 2
    if args.account:
        with session_scope() as session:
            if args.account not in catchup.connect_accounts(session):
                reason = ("is deauthorized: Stripe no longer shows the platform its payouts"
                          if catchup.is_deauthorized(session, args.account)
                          else "belongs to no stripe_connect provider")
                print(f"marketplace-worker backfill: {args.account} {reason}", file=sys.stderr)
                return 1
    client = get_client()
    # One line per page for someone watching; nothing when the output goes to a file or a pipe.
    show = sys.stderr.isatty()

    def progress(page: backfill.Progress) -> None:
        if show:
            what = "transaction(s) reconciled" if page.stream == backfill.CONNECT else "object(s) so far"
            print(f"backfill {page.stream:<8} {page.scope:<24} page {page.pages:>5}: {page.objects} {what}",
                  file=sys.stderr)

    try:
        # A job run only by hand: no task, no schedule.
        result = run_job("backfill", lambda: backfill.backfill(
            session_scope, client, since=since, account=args.account, restart=args.restart, on_page=progress))
    except backfill.BackfillBusy as error:
        print(f"marketplace-worker backfill: {error}", file=sys.stderr)
        return 1
    objects = ", ".join(f"{stream} {n}" for stream, n in result.objects.items()) or "nothing new"
    print(f"backfill from {args.since}: {result.pages} page(s) with {result.calls} Stripe call(s): {objects}; "
          f"{len(result.accounts)} account(s) reconciled")
    if result.already_done:
        print(f"already done by an earlier run: {', '.join(result.already_done)}")
    if result.skipped:
        skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(result.skipped.items()))
        print(f"left without a transaction: {skipped}")
    for account in result.accounts:
        print(account.describe())
    if result.deauthorized:
        print(f"deauthorized, not listed: {', '.join(result.deauthorized)}")
    if result.failed:
        for scope, error in sorted(result.failed.items()):
            print(f"{scope}: {error}")
    if result.waiting:
        print(f"connected accounts wait for the platform streams: {result.waiting}")
    if not result.complete:
        first = sorted(result.failed)[0]
        print(f"marketplace-worker backfill: {len(result.failed)} part(s) failed (first: {first}: "
              f"{result.failed[first]}); rerun the same command to resume", file=sys.stderr)
        return 1
    return 0


def _money(cents: int | None) -> str:
    if cents is None:
        return "-"
    sign, cents = ("-" if cents < 0 else ""), abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"


@command("dev")
def _dev(args: argparse.Namespace) -> int:
    from worker.dev import run_dev_stack

    return run_dev_stack(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from worker.logging_setup import configure_logging

    if not logging.getLogger().handlers:  # like basicConfig: a host program's logging stays
        configure_logging()
    handler = COMMANDS.get(args.command)
    if handler is None:
        print(f"marketplace-worker: {args.command} is not available yet", file=sys.stderr)
        return 2
    try:
        return handler(args)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line for the operator; details in the log above
        logging.getLogger("marketplace_worker").debug("command failed", exc_info=True)
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"marketplace-worker {args.command}: {type(error).__name__}: {first_line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
