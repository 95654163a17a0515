"""The alert rules and the dashboard against the code: promtool checks and unit-tests the rules
(deploy/prometheus/alerts.test.yml), every metric a rule or a dashboard query names is one the
receiver or the worker exports, and every alert has its runbook section."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

PROJECT = Path(__file__).resolve().parent.parent
PROMETHEUS = PROJECT / "deploy" / "prometheus"
DASHBOARD = PROJECT / "deploy" / "grafana" / "marketplace-worker.json"
RUNBOOK = PROJECT / "docs" / "runbook.md"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (.ci/run unpacks it from Debian's prometheus package)",
)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_queries() -> list[str]:
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in panels(dashboard["panels"]) for target in panel.get("targets", [])]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_accepts_the_rules_and_the_scrape_configuration():
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_the_rules_pass_their_unit_tests():
    result = promtool("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_does_not():
    cases = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
    checks = [check for case in cases for check in case.get("alert_rule_test", [])]
    for rule in alert_rules():
        outcomes = {bool(check.get("exp_alerts")) for check in checks if check["alertname"] == rule["alert"]}
        assert outcomes == {True, False}, rule["alert"]


def _runbook_anchors() -> set[str]:
    headings = re.findall(r"^#+ (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_alert_has_a_severity_a_summary_and_its_runbook_section():
    anchors = _runbook_anchors()
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, rule["alert"]


# --- metric names ------------------------------------------------------------------------------

def exported_names() -> set[str]:
    """Every series name the receiver and the worker export (prometheus_client appends `_total`
    to a counter's name), Prometheus's own `up`, and Flower's."""
    from tasks.metrics import REGISTRY as WORKER
    from worker.receiver import METRICS

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = {"up"}
    for registry in (METRICS.registry, WORKER):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are neither functions,
    keywords, nor inside label matchers, grouping clauses, strings or ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        name, call = match.groups()
        if call or name in _KEYWORDS or re.fullmatch(r"\d", text[match.start() - 1:match.start()] or " "):
            continue
        names.add(name)
    return names


def test_the_name_extraction_reads_what_a_query_reads():
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y(z)"}[5m]))) > 60') == {"a_bucket"}
    assert metric_names("(time() - max by (job) (b)) > on (job) (1.5 * max by (job) (c) + 600)") == {"b", "c"}
    assert metric_names('sum by (job) (up{job=~"w"}) == 0 or absent(up{job="w"})') == {"up"}


def test_every_metric_the_alerts_and_the_dashboard_read_is_exported():
    exported = exported_names()
    assert {"worker_events_total", "event_processing_lag_seconds_bucket", "job_runs_total",
            "stripe_api_requests_total", "webhook_events_rejected_total", "inbox_events"} <= exported
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    assert len(queries) > 20
    for expr in queries:
        unknown = {name for name in metric_names(expr) if not name.startswith("flower_")} - exported
        assert not unknown, f"{expr}: {sorted(unknown)}"


# --- the receiver's signals for the alerts ---------------------------------------------------------

def test_the_receiver_exports_the_backlog_age_the_unacknowledged_discrepancies_and_the_job_periods(db, services):
    from starlette.testclient import TestClient

    from config import get_settings
    from domain.connect import classify
    from domain.connect.classify import Finding
    from harness import stripe_events
    from harness.lifecycle import store
    from models.db import session_scope
    from worker.receiver import create_app
    from worker.schedule import JOBS

    def scrape(client) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}

    with TestClient(create_app(get_settings())) as client:
        empty = scrape(client)
        [waiting, retrying, done] = store(db, *(stripe_events.event("customer.created", {"id": f"cus_{i}"}) for i in range(3)))
        db.execute(text("UPDATE marketplace_worker.stripe_events SET received_at = now() - interval '20 minutes'"
                        " WHERE id = :id"), {"id": waiting})
        db.execute(text("UPDATE marketplace_worker.stripe_events SET status = 'retrying',"
                        " received_at = now() - interval '10 minutes' WHERE id = :id"), {"id": retrying})
        db.execute(text("UPDATE marketplace_worker.stripe_events SET status = 'processed',"
                        " received_at = now() - interval '2 hours' WHERE id = :id"), {"id": done})
        db.commit()
        with session_scope() as session:
            classify.upsert_findings(session, [
                Finding(kind="amount_mismatch", subject=str(i), account="acct_a", detail="mismatch",
                        expected_cents=9_500, seen_cents=9_000, currency="eur") for i in range(2)])
        full = scrape(client)

    assert empty[("inbox_oldest_waiting_age_seconds", ())] == 0
    assert empty[("reconcile_discrepancies_unacknowledged", ())] == 0
    assert 20 * 60 <= full[("inbox_oldest_waiting_age_seconds", ())] < 25 * 60  # the processed one is not waiting
    assert full[("reconcile_discrepancies_unacknowledged", ())] == 2
    settings = get_settings()
    assert {job.name: full[("job_period_seconds", (("job", job.name),))] for job in JOBS} == {
        job.name: job.cadence(settings).period for job in JOBS}
