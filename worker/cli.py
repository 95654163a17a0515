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
    p.add_argument("--status", choices=["received", "retrying", "processed", "ignored", "parked"])
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

    p = sub.add_parser("reconcile", help="reconcile Stripe Connect transfers and payouts")
    p.add_argument("--account", help="one connected account (acct_...)")
    p.add_argument("--since", help="start of the window, YYYY-MM-DD (UTC)")

    p = sub.add_parser("jobs", help="recent scheduled job runs")
    p.add_argument("--limit", type=int, default=30)
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
    from sqlalchemy import select

    from models import StripeEvent
    from models.db import session_scope

    query = select(StripeEvent).order_by(StripeEvent.received_at.desc()).limit(args.limit)
    if args.status:
        query = query.where(StripeEvent.status == args.status)
    if args.type:
        query = query.where(StripeEvent.type == args.type)
    with session_scope() as session:
        rows = session.execute(query).scalars().all()
        print(f"{'EVENT':<32} {'TYPE':<34} {'STATUS':<10} {'TRIES':>5}  {'RECEIVED (UTC)':<19}  LAST ERROR")
        for e in rows:
            received = e.received_at.strftime("%Y-%m-%d %H:%M:%S")
            print(f"{e.id:<32} {e.type:<34} {e.status:<10} {e.attempts:>5}  {received:<19}  {e.last_error or ''}")
    return 0


@command("replay")
def _replay(args: argparse.Namespace) -> int:
    from domain.dispatch import mark_for_replay
    from models.db import session_scope
    from tasks.events import enqueue_events

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


@command("dev")
def _dev(args: argparse.Namespace) -> int:
    from worker.dev import run_dev_stack

    return run_dev_stack(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
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
