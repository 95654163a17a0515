"""Reading a stored Stripe event's payload. A leaf of `domain/`."""

from __future__ import annotations

from domain.errors import InvalidPayload
from models import StripeEvent


def event_object(event: StripeEvent, kind: str) -> dict:
    """The event's `data.object`, which must be a Stripe `kind` (a charge, a payout, ...)."""
    obj = event.payload["data"]["object"]
    if obj.get("object") != kind:
        raise InvalidPayload(f"{event.type} carries a {obj.get('object')!r}, not a {kind}")
    return obj
