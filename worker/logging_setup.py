"""Log lines for every process (worker, beat, Flower, receiver, CLI).

Text by default; with LOG_JSON=true one JSON object per line. Every line carries the ids
it is about: whatever the code passed as `extra` (event_id, provider_id, job, ...) and,
inside a Celery task, task_id and task_name; in JSON, with tracing on (worker/tracing.py),
trace_id and span_id of the active span. Every line, exception text included, goes
through `Redactor` last, so no secret reaches the log: the configured secrets themselves
(webhook secrets, API key, Flower and URL passwords) and anything shaped like one (Stripe
keys, whsec_ secrets, passwords in URLs or key=value pairs, Authorization headers, card
numbers).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from config import ConfigError, Settings, get_settings

REDACTED = "[REDACTED]"

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_PATTERNS = [
    (re.compile(r"\bwhsec_[A-Za-z0-9]+"), "whsec_" + REDACTED),
    (re.compile(r"\b([sr]k)_(live|test)_[A-Za-z0-9]+"), r"\1_\2_" + REDACTED),
    # scheme://user:password@host
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*:)[^@/\s]+@"), r"\1" + REDACTED + "@"),
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer)\s+)[A-Za-z0-9+/=._~-]+"),
     r"\1" + REDACTED),
    (re.compile(r"(?i)\b(password|passwd|secret|api_key|basic_auth)([\"']?\s*[=:]\s*[\"']?)[^\s\"',;&]+"),
     r"\1\2" + REDACTED),
]
# A card number: 13 to 19 digits starting as card brands do (2-6), optionally grouped by spaces
# or dashes, standing alone (not inside a name or id) and passing the Luhn check.
_CARD = re.compile(r"(?<![\w.-])[2-6](?:[ -]?\d){12,18}(?![\w.-])")


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        literals = set()
        for secret in secrets:
            # Short values (a dev password like "dev") would blank out ordinary words.
            if secret and len(secret) >= 8:
                literals.update({secret, json.dumps(secret)[1:-1]})
        self.literals = sorted(literals, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for literal in self.literals:
            text = text.replace(literal, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return _CARD.sub(lambda m: "[REDACTED card]" if _luhn(re.sub(r"\D", "", m[0])) else m[0], text)


def configured_secrets(settings: Settings) -> list[str]:
    secrets = [s.get_secret_value() for s in settings.stripe_webhook_secrets + settings.stripe_connect_webhook_secrets]
    if settings.stripe_api_key is not None:
        secrets.append(settings.stripe_api_key.get_secret_value())
    if settings.flower_basic_auth is not None:
        for pair in settings.flower_basic_auth.get_secret_value().split(","):
            secrets += [pair, pair.partition(":")[2]]
    for url in (settings.database_url, settings.redis_url, settings.celery_broker_url, settings.celery_result_backend):
        password = urlsplit(url).password if url else None
        if password:
            secrets += [password, unquote(password)]
    return secrets


class TaskContext(logging.Filter):
    """Adds task_id and task_name: of the task running, or of the task a Celery record is
    about (Celery passes it as `data`, e.g. "Task ... received" in the worker's main process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery._state import get_current_task

        if hasattr(record, "task_id"):
            return True
        data = getattr(record, "data", None)
        task = get_current_task()
        if isinstance(data, dict) and "id" in data and "name" in data:
            record.task_id, record.task_name = data["id"], data["name"]
        elif task is not None and task.request.id:
            record.task_id, record.task_name = task.request.id, task.name
        return True


def _extras(record: logging.LogRecord) -> dict:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


def _trace_ids() -> dict[str, str]:
    """trace_id and span_id of the active span (worker/tracing.py), for log lines; nothing when
    no span is active, or when OpenTelemetry was never imported (then none can be)."""
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return {}
    context = otel.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
            **_trace_ids(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(line, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = _extras(record)
        if extras:
            head, newline, rest = text.partition("\n")
            context = " ".join(f"{key}={value}" for key, value in extras.items())
            text = f"{head} [{context}]{newline}{rest}"
        return self.redact(text)


def configure_logging(level: int | str | None = None) -> None:
    """Route every logger through one stderr handler; `level` (Celery's -l) can only make
    it more verbose than LOG_LEVEL."""
    try:
        settings = get_settings()
    except ConfigError:  # the command reports that itself; log plainly until then
        settings = None
    redact = Redactor(configured_secrets(settings) if settings else ())
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskContext())
    use_json = settings is not None and settings.log_json
    handler.setFormatter(JsonFormatter(redact) if use_json else TextFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    configured = logging.getLevelName(settings.log_level) if settings else logging.INFO
    requested = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    root.setLevel(min(configured, requested) if isinstance(requested, int) else configured)
    # The stripe SDK logs every request and response at INFO: two lines per API call, which
    # drown a reconciliation's own lines. Its requests are counted in the workers' metrics;
    # LOG_LEVEL=DEBUG shows them again.
    logging.getLogger("stripe").setLevel(logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING)
