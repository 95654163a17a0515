"""The command line (worker/cli.py): every documented exit code, `--json` on every command that
prints (one document on stdout, nothing else there), progress only on a terminal, and
discrepancies listed, filtered, exported, acknowledged and traced end to end on Postgres."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from domain.connect import classify
from harness import factories
from models.db import session_scope
from tests.test_catchup import connect_providers, steady_state
from tests.test_discrepancies import finding, store
from tests.test_dispatch import store as store_event
from tests.test_reconcile import connect_provider, paid_transaction, send_transfer
from worker.cli import EXIT_DISCREPANCIES, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Progress, cli, progress


def invoke(*args: str, code: int = EXIT_OK):
    """Run the command as click's runner does; stdout and stderr apart (neither is a terminal)."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def as_json(*args: str, code: int = EXIT_OK):
    """The command with --json: stdout is one JSON document and nothing else."""
    return json.loads(invoke(*args, "--json", code=code).stdout)


def shell(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed console script, in its own process, its output piped."""
    script = os.path.join(os.path.dirname(sys.executable), "marketplace-worker")
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120, env=env or os.environ)


# --- exit codes ----------------------------------------------------------------------------


def test_usage_and_configuration_errors_exit_2(db):
    assert "discrepancies" in invoke("--help").stdout
    for args in (["nope"], ["events", "--nope"], ["events", "--status", "lost"], ["replay"],
                 ["replay", "evt_1", "--parked"], ["stats", "--full", "--provider", "1"],
                 ["reconcile", "--since", "yesterday"], ["catch-up", "--since", "2001-01-01"],
                 ["catch-up", "--since", "2999-01-01"], ["backfill"], ["backfill", "--since", "2026-13-01"],
                 ["discrepancies", "--format", "xml"], ["discrepancies", "--since", "last week"],
                 ["discrepancies", "ack", "1", "--note", "x"], ["discrepancies", "ack", "one", "--note", "x", "--by", "y"],
                 ["discrepancies", "--all", "history", "1"], ["discrepancies", "--format", "csv", "--json"]):
        result = invoke(*args, code=EXIT_USAGE)
        assert result.stdout == "" and result.stderr, args

    # The console script: click's usage errors, the commands' own, and a missing setting.
    unknown = shell("nope")
    assert unknown.returncode == EXIT_USAGE and "No such command 'nope'" in unknown.stderr
    bad_date = shell("reconcile", "--since", "yesterday")
    assert (bad_date.returncode, bad_date.stdout, bad_date.stderr.strip()) == (
        EXIT_USAGE, "", "marketplace-worker reconcile: --since must be a date, YYYY-MM-DD")
    unset = shell("jobs", env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"})
    assert (unset.returncode, unset.stdout) == (EXIT_USAGE, "") and "DATABASE_URL" in unset.stderr


def test_not_found_and_failures_exit_1_with_one_line(db, stripe_api):
    for args, line in (
        (["replay", "evt_missing"], "marketplace-worker replay: no event evt_missing in the inbox"),
        (["stats", "--provider", "424242"], "marketplace-worker stats: no provider 424242"),
        (["reconcile", "--account", "acct_nobodyhasthis1"],
         "marketplace-worker reconcile: no stripe_connect provider has acct_nobodyhasthis1"),
        (["catch-up", "--account", "acct_nobody"],
         "marketplace-worker catch-up: acct_nobody belongs to no stripe_connect provider"),
        (["discrepancies", "ack", "999999", "--note", "n", "--by", "ana"],
         "marketplace-worker discrepancies ack: no discrepancy 999999"),
        (["discrepancies", "history", "999999"], "marketplace-worker discrepancies history: no discrepancy 999999"),
    ):
        result = invoke(*args, code=EXIT_FAILED)
        assert (result.stdout, result.stderr.strip()) == ("", line)
        assert invoke(*args, "--json", code=EXIT_FAILED).stdout == ""


def test_an_unexpected_error_exits_1_and_an_interruption_130(db, monkeypatch):
    import domain.jobs

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away\nand more detail")

    monkeypatch.setattr(domain.jobs, "recent_runs", broken)
    result = invoke("jobs", code=EXIT_FAILED)
    assert result.stderr.strip() == "marketplace-worker jobs: RuntimeError: the database went away"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(domain.jobs, "recent_runs", interrupted)
    assert invoke("jobs", "--json", code=EXIT_INTERRUPTED).stdout == ""


def test_reconcile_exits_3_until_every_open_discrepancy_is_acknowledged(db, stripe_api):
    provider = connect_provider(db)
    account = provider.stripeConnectAccountId
    txn, short = paid_transaction(db, provider), paid_transaction(db, provider)
    send_transfer(stripe_api, account, short, amount=9_000)

    out = invoke("reconcile", "--account", account, code=EXIT_DISCREPANCIES).stdout
    assert "2 open discrepancies: amount_mismatch 1, missing_transfer 1" in out
    assert "95.00 USD" in out and "90.00 USD" in out  # format_amount, with the currency

    report = as_json("reconcile", "--account", account, code=EXIT_DISCREPANCIES)
    assert report["unacknowledged"] == 2 and [a["account"] for a in report["accounts"]] == [account]
    mismatch = next(d for d in report["discrepancies"] if d["kind"] == "amount_mismatch")
    assert mismatch["subject"] == str(short.id) and mismatch["state"] == "open"
    assert (mismatch["expected"], mismatch["seen"]) == (
        {"minor_units": 9_500, "currency": "usd", "amount": "95.00"},
        {"minor_units": 9_000, "currency": "usd", "amount": "90.00"})

    for d in report["discrepancies"]:
        invoke("discrepancies", "ack", str(d["id"]), "--note", "provider paid by hand", "--by", "ana")
        if d is not report["discrepancies"][-1]:
            invoke("reconcile", "--account", account, code=EXIT_DISCREPANCIES)
    out = invoke("reconcile", "--account", account, code=EXIT_OK).stdout
    assert "2 open discrepancies: amount_mismatch 1, missing_transfer 1; 2 of them acknowledged" in out
    assert as_json("reconcile", code=EXIT_OK)["unacknowledged"] == 0


def test_a_whole_reconcile_pass_goes_on_past_an_account_stripe_refuses_and_exits_failed(db, stripe_api):
    providers = sorted((connect_provider(db) for _ in range(2)), key=lambda p: p.stripeConnectAccountId)
    for provider in providers:
        send_transfer(stripe_api, provider.stripeConnectAccountId, paid_transaction(db, provider))
    refused, fine = (p.stripeConnectAccountId for p in providers)
    stripe_api.fail_next(403, path_prefix="/v1/")  # the pass's first request: the first account's

    report = as_json("reconcile", code=EXIT_FAILED)
    assert list(report["failed"]) == [refused] and "403" in report["failed"][refused]
    assert [a["account"] for a in report["accounts"]] == [fine]
    again = as_json("reconcile", code=EXIT_OK)  # the next pass takes it
    assert again["failed"] == {} and [a["account"] for a in again["accounts"]] == [refused, fine]


# --- --json on every command that prints -------------------------------------------------------


def test_every_command_that_prints_has_json(db, stripe_api):
    assert as_json("migrate") == {"migrations_applied": True}

    event_id = store_event(db, "test.json")
    [event] = as_json("events", "--limit", "5")["events"]
    assert (event["id"], event["type"], event["status"], event["attempts"]) == (event_id, "test.json", "received", 0)
    assert datetime.fromisoformat(event["received_at"]).utcoffset() == timedelta(0)
    assert as_json("events", "--status", "parked")["events"] == []
    assert as_json("replay", event_id) == {"replayed": [event_id]}
    assert as_json("replay", "--parked") == {"replayed": []}

    assert set(as_json("poll")) == {"created", "advanced", "refreshed_from_stripe", "skipped"}

    provider = factories.provider(db)
    factories.listing(db, provider)
    db.commit()
    changed = as_json("stats", "--provider", str(provider.id))
    assert (changed["mode"], changed["providers"], changed["changed"]) == ("provider", 1, 1)
    assert changed["changes"] == [{"provider_id": provider.id, "changed": {"totalListings": {"old": 0, "new": 1}}}]
    assert as_json("stats")["mode"] == "incremental"
    full = as_json("stats", "--full")
    assert (full["mode"], full["providers"], full["changed"], full["changes"]) == ("full", 1, 0, [])

    [run] = [r for r in as_json("jobs", "--job", "full_stats")["runs"]]
    assert run["outcome"] == "ok" and run["counts"]["providers"] == 1 and run["slot"] is None
    assert datetime.fromisoformat(run["started_at"]).utcoffset() == timedelta(0) and run["seconds"] >= 0

    since = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d")
    backfilled = as_json("backfill", "--since", since)
    assert backfilled["complete"] is True and backfilled["failed"] == {}
    assert backfilled["since"].startswith(since) and backfilled["since"].endswith("+00:00")

    account = connect_providers(db, 1)[0]
    steady_state(db, stripe_api, listed_ago=60)
    caught = as_json("catch-up", "--account", account)
    assert caught["scopes"] == [account] and caught["failed"] == {} and caught["stored"] == []
    stripe_api.fail_next(500, count=10, path_prefix="/v1/events")
    result = invoke("catch-up", "--account", account, "--json", code=EXIT_FAILED)
    assert list(json.loads(result.stdout)["failed"]) == [account]
    assert result.stderr.strip().startswith("marketplace-worker catch-up: 1 scope(s) could not be listed")


# --- progress --------------------------------------------------------------------------------


def test_long_runs_are_quiet_on_stderr_when_it_is_not_a_terminal(db, stripe_api):
    accounts = []
    for _ in range(3):
        provider = connect_provider(db)
        paid_transaction(db, provider, paid_days_ago=0.5)  # within the grace: nothing open
        accounts.append(provider.stripeConnectAccountId)
    result = invoke("reconcile")
    assert result.stderr == "" and "reconciled 3 account(s)" in result.stdout
    assert invoke("stats", "--full").stderr == ""
    assert invoke("catch-up").stderr == ""

    piped = shell("reconcile", "--json")
    assert piped.returncode == EXIT_OK and not re.search(r"account \d+ of \d+", piped.stderr)
    assert len(json.loads(piped.stdout)["accounts"]) == 3


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line_rewritten_on_a_terminal():
    screen = Terminal()
    progress = Progress("reconcile: account", screen)
    progress(1, 3)
    progress(2, 3)
    progress.clear()
    progress(3, 3)
    progress.close()
    assert screen.getvalue() == ("\rreconcile: account 1 of 3\rreconcile: account 2 of 3\r\033[K"
                                 "\rreconcile: account 3 of 3\n")
    piped = io.StringIO()
    quiet = Progress("reconcile: account", piped)
    quiet(1, 3)
    quiet.line("a page")
    quiet.close()
    assert piped.getvalue() == ""


def test_log_lines_on_the_terminal_go_above_the_progress_line(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    handler = logging.StreamHandler(screen)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        with progress("reconcile: account") as shown:
            shown(1, 2)
            logging.getLogger("domain.connect.run").warning("acct_1 reconciled")
            shown(2, 2)
    finally:
        logging.getLogger().removeHandler(handler)
    assert screen.getvalue() == ("\rreconcile: account 1 of 2\r\033[Kacct_1 reconciled\n\rreconcile: account 1 of 2"
                                 "\rreconcile: account 2 of 2\n")
    assert "emit" not in vars(handler)  # the handler writes plainly again


# --- discrepancies ---------------------------------------------------------------------------


@pytest.fixture
def findings(db) -> dict[str, int]:
    """Four discrepancies: two open on acct_a (one of them last seen two days ago), one open
    and one resolved on acct_b; by subject, their ids."""
    store(finding("amount_mismatch", "1", "acct_a", transaction_id=1, expected_cents=1_234, seen_cents=-5,
                  currency="kwd"),
          finding("missing_transfer", "2", "acct_a", seen_cents=None, currency="jpy", expected_cents=500),
          finding("orphan_transfer", "tr_1", "acct_b", expected_cents=None, transfer_ids=["tr_1", "tr_2"]),
          finding("amount_mismatch", "3", "acct_b"))
    with session_scope() as session:
        classify.resolve_unseen(session, ("amount_mismatch",), "acct_b", [])
        session.execute(text("UPDATE marketplace_worker.reconcile_discrepancies "
                             "SET last_seen_at = now() - interval '2 days' WHERE subject = '1'"))
        return dict(session.execute(text("SELECT subject, id FROM marketplace_worker.reconcile_discrepancies")).all())


def subjects(*args: str) -> list[str]:
    return sorted(d["subject"] for d in as_json("discrepancies", *args)["discrepancies"])


def test_discrepancies_are_listed_and_filtered(findings):
    assert subjects() == subjects("--open") == ["1", "2", "tr_1"]
    assert subjects("--all") == ["1", "2", "3", "tr_1"]
    assert subjects("--account", "acct_a") == ["1", "2"]
    assert subjects("--all", "--account", "acct_b") == ["3", "tr_1"]
    assert subjects("--kind", "amount_mismatch") == ["1"]
    assert subjects("--all", "--kind", "amount_mismatch") == ["1", "3"]
    assert subjects("--since", (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")) == ["2", "tr_1"]
    assert subjects("--account", "acct_c") == []
    assert as_json("discrepancies", "--format", "json") == as_json("discrepancies")

    table = invoke("discrepancies", "--all").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "STATE", "KIND", "SUBJECT"] and table[-1] == "4 discrepancies (resolved ones included)"
    row = next(line for line in table if f"amount_mismatch     1 " in line)
    assert "1.234 KWD" in row and "-0.005 KWD" in row and row.split()[1] == "open"
    assert "500 JPY" in next(line for line in table if "missing_transfer" in line)
    assert "resolved" in next(line for line in table if "amount_mismatch     3 " in line)


def test_discrepancies_export_as_csv(findings):
    out = invoke("discrepancies", "--all", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert out.splitlines()[0].startswith("id,state,kind,account,subject,transaction_id,currency,expected,seen")
    by_subject = {row["subject"]: row for row in rows}
    assert sorted(by_subject) == ["1", "2", "3", "tr_1"]
    assert {k: by_subject["1"][k] for k in ("id", "state", "currency", "expected", "seen", "transaction_id")} == {
        "id": str(findings["1"]), "state": "open", "currency": "KWD", "expected": "1.234", "seen": "-0.005",
        "transaction_id": "1"}
    assert (by_subject["2"]["expected"], by_subject["2"]["seen"], by_subject["2"]["currency"]) == ("500", "", "JPY")
    assert by_subject["tr_1"]["transfer_ids"] == "tr_1 tr_2" and by_subject["tr_1"]["expected"] == ""
    assert by_subject["3"]["state"] == "resolved" and by_subject["3"]["resolved_at"].endswith("+00:00")
    assert invoke("discrepancies", "--account", "acct_c", "--format", "csv").stdout.splitlines() == [
        out.splitlines()[0]]


def test_a_discrepancy_is_acknowledged_and_its_history_shown(findings):
    one = str(findings["1"])
    acked = as_json("discrepancies", "ack", one, "--note", " topping up on Monday ", "--by", "ana")
    assert (acked["state"], acked["acknowledged_by"], acked["acknowledged_note"]) == (
        "acknowledged", "ana", "topping up on Monday")
    assert [d["state"] for d in as_json("discrepancies", "--kind", "amount_mismatch")["discrepancies"]] == [
        "acknowledged"]
    again = invoke("discrepancies", "ack", one, "--note", "paid by hand", "--by", "bo").stdout
    assert again.strip() == f"discrepancy {one} (amount_mismatch 1 on acct_a) acknowledged by bo: paid by hand"

    traced = as_json("discrepancies", "history", one)
    assert traced["discrepancy"]["id"] == findings["1"]
    assert [(e["change"], e["by"], e["note"]) for e in traced["history"]] == [
        ("opened", "reconcile", None), ("acknowledged", "ana", "topping up on Monday"),
        ("acknowledged", "bo", "paid by hand")]
    assert traced["history"][0]["expected"] == {"minor_units": 1_234, "currency": "kwd", "amount": "1.234"}
    table = invoke("discrepancies", "history", one).stdout.splitlines()
    assert table[0].startswith(f"discrepancy {one}: amount_mismatch 1 on acct_a, acknowledged")
    assert "1.234 KWD" in table[2] and table[-1].endswith("paid by hand")
    rows = list(csv.DictReader(io.StringIO(invoke("discrepancies", "history", one, "--format", "csv").stdout)))
    assert [(r["change"], r["expected"], r["seen"], r["currency"]) for r in rows][0] == (
        "opened", "1.234", "-0.005", "KWD")

    # Refused, and nothing changes: a resolved one, an empty note or name.
    resolved = str(findings["3"])
    result = invoke("discrepancies", "ack", resolved, "--note", "n", "--by", "ana", code=EXIT_FAILED)
    assert result.stderr.startswith(f"marketplace-worker discrepancies ack: discrepancy {resolved} was resolved at ")
    blank = invoke("discrepancies", "ack", str(findings["2"]), "--note", "  ", "--by", "ana", code=EXIT_USAGE)
    assert blank.stderr.strip() == ("marketplace-worker discrepancies ack: an acknowledgement needs a note: "
                                    "what is being done about it")
    invoke("discrepancies", "ack", str(findings["2"]), "--note", "n", "--by", "", code=EXIT_USAGE)
    assert [e["change"] for e in as_json("discrepancies", "history", str(findings["2"]))["history"]] == ["opened"]
    assert [e["change"] for e in as_json("discrepancies", "history", resolved)["history"]] == ["opened", "resolved"]
