"""Reading a stored Stripe event's payload and the Stripe objects in it. A leaf of `domain/`."""

from __future__ import annotations

from typing import Any

from domain.errors import InvalidPayload
from models import StripeEvent


def event_object(event: StripeEvent, kind: str) -> dict:
    """The event's `data.object`, which must be a Stripe `kind` (a charge, a payout, ...)."""
    obj = event.payload["data"]["object"]
    if obj.get("object") != kind:
        raise InvalidPayload(f"{event.type} carries a {obj.get('object')!r}, not a {kind}")
    return obj


def ref(value: Any) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def integer(obj: dict[str, Any], name: str, default: int | None = None) -> int:
    """An integer field (an amount in minor units, a count), which it must be: not a float,
    a string or a boolean."""
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{obj.get('object', 'object')} {obj.get('id')} {name} is not an integer")
    return value


def required_id(obj: dict[str, Any], kind: str) -> str:
    """The id of a Stripe `kind` object, which it must have."""
    object_id = obj.get("id")
    if not isinstance(object_id, str) or not object_id:
        raise InvalidPayload(f"{kind} without an id")
    return object_id
