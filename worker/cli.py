"""`marketplace-worker`: the operator's command line (SPEC §6).

Every command that prints takes `--json`: one JSON document on stdout and nothing else there
(amounts as `domain.money.json_amount`, times in ISO 8601 UTC); logs, progress and errors go
to stderr. Long runs (`reconcile` over accounts, `stats --full`, `catch-up`, `backfill`) show
their progress ("account 3 of 40") on stderr when it is a terminal, and nothing when it is a
file or a pipe.

Exit codes, the same for every command:

    0    done
    1    the job, or a part of it, failed (`catch-up`, `backfill`: rerun to resume), another
         run holds the job, or what was named does not exist (an event, a provider, an
         account, a discrepancy) or cannot be acted on (a resolved discrepancy)
    2    usage or configuration error: an unknown option, a bad date, a missing setting
    3    `reconcile`: unacknowledged open discrepancies remain (acknowledged ones do not count)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any, NoReturn

import click

from config import ConfigError
from models import EventStatus

PROG = "marketplace-worker"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DISCREPANCIES = 3
EXIT_INTERRUPTED = 130


class Failure(click.ClickException):
    """The command could not do its job: one line `marketplace-worker COMMAND: reason` on
    stderr, and the exit code it stands for."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, *, prefix: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        if prefix is None:
            ctx = click.get_current_context(silent=True)
            prefix = ctx.command_path if ctx is not None else PROG
        self.prefix = prefix

    def show(self, file: IO[Any] | None = None) -> None:
        line = f"{self.prefix}: {self.message}" if self.prefix else self.message
        click.echo(line, err=True)


def fail(message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    raise Failure(message, exit_code)


class _CommandLine(click.Group):
    """The root group: turns whatever a command raises into its exit code and one line on
    stderr, the same under the console script, `python -m worker.cli` and click's test runner."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001
        code = self._exit_code(args, prog_name or PROG, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _exit_code(self, args, prog_name, complete_var, **extra) -> int:  # noqa: ANN001
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:  # Failure, and click's usage errors (exit 2)
            error.show()
            return error.exit_code
        except click.Abort:
            return EXIT_INTERRUPTED
        return result if isinstance(result, int) else EXIT_OK

    def invoke(self, ctx: click.Context) -> Any:
        from domain.jobs import JobSkipped

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ConfigError as error:  # already one line naming the setting
            raise Failure(str(error), EXIT_USAGE, prefix="") from error
        except JobSkipped as error:
            raise Failure(f"not run: {error}", prefix=_path(ctx)) from error
        except Exception as error:  # one line for the operator; details in the log (debug)
            logging.getLogger("marketplace_worker").debug("command failed", exc_info=True)
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise Failure(f"{type(error).__name__}: {first_line}", prefix=_path(ctx)) from error


def _path(ctx: click.Context) -> str:
    return f"{ctx.command_path} {ctx.invoked_subcommand}" if ctx.invoked_subcommand else ctx.command_path


# --- output --------------------------------------------------------------------------------


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="print one JSON document on stdout instead of text")(fn)


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, ensure_ascii=False))


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment is not None else None


def _unix_iso(seconds: int | None) -> str | None:
    return datetime.fromtimestamp(seconds, UTC).isoformat() if seconds is not None else None


class Progress:
    """`label N of M`, rewritten in place on stderr while a long run goes; nothing at all when
    stderr is not a terminal (a log file, a pipe, a test)."""

    def __init__(self, label: str, stream: IO[str] | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.shown = self.stream.isatty()
        self.open_line = False
        self.text = ""

    def __call__(self, done: int, total: int) -> None:
        if self.shown:
            self.text = f"{self.label} {done} of {total}"
            self._write(f"\r{self.text}", open_line=True)

    def above(self, emit: Callable[[logging.LogRecord], None]) -> Callable[[logging.LogRecord], None]:
        """A log handler's `emit` that writes its line above the progress line, not onto it."""
        def emit_above(record: logging.LogRecord) -> None:
            shown = self.open_line
            self.clear()
            emit(record)
            if shown:
                self._write(f"\r{self.text}", open_line=True)

        return emit_above

    def clear(self) -> None:
        """Take the progress line off the screen before something is printed on stdout."""
        if self.open_line:
            self._write("\r\033[K")

    def line(self, text: str) -> None:
        """A line of its own (kept on the screen), when stderr is a terminal."""
        if self.shown:
            self._write(("\r\033[K" if self.open_line else "") + text + "\n")

    def close(self) -> None:
        if self.open_line:
            self._write("\n")

    def _write(self, text: str, *, open_line: bool = False) -> None:
        self.stream.write(text)
        self.stream.flush()
        self.open_line = open_line


@contextmanager
def progress(label: str) -> Iterator[Progress]:
    reporter = Progress(label)
    # Log lines on the same terminal are written above the progress line.
    sharing = [handler for handler in logging.getLogger().handlers
               if reporter.shown and getattr(handler, "stream", None) is reporter.stream]
    for handler in sharing:
        handler.emit = reporter.above(handler.emit)
    try:
        yield reporter
    finally:
        for handler in sharing:
            del handler.emit  # back to the class's own
        reporter.close()


def day(value: str, option: str = "--since") -> int:
    """A YYYY-MM-DD date (UTC) as a unix time; exit 2 otherwise."""
    try:
        return int(datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    except ValueError:
        fail(f"{option} must be a date, YYYY-MM-DD", EXIT_USAGE)


# --- the commands --------------------------------------------------------------------------


@click.group(name=PROG, cls=_CommandLine, help=__doc__.splitlines()[0].split(": ", 1)[1],
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    from worker.logging_setup import configure_logging

    if not logging.getLogger().handlers:  # like basicConfig: a host program's logging stays
        configure_logging()


@cli.command(help="create or upgrade the worker's own tables (marketplace_worker schema)")
@json_option
def migrate(as_json: bool) -> None:
    from config import get_settings
    from models.migrate import upgrade

    upgrade(get_settings().database_url)
    if as_json:
        emit_json({"migrations_applied": True})
    else:
        click.echo("migrations applied")


@cli.command(help="serve the Stripe webhook receiver")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", "processes", type=click.IntRange(1, 64), default=None,
              help="receiver processes sharing the port [default: WEBHOOK_PROCESSES, 1]")
def webhook(host: str, port: int, processes: int | None) -> None:
    from worker.receiver import serve

    serve(host, port, processes)


@cli.command(help="run the whole stack locally on embedded Postgres and Redis")
@click.option("--data-dir", default=".dev-data", show_default=True, help="where the embedded servers keep data")
@click.option("--port", type=int, default=8000, show_default=True, help="receiver port")
@click.option("--flower-port", type=int, default=5555, show_default=True)
def dev(data_dir: str, port: int, flower_port: int) -> None:
    from worker.dev import run_dev_stack

    code = run_dev_stack(argparse.Namespace(data_dir=data_dir, port=port, flower_port=flower_port))
    if code:
        raise click.exceptions.Exit(code)


@cli.command(help="list inbox events, newest first")
@click.option("--status", type=click.Choice([status.value for status in EventStatus]))
@click.option("--type", "event_type", help="one event type, e.g. invoice.paid")
@click.option("--limit", type=int, default=50, show_default=True)
@json_option
def events(status: str | None, event_type: str | None, limit: int, as_json: bool) -> None:
    from domain.inbox import recent_events
    from models.db import session_scope

    with session_scope() as session:
        rows = recent_events(session, limit=limit, status=status, type=event_type)
        if as_json:
            emit_json({"events": [{
                "id": e.id, "type": e.type, "account": e.account, "endpoint": e.endpoint, "status": e.status,
                "attempts": e.attempts, "created": _unix_iso(e.created), "received_at": iso(e.received_at),
                "next_attempt_at": iso(e.next_attempt_at), "processed_at": iso(e.processed_at),
                "last_error": e.last_error,
            } for e in rows]})
            return
        click.echo(f"{'EVENT':<32} {'TYPE':<34} {'STATUS':<10} {'TRIES':>5}  {'RECEIVED (UTC)':<19}  LAST ERROR")
        for e in rows:
            received = e.received_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{e.id:<32} {e.type:<34} {e.status:<10} {e.attempts:>5}  {received:<19}  {e.last_error or ''}")


@cli.command(help="re-enqueue an event, or every parked one (--parked)")
@click.argument("event_id", required=False)
@click.option("--parked", is_flag=True, help="every parked event")
@json_option
def replay(event_id: str | None, parked: bool, as_json: bool) -> None:
    from domain.inbox import mark_for_replay
    from models.db import session_scope
    from tasks.events import enqueue_events
    from worker import get_app

    if bool(event_id) == parked:
        raise click.UsageError("give one EVENT_ID or --parked")
    get_app()  # the broker the events are enqueued on
    with session_scope() as session:
        try:
            ids = mark_for_replay(session, None if parked else event_id)
        except LookupError as error:
            fail(str(error))
    if ids:
        enqueue_events(ids)
    if as_json:
        emit_json({"replayed": ids})
    else:
        click.echo(f"re-enqueued {len(ids)} event(s)")


@cli.command(help="run one invoice poll now")
@json_option
def poll(as_json: bool) -> None:
    from tasks.polling import poll_invoices

    result = poll_invoices.run_by_hand()
    if as_json:
        emit_json(result.counts())
        return
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(result.skipped.items()))
    click.echo(
        f"created {result.created}, advanced {result.advanced}, "
        f"refreshed from Stripe {result.refreshed_from_stripe}, skipped {sum(result.skipped.values())}"
        + (f" ({skipped})" if skipped else "")
    )


def _stats_change(change: Any) -> dict[str, Any]:
    """The changed columns of one provider; the average rating as a decimal string."""
    from dataclasses import astuple

    from domain.stats import COLUMNS

    def plain(value: Any) -> Any:
        return value if isinstance(value, int) else str(value)

    return {"provider_id": change.provider_id, "changed": {
        column: {"old": plain(before), "new": plain(after)}
        for column, before, after in zip(COLUMNS, astuple(change.old), astuple(change.new), strict=True)
        if before != after
    }}


@cli.command(help="recompute provider stats: the touched ones, every one (--full), or one (--provider)")
@click.option("--full", is_flag=True, help="every provider, not just touched ones")
@click.option("--provider", type=int, help="one provider id")
@json_option
def stats(full: bool, provider: int | None, as_json: bool) -> None:
    from config import get_settings
    from domain import stats as provider_stats
    from models.db import get_engine, session_scope
    from tasks.stats import full_stats, incremental_stats

    if full and provider is not None:
        fail("--full and --provider cannot be combined", EXIT_USAGE)
    changes: list = []

    def show(batch: list) -> None:
        if as_json:
            changes.extend(batch)
        else:
            reporter.clear()
            for change in batch:
                click.echo(change.describe())

    with progress("stats: range") as reporter:
        if full:
            settings = get_settings()

            def full_pass() -> provider_stats.FullPassResult:
                with get_engine().connect() as connection:
                    return provider_stats.full_pass(
                        connection, batch_size=settings.stats_full_batch_size,
                        range_size=settings.stats_full_range_size, on_changes=show, progress=reporter)

            result = full_stats.run_by_hand(full_pass)
            summary = {"mode": "full", "providers": result.providers, "changed": result.changed}
        else:
            if provider is not None:
                with session_scope() as session:
                    if not provider_stats.provider_exists(session, provider):
                        fail(f"no provider {provider}")
                    passed = provider_stats.recompute_providers(session, [provider])
            else:
                passed = incremental_stats.run_by_hand()
            show(passed.changes)
            summary = {"mode": "provider" if provider is not None else "incremental",
                       "providers": passed.recomputed, "changed": len(passed.changes)}
    if as_json:
        emit_json({**summary, "changes": [_stats_change(change) for change in changes]})
    else:
        click.echo(f"{summary['changed']} of {summary['providers']} provider(s) changed")


# --- discrepancies -------------------------------------------------------------------------


def _account_json(result: Any) -> dict[str, Any]:
    return {"account": result.account, "skipped": result.skipped, "payouts": result.payouts, "calls": result.calls,
            "outcomes": dict(sorted(result.outcomes.items())), "completed": list(result.completed),
            "opened": result.opened, "resolved": result.resolved}


_TABLE_HEAD = (f"{'ID':>6}  {'STATE':<12} {'KIND':<19} {'SUBJECT':<28} {'ACCOUNT':<22} {'EXPECTED':>14} "
               f"{'SEEN':>14}  {'FIRST SEEN (UTC)':<16}  DETAIL")


def _table_row(d: Any) -> str:
    from domain.money import format_amount

    first_seen = d.first_seen_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    detail = d.detail
    if d.acknowledged_at is not None and d.resolved_at is None:
        detail += f" [acknowledged by {d.acknowledged_by}: {d.acknowledged_note}]"
    return (f"{d.id:>6}  {d.state:<12} {d.kind:<19} {d.subject:<28} {d.account:<22} "
            f"{format_amount(d.expected_cents, d.currency):>14} {format_amount(d.seen_cents, d.currency):>14}  "
            f"{first_seen:<16}  {detail}")


def _decimal(cents: int | None, currency: str | None) -> str:
    from domain.money import decimal_string

    return "" if cents is None else decimal_string(cents, currency)


CSV_COLUMNS = ("id", "state", "kind", "account", "subject", "transaction_id", "currency", "expected", "seen",
               "transfer_ids", "payout_id", "detail", "first_seen_at", "last_seen_at", "acknowledged_at",
               "acknowledged_by", "acknowledged_note", "resolved_at")


def _csv_row(d: Any) -> list[Any]:
    return [d.id, d.state, d.kind, d.account, d.subject, d.transaction_id or "", (d.currency or "").upper(),
            _decimal(d.expected_cents, d.currency), _decimal(d.seen_cents, d.currency), " ".join(d.transfer_ids),
            d.payout_id or "", d.detail, iso(d.first_seen_at), iso(d.last_seen_at), iso(d.acknowledged_at) or "",
            d.acknowledged_by or "", d.acknowledged_note or "", iso(d.resolved_at) or ""]


def _csv(header: tuple[str, ...], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    click.echo(buffer.getvalue(), nl=False)


def _print_open(found: list, unacknowledged: int) -> None:
    """reconcile's summary: the open discrepancies, by kind, then one line each."""
    if not found:
        click.echo("no open discrepancies")
        return
    by_kind = Counter(d.kind for d in found)
    acknowledged = len(found) - unacknowledged
    click.echo(f"{len(found)} open discrepancies: " + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
               + (f"; {acknowledged} of them acknowledged" if acknowledged else ""))
    click.echo(_TABLE_HEAD)
    for d in found:
        click.echo(_table_row(d))


@cli.command(help="reconcile Stripe Connect transfers and payouts; exits 3 while unacknowledged discrepancies "
                  "are open")
@click.option("--account", help="one connected account (acct_...)")
@click.option("--since", help="start of the window, YYYY-MM-DD (UTC)")
@json_option
def reconcile(account: str | None, since: str | None, as_json: bool) -> None:
    from config import get_settings
    from domain.connect import discrepancies
    from domain.connect import run as connect_run
    from domain.connect.reader import reader_for
    from models.db import get_engine, session_scope
    from tasks.reconciliation import reconcile_all

    start = day(since) if since else None
    settings = get_settings()
    reader = reader_for(settings)
    if account:
        done = connect_run.reconcile_accounts(session_scope, get_engine(), reader, [account],
                                              settings=settings, since=start)
        if done.results[0].skipped == "no_provider":
            fail(f"no stripe_connect provider has {account}")
    else:
        with progress("reconcile: account") as reporter:
            done = reconcile_all.run_by_hand(lambda: connect_run.reconcile_active(
                session_scope, get_engine(), reader, settings=settings, since=start, progress=reporter))
    with session_scope() as session:
        found = discrepancies.list_discrepancies(session, state="open", account=account)
        unacknowledged = discrepancies.count_unacknowledged(session, account)
    if as_json:
        emit_json({
            "accounts": [_account_json(result) for result in done.results],
            "unknown_destination": done.unknown_destination,
            "failed": dict(sorted(done.failed.items())),
            "completed": sum(len(result.completed) for result in done.results),
            "calls": sum(result.calls for result in done.results),
            "unacknowledged": unacknowledged,
            "discrepancies": [d.as_json() for d in found],
        })
    else:
        for result in done.results:
            # Completions alone are in the totals: a first run completes at thousands of accounts.
            if account or result.skipped or result.opened or result.resolved:
                click.echo(result.describe())
        for failed, error in sorted(done.failed.items()):
            click.echo(f"{failed}: not reconciled: {error}")
        click.echo(done.describe())
        _print_open(found, unacknowledged)
    if done.failed:
        fail(f"{len(done.failed)} account(s) could not be reconciled (first: {min(done.failed)}); "
             "the others were, and a later pass tries them again")
    if unacknowledged:
        raise click.exceptions.Exit(EXIT_DISCREPANCIES)


FORMATS = click.Choice(["table", "json", "csv"])


def _format(fmt: str, as_json: bool) -> str:
    if as_json and fmt not in ("table", "json"):
        raise click.UsageError("--json and --format csv cannot be combined")
    return "json" if as_json else fmt


@cli.group(invoke_without_command=True, help=(
    "list the discrepancies reconciliation found (open ones by default: acknowledged or not); "
    "`ack ID` acknowledges one, `history ID` shows its changes"))
@click.option("--open/--all", "open_only", default=True, show_default=True,
              help="unresolved ones only, or resolved ones too")
@click.option("--account", help="one connected account (acct_...)")
@click.option("--kind", help="one kind, e.g. missing_transfer")
@click.option("--since", help="those a run saw on or after this date, YYYY-MM-DD (UTC)")
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@json_option
@click.pass_context
def discrepancies(ctx: click.Context, open_only: bool, account: str | None, kind: str | None, since: str | None,
                  fmt: str, as_json: bool) -> None:
    from click.core import ParameterSource

    if ctx.invoked_subcommand is not None:
        given = [name for name in ctx.params if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"the listing options ({', '.join(given)}) go without a subcommand")
        return
    from domain.connect.discrepancies import list_discrepancies
    from models.db import session_scope

    fmt = _format(fmt, as_json)
    seen_since = datetime.fromtimestamp(day(since), UTC) if since else None
    state = "open" if open_only else "all"
    with session_scope() as session:
        found = list_discrepancies(session, state=state, account=account, kind=kind, since=seen_since)
    if fmt == "json":
        emit_json({"state": state, "account": account, "kind": kind, "since": iso(seen_since),
                   "discrepancies": [d.as_json() for d in found]})
    elif fmt == "csv":
        _csv(CSV_COLUMNS, [_csv_row(d) for d in found])
    else:
        click.echo(_TABLE_HEAD)
        for d in found:
            click.echo(_table_row(d))
        click.echo(f"{len(found)} discrepanc{'y' if len(found) == 1 else 'ies'}"
                   + ("" if open_only else " (resolved ones included)"))


@discrepancies.command(help="acknowledge an open discrepancy: who took note of it and what is being done; it "
                            "stays listed but no longer counts toward reconcile's exit 3 and the alert")
@click.argument("discrepancy_id", metavar="ID", type=int)
@click.option("--note", required=True, help="what is being done about it")
@click.option("--by", "by", required=True, help="who acknowledges it")
@json_option
def ack(discrepancy_id: int, note: str, by: str, as_json: bool) -> None:
    from domain.connect import discrepancies as found
    from models.db import session_scope

    try:
        with session_scope() as session:
            d = found.ack(session, discrepancy_id, note, by)
    except found.InvalidAcknowledgement as error:
        fail(str(error), EXIT_USAGE)
    except found.DiscrepancyError as error:
        fail(str(error))
    if as_json:
        emit_json(d.as_json())
    else:
        click.echo(f"discrepancy {d.id} ({d.kind} {d.subject} on {d.account}) acknowledged by {d.acknowledged_by}: "
                   f"{d.acknowledged_note}")


HISTORY_COLUMNS = ("discrepancy_id", "at", "change", "by", "note", "currency", "expected", "seen")


@discrepancies.command(help="every change of one discrepancy, oldest first")
@click.argument("discrepancy_id", metavar="ID", type=int)
@click.option("--format", "fmt", type=FORMATS, default="table", show_default=True)
@json_option
def history(discrepancy_id: int, fmt: str, as_json: bool) -> None:
    from domain.connect import discrepancies as found
    from domain.money import format_amount
    from models.db import session_scope

    fmt = _format(fmt, as_json)
    try:
        with session_scope() as session:
            d = found.get_discrepancy(session, discrepancy_id)
            changes = found.history(session, discrepancy_id)
    except found.DiscrepancyError as error:
        fail(str(error))
    if fmt == "json":
        emit_json({"discrepancy": d.as_json(), "history": [change.as_json() for change in changes]})
    elif fmt == "csv":
        _csv(HISTORY_COLUMNS, [[c.discrepancy_id, iso(c.at), c.change, c.by, c.note or "", (c.currency or "").upper(),
                                _decimal(c.expected_cents, c.currency), _decimal(c.seen_cents, c.currency)]
                               for c in changes])
    else:
        click.echo(f"discrepancy {d.id}: {d.kind} {d.subject} on {d.account}, {d.state}; {d.detail}")
        click.echo(f"{'AT (UTC)':<19}  {'CHANGE':<15} {'BY':<16} {'EXPECTED':>14} {'SEEN':>14}  NOTE")
        for c in changes:
            click.echo(f"{c.at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {c.change:<15} {c.by:<16} "
                       f"{format_amount(c.expected_cents, c.currency):>14} "
                       f"{format_amount(c.seen_cents, c.currency):>14}  {c.note or ''}")


# --- catching up and backfilling -----------------------------------------------------------


@cli.command("catch-up", help="store the events Stripe has that the endpoints never received; exits 1 if a scope "
                              "failed")
@click.option("--account", help="one connected account (acct_...); default: the platform and flagged accounts")
@click.option("--since", help="list from this date, YYYY-MM-DD (UTC), at most 30 days back; without --account, "
                              "every connected account too")
@json_option
def catch_up(account: str | None, since: str | None, as_json: bool) -> None:
    from domain import catchup
    from domain.stripe_api import get_client
    from models.db import session_scope
    from tasks.events import catch_up_events, enqueue_stored
    from worker import get_app

    start = None
    if since:
        start = day(since)
        now = int(time.time())
        if start > now:
            fail("--since is in the future", EXIT_USAGE)
        if start < now - catchup.STRIPE_RETENTION_SECONDS:
            fail("--since is older than the 30 days of events Stripe keeps", EXIT_USAGE)
    if account:
        _connected_or_fail(account, "events")
    client = get_client()
    get_app()  # the broker the stored events are enqueued on
    with progress("catch-up: scope") as reporter:
        result = catch_up_events.run_by_hand(lambda: enqueue_stored(catchup.catch_up(
            session_scope, client, accounts=[account] if account else None, since=start, progress=reporter)))
    if as_json:
        emit_json({"scopes": result.scopes, "failed": dict(sorted(result.failed.items())), "listed": result.listed,
                   "stored": result.stored, "calls": result.calls, "gap": result.gap,
                   "accounts_read": result.reads.read, "account_reads_failed": dict(result.reads.failed)})
    else:
        if result.gap:
            click.echo(f"every connected account flagged: {result.gap}")
        click.echo(f"listed {len(result.scopes)} scope(s) with {result.calls} Stripe call(s): {result.listed} "
                   f"event(s), {len(result.stored)} new and enqueued; {result.reads.read} account(s) read to settle "
                   "ties")
        for scope, error in sorted(result.failed.items()):
            click.echo(f"{scope}: {error}")
    if result.failed:
        fail(f"{len(result.failed)} scope(s) could not be listed (first: {sorted(result.failed)[0]}); they stay "
             "flagged and are retried")


def _connected_or_fail(account: str, what: str) -> None:
    from domain import catchup
    from models.db import session_scope

    with session_scope() as session:
        if account not in catchup.connect_accounts(session):
            reason = (f"is deauthorized: Stripe no longer shows the platform its {what}"
                      if catchup.is_deauthorized(session, account) else "belongs to no stripe_connect provider")
            fail(f"{account} {reason}")


@cli.command(help="build the ledger from Stripe's history (list endpoints); resumable; exits 1 if a part failed")
@click.option("--since", required=True, help="invoices, charges, refunds, disputes, transfers and payouts created "
                                             "from this date, YYYY-MM-DD (UTC)")
@click.option("--account", help="only this connected account's transfers and payouts (acct_...)")
@click.option("--restart", is_flag=True, help="start over even where a run with this date got")
@json_option
def backfill(since: str, account: str | None, restart: bool, as_json: bool) -> None:
    from domain import backfill as history
    from domain.jobs import run_job
    from domain.stripe_api import get_client
    from models.db import session_scope

    start = day(since)
    if start > time.time():
        fail("--since is in the future", EXIT_USAGE)
    if account:
        _connected_or_fail(account, "payouts")
    client = get_client()

    with progress("backfill") as reporter:
        def on_page(page: history.Progress) -> None:
            what = "transaction(s) reconciled" if page.stream == history.CONNECT else "object(s) so far"
            reporter.line(f"backfill {page.stream:<8} {page.scope:<24} page {page.pages:>5}: {page.objects} {what}")

        try:
            # A job run only by hand: no task, no schedule.
            result = run_job("backfill", lambda: history.backfill(
                session_scope, client, since=start, account=account, restart=restart, on_page=on_page))
        except history.BackfillBusy as error:
            fail(str(error))
    if as_json:
        emit_json({"since": _unix_iso(start), "complete": result.complete, "calls": result.calls,
                   "pages": result.pages, "objects": dict(result.objects), "skipped": dict(sorted(result.skipped.items())),
                   "done": result.done, "already_done": result.already_done,
                   "accounts": [_account_json(a) for a in result.accounts], "deauthorized": result.deauthorized,
                   "failed": dict(sorted(result.failed.items())), "waiting": result.waiting})
    else:
        objects = ", ".join(f"{stream} {n}" for stream, n in result.objects.items()) or "nothing new"
        click.echo(f"backfill from {since}: {result.pages} page(s) with {result.calls} Stripe call(s): {objects}; "
                   f"{len(result.accounts)} account(s) reconciled")
        if result.already_done:
            click.echo(f"already done by an earlier run: {', '.join(result.already_done)}")
        if result.skipped:
            click.echo("left without a transaction: "
                       + ", ".join(f"{reason} {n}" for reason, n in sorted(result.skipped.items())))
        for done in result.accounts:
            click.echo(done.describe())
        if result.deauthorized:
            click.echo(f"deauthorized, not listed: {', '.join(result.deauthorized)}")
        for scope, error in sorted(result.failed.items()):
            click.echo(f"{scope}: {error}")
        if result.waiting:
            click.echo(f"connected accounts wait for the platform streams: {result.waiting}")
    if not result.complete:
        if result.failed:
            first = sorted(result.failed)[0]
            fail(f"{len(result.failed)} part(s) failed (first: {first}: {result.failed[first]}); rerun the same "
                 "command to resume")
        fail(f"connected accounts not backfilled: {result.waiting}; rerun the same command to resume")


# --- job runs ------------------------------------------------------------------------------


@cli.command(help="recent job runs, newest first")
@click.option("--limit", type=int, default=30, show_default=True)
@click.option("--job", help="one job, e.g. poll_invoices")
@json_option
def jobs(limit: int, job: str | None, as_json: bool) -> None:
    from domain.jobs import recent_runs
    from models.db import session_scope

    with session_scope() as session:
        runs = recent_runs(session, limit=limit, job=job)
    if as_json:
        emit_json({"runs": [{
            "job": run.job, "slot": iso(run.slot), "started_at": iso(run.started_at),
            "finished_at": iso(run.finished_at),
            "seconds": (run.finished_at - run.started_at).total_seconds() if run.finished_at else None,
            "outcome": run.outcome, "reason": run.reason, "error": run.error, "counts": run.counts,
        } for run in runs]})
        return

    def moment(value: datetime | None) -> str:
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"

    click.echo(f"{'JOB':<22} {'SLOT (UTC)':<19}  {'STARTED (UTC)':<19}  {'TOOK':>8}  {'OUTCOME':<8} DETAIL")
    for run in runs:
        took = f"{(run.finished_at - run.started_at).total_seconds():.1f}s" if run.finished_at else "-"
        detail = run.error or run.reason or (json.dumps(run.counts) if run.counts is not None else "")
        click.echo(f"{run.job:<22} {moment(run.slot):<19}  {moment(run.started_at):<19}  {took:>8}  "
                   f"{run.outcome:<8} {detail}")


def main(argv: list[str] | None = None) -> int:
    """The console script's entry point: runs the command and returns its exit code."""
    return cli.main(args=argv, prog_name=PROG, standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
