"""The event inbox: what an accepted Stripe event is, and how it is stored.

The inbox, not the broker, is the source of truth: an event is committed here
before Stripe gets its 2xx, and a task message carries only the event id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# One statement for a whole batch: the receiver groups concurrent requests into
# one commit, and a duplicate id (Stripe's retry) is a no-op by key. The arrays go in
# binary (%b): in text format psycopg quotes every payload by regular expression, which
# cost the receiver a fifth of its CPU.
INSERT_EVENTS_SQL = """
INSERT INTO marketplace_worker.stripe_events
    (id, type, account, livemode, api_version, created, payload, endpoint, status, last_error)
SELECT id, type, account, livemode, api_version, created, payload::jsonb, endpoint, status, note
FROM unnest(
    %(id)b::text[], %(type)b::text[], %(account)b::text[], %(livemode)b::bool[],
    %(api_version)b::text[], %(created)b::bigint[], %(payload)b::text[], %(endpoint)b::text[],
    %(status)b::text[], %(note)b::text[]
) AS batch(id, type, account, livemode, api_version, created, payload, endpoint, status, note)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""


class InvalidEvent(ValueError):
    """The body is JSON but not a Stripe event."""


@dataclass(frozen=True, slots=True)
class IncomingEvent:
    id: str
    type: str
    account: str | None
    livemode: bool
    api_version: str | None
    created: int
    body: str  # the exact text Stripe signed, stored as the payload
    endpoint: str  # "platform" | "connect" | "catchup"
    ignored_reason: str | None = None

    @property
    def status(self) -> str:
        return "ignored" if self.ignored_reason else "received"


def parse_event(body: str, endpoint: str, *, livemode: bool) -> IncomingEvent:
    """Check that a verified body is a v1 snapshot event and pick out what the inbox keeps.

    Raises ValueError when the body is not JSON and InvalidEvent when it is not an event.
    """
    data = json.loads(body, parse_constant=_no_constants)
    if "\\u0000" in body:
        # JSON allows NUL in strings, Postgres's jsonb does not: store U+FFFD instead.
        data = _without_nul(data)
        body = json.dumps(data)
    return event_from_dict(data, body, endpoint, livemode=livemode)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python accepts NaN/Infinity, Postgres's jsonb does not


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


def event_from_dict(data: Any, body: str, endpoint: str, *, livemode: bool) -> IncomingEvent:
    if not isinstance(data, dict) or data.get("object") != "event":
        raise InvalidEvent("not a Stripe event object")
    event_id, event_type, created = data.get("id"), data.get("type"), data.get("created")
    inner = data.get("data")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 255:
        raise InvalidEvent("event id missing or malformed")
    if not isinstance(event_type, str) or not event_type or len(event_type) > 255:
        raise InvalidEvent("event type missing")
    if isinstance(created, bool) or not isinstance(created, int) or not 0 < created < 2**40:
        raise InvalidEvent("event created missing or malformed")
    if not isinstance(inner, dict) or not isinstance(inner.get("object"), dict):
        raise InvalidEvent("event data.object missing")
    event_livemode = data.get("livemode")
    if not isinstance(event_livemode, bool):
        raise InvalidEvent("event livemode missing")
    account = data.get("account")
    if account is not None and not isinstance(account, str):
        raise InvalidEvent("event account malformed")
    api_version = data.get("api_version")
    return IncomingEvent(
        id=event_id,
        type=event_type,
        account=account,
        livemode=event_livemode,
        api_version=api_version if isinstance(api_version, str) else None,
        created=created,
        body=body,
        endpoint=endpoint,
        # An authentic event of the other mode (a Connect endpoint receives connected
        # accounts' test events too) is kept for the record and never applied.
        ignored_reason=None if event_livemode == livemode else "livemode mismatch",
    )


def insert_params(events: list[IncomingEvent]) -> dict[str, list]:
    return {
        "id": [e.id for e in events],
        "type": [e.type for e in events],
        "account": [e.account for e in events],
        "livemode": [e.livemode for e in events],
        "api_version": [e.api_version for e in events],
        "created": [e.created for e in events],
        "payload": [e.body for e in events],
        "endpoint": [e.endpoint for e in events],
        "status": [e.status for e in events],
        "note": [e.ignored_reason for e in events],
    }
