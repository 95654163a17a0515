"""Realistic Stripe v1 objects and snapshot events for tests, signed exactly as Stripe signs webhooks.

Field names and behaviour follow /work/shared/stripe-facts.md and Stripe's published fixtures
(stripe/openapi, openapi/fixtures3.json). Invoices come in two shapes: "legacy" (API 2024-06-20:
top-level `charge`, `payment_intent`, `paid`) and "basil" (2025-03-31.basil and later: those are
gone; the payment is an InvoicePayment, told by `invoice_payment.paid` from 2025-05-28 on, or
read from the API). Events are built as Stripe sends them at the version they name: a webhook
expands nothing, so an invoice carries `payments` only when a test asks for it (an API read
with `expand[]=payments`), and a current-version charge has no `invoice`.
"""

from __future__ import annotations

import copy
import json
import secrets as _secrets
import string
import time
import uuid
from datetime import datetime
from typing import Any, Iterable, NamedTuple, Sequence

import stripe

LEGACY_API_VERSION = "2024-06-20"
BASIL_API_VERSION = "2025-03-31.basil"
CURRENT_API_VERSION = "2026-10-28.endive"  # what stripe-python 16 pins
_INVOICE_PAYMENT_PAID_SINCE = "2025-05-28"  # first API version that emits invoice_payment.paid
SHAPES = ("legacy", "basil")
OUTCOMES = (
    "paid",
    "void",
    "uncollectible",
    "paid_partial_refund",
    "paid_full_refund",
    "paid_disputed",
    "payment_failed_then_paid",
)
PAYOUT_OUTCOMES = ("paid", "failed", "canceled", "paid_then_failed")
HOUR = 3_600
DAY = 86_400

_ALNUM = string.ascii_letters + string.digits
_REPORTING_CATEGORY = {
    "charge": "charge",
    "payment": "charge",
    "refund": "refund",
    "payment_refund": "refund",
    "adjustment": "dispute",
    "transfer": "transfer",
    "transfer_refund": "transfer_reversal",
    "payout": "payout",
    "payout_cancel": "payout_reversal",
    "payout_failure": "payout_reversal",
}
_PAYOUT_FAILURE_MESSAGES = {
    "account_closed": "The bank account has been closed.",
    "insufficient_funds": "Your Stripe account has insufficient funds to cover the payout.",
    "no_account": "The bank account details on file are probably incorrect. "
                  "No bank account could be located with those details.",
}


def new_id(prefix: str, length: int = 24) -> str:
    return f"{prefix}_" + "".join(_secrets.choice(_ALNUM) for _ in range(length))


def _ts(value: int | datetime | None) -> int:
    if value is None:
        return int(time.time())
    return int(value.timestamp()) if isinstance(value, datetime) else int(value)


def _number() -> str:
    return "".join(_secrets.choice(string.ascii_uppercase + string.digits) for _ in range(8)) + "-0001"


def _list(data: list[dict], url: str) -> dict:
    return {"object": "list", "data": data, "has_more": False, "total_count": len(data), "url": url}


# --- signing ---------------------------------------------------------------------------------


def sign(
    payload: bytes | str,
    secrets: str | Sequence[str],
    timestamp: int | None = None,
    *,
    with_v0: bool = False,
) -> str:
    """`Stripe-Signature` value: one v1 per secret (several while a secret is being rolled)."""
    body = payload.decode("utf-8") if isinstance(payload, bytes) else payload
    t = int(time.time()) if timestamp is None else timestamp
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    items = [f"t={t}"] + [f"v1={stripe.WebhookSignature._compute_signature(f'{t}.{body}', k)}" for k in keys]
    if with_v0:  # test mode adds a v0 made with a secret nobody has; verifiers must ignore it
        items.append(f"v0={_secrets.token_hex(32)}")
    return ",".join(items)


def encode(event: dict) -> bytes:
    # Stripe pretty-prints webhook bodies; a handler that re-serialises them breaks the signature.
    return json.dumps(event, indent=2).encode("utf-8")


def webhook(
    event: dict, secrets: str | Sequence[str], timestamp: int | None = None, *, with_v0: bool = False
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of one delivery, ready to POST to the worker's webhook endpoint."""
    body = encode(event)
    return body, {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        "Stripe-Signature": sign(body, secrets, timestamp, with_v0=with_v0),
    }


# --- objects ---------------------------------------------------------------------------------


def invoice_payment(
    *,
    invoice: str,
    amount: int,
    payment_intent: str | None = None,
    charge: str | None = None,
    status: str = "paid",
    currency: str = "usd",
    created: int | datetime | None = None,
    paid_at: int | None = None,
    is_default: bool = True,
    id: str | None = None,
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    created = _ts(created)
    if charge and not payment_intent:  # `charge` is only set when there is no PaymentIntent
        payment = {"type": "charge", "charge": charge}
    else:
        payment = {"type": "payment_intent", "payment_intent": payment_intent or new_id("pi")}
    paid = status == "paid"
    return {
        "id": id or new_id("inpay"),
        "object": "invoice_payment",
        "amount_paid": amount if paid else None,
        "amount_requested": amount,
        "created": created,
        "currency": currency,
        "invoice": invoice,
        "is_default": is_default,
        "livemode": livemode,
        "payment": payment,
        "status": status,
        "status_transitions": {"canceled_at": None, "paid_at": (paid_at or created) if paid else None},
    } | overrides


def invoice(
    *,
    shape: str = "basil",
    id: str | None = None,
    app_invoice_id: str | None = None,
    amount: int = 10_000,
    amount_paid: int | None = None,
    status: str = "open",
    currency: str = "usd",
    customer: str | None = None,
    created: int | datetime | None = None,
    collection_method: str = "charge_automatically",
    due_date: int | None = None,
    number: str | None = None,
    charge: str | None = None,
    payment_intent: str | None = None,
    payments: list[dict] | None = None,
    include_payments: bool = False,
    status_transitions: dict | None = None,
    attempt_count: int | None = None,
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    """An Invoice in either shape, as a webhook carries it: without the includable `payments`.
    `include_payments=True` gives the form an API read with `expand[]=payments` returns."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}")
    id = id or new_id("in")
    created = _ts(created)
    paid = status == "paid"
    amount_paid = (amount if paid else 0) if amount_paid is None else amount_paid
    finalized = status != "draft"
    transitions = status_transitions or {
        "finalized_at": created if finalized else None,
        "marked_uncollectible_at": created if status == "uncollectible" else None,
        "paid_at": created if paid else None,
        "voided_at": created if status == "void" else None,
    }
    auto = collection_method == "charge_automatically"
    obj = {
        "id": id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "Marketplace",
        "amount_due": amount,
        "amount_paid": amount_paid,
        "amount_remaining": amount - amount_paid,
        "attempt_count": (1 if paid and auto else 0) if attempt_count is None else attempt_count,
        "attempted": (paid and auto) if attempt_count is None else attempt_count > 0,
        "auto_advance": status in ("draft", "open"),
        "billing_reason": "manual",
        "collection_method": collection_method,
        "created": created,
        "currency": currency,
        "customer": customer or new_id("cus", 14),
        "description": None,
        "due_date": None if auto else (due_date or created + 30 * DAY),
        "effective_at": transitions["finalized_at"],
        "last_finalization_error": None,
        "lines": _list(
            [{"id": new_id("il"), "object": "line_item", "amount": amount, "currency": currency,
              "description": "Marketplace order", "quantity": 1}],
            f"/v1/invoices/{id}/lines",
        ),
        "livemode": livemode,
        "metadata": {"invoiceId": app_invoice_id} if app_invoice_id else {},
        "next_payment_attempt": created + HOUR if auto and status == "open" else None,
        "number": number or (_number() if finalized else None),
        "on_behalf_of": None,
        "period_end": created,
        "period_start": created,
        "status": status,
        "status_transitions": transitions,
        "subtotal": amount,
        "total": amount,
    }
    if shape == "legacy":
        obj |= {"charge": charge, "payment_intent": payment_intent, "paid": paid, "paid_out_of_band": False,
                "subscription": None, "application_fee_amount": None, "transfer_data": None}
    else:
        obj |= {"amount_overpaid": 0, "parent": None}
        if include_payments:
            if payments is None:
                payments = [
                    invoice_payment(invoice=id, amount=amount, payment_intent=payment_intent, charge=charge,
                                    status="paid" if paid else "open", currency=currency, created=created,
                                    paid_at=transitions["paid_at"], livemode=livemode)
                ] if (payment_intent or charge) else []
            obj["payments"] = _list(payments, f"/v1/invoice_payments?invoice={id}")
    return obj | overrides


def charge(
    *,
    amount: int,
    id: str | None = None,
    shape: str = "basil",
    invoice: str | None = None,
    currency: str = "usd",
    payment_intent: str | None = None,
    customer: str | None = None,
    created: int | datetime | None = None,
    status: str = "succeeded",
    amount_refunded: int = 0,
    disputed: bool = False,
    balance_transaction: str | None = None,
    transfer_group: str | None = None,
    transfer: str | None = None,
    source_transfer: str | None = None,
    metadata: dict | None = None,
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    """A Charge; with `source_transfer` it is the `py_…` payment a transfer creates on the connected account."""
    ok = status == "succeeded"
    obj = {
        "id": id or new_id("py" if source_transfer else "ch"),
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if ok else 0,
        "amount_refunded": amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": balance_transaction or (new_id("txn") if ok else None),
        "captured": ok,
        "created": _ts(created),
        "currency": currency,
        "customer": customer,
        "description": None,
        "disputed": disputed,
        "failure_code": None if ok else "card_declined",
        "failure_message": None if ok else "Your card was declined.",
        "livemode": livemode,
        "metadata": metadata or {},
        "on_behalf_of": None,
        "outcome": {"network_status": "approved_by_network", "reason": None, "risk_level": "normal",
                    "seller_message": "Payment complete.", "type": "authorized"} if ok else
                   {"network_status": "declined_by_network", "reason": "generic_decline", "risk_level": "normal",
                    "seller_message": "The bank did not return any further details with this decline.",
                    "type": "issuer_declined"},
        "paid": ok,
        "payment_intent": payment_intent,
        "refunded": ok and amount_refunded >= amount,
        "source_transfer": source_transfer,
        "status": status,
        "transfer": transfer,
        "transfer_data": None,
        "transfer_group": transfer_group,
    }
    if shape == "legacy":  # basil removed Charge.invoice
        obj["invoice"] = invoice
    return obj | overrides


def refund(
    *,
    charge: str,
    amount: int,
    id: str | None = None,
    currency: str = "usd",
    payment_intent: str | None = None,
    status: str = "succeeded",
    reason: str | None = None,
    created: int | datetime | None = None,
    metadata: dict | None = None,
    **overrides: Any,
) -> dict:
    obj = {
        "id": id or new_id("re"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": new_id("txn") if status in ("succeeded", "pending") else None,
        "charge": charge,
        "created": _ts(created),
        "currency": currency,
        "metadata": metadata or {},
        "payment_intent": payment_intent,
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }
    if status == "failed":
        obj |= {"failure_reason": "unknown", "failure_balance_transaction": new_id("txn")}
    return obj | overrides


def balance_transaction(
    *,
    amount: int,
    type: str = "charge",
    source: str | None = None,
    id: str | None = None,
    currency: str = "usd",
    fee: int | None = None,
    created: int | datetime | None = None,
    available_on: int | None = None,
    status: str = "available",
    reporting_category: str | None = None,
    description: str | None = None,
    **overrides: Any,
) -> dict:
    created = _ts(created)
    if fee is None:  # US card pricing on charges; everything else here is free
        fee = round(amount * 0.029) + 30 if type == "charge" and amount > 0 else 0
    return {
        "id": id or new_id("txn"),
        "object": "balance_transaction",
        "amount": amount,
        "available_on": available_on or created + 2 * DAY,
        "created": created,
        "currency": currency,
        "description": description,
        "exchange_rate": None,
        "fee": fee,
        "fee_details": [{"amount": fee, "application": None, "currency": currency,
                         "description": "Stripe processing fees", "type": "stripe_fee"}] if fee else [],
        "net": amount - fee,
        "reporting_category": reporting_category or _REPORTING_CATEGORY.get(type, "other"),
        "source": source,
        "status": status,
        "type": type,
    } | overrides


def _dispute_bt(dispute_id: str, charge: str, amount: int, currency: str, created: int, *, reinstate: bool) -> dict:
    if reinstate:
        return balance_transaction(amount=amount, type="adjustment", source=dispute_id, fee=0, currency=currency,
                                   created=created, reporting_category="dispute_reversal",
                                   description=f"Chargeback reversal for {charge}")
    return balance_transaction(amount=-amount, type="adjustment", source=dispute_id, fee=1500, currency=currency,
                               created=created, description=f"Chargeback withdrawal for {charge}")


def dispute(
    *,
    charge: str,
    amount: int,
    id: str | None = None,
    currency: str = "usd",
    payment_intent: str | None = None,
    status: str = "needs_response",
    reason: str = "fraudulent",
    created: int | datetime | None = None,
    balance_transactions: list[dict] | None = None,
    metadata: dict | None = None,
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    """A Dispute; by default carries the withdrawal BT, plus the reinstatement once won (0–2 entries)."""
    id = id or new_id("dp")
    created = _ts(created)
    if balance_transactions is None:
        balance_transactions = [] if status.startswith("warning_") else [
            _dispute_bt(id, charge, amount, currency, created, reinstate=False)]
        if status == "won":
            balance_transactions.append(_dispute_bt(id, charge, amount, currency, created, reinstate=True))
    return {
        "id": id,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": balance_transactions,
        "charge": charge,
        "created": created,
        "currency": currency,
        "evidence_details": {"due_by": created + 7 * DAY, "has_evidence": False, "past_due": False,
                             "submission_count": 0},
        "is_charge_refundable": False,
        "livemode": livemode,
        "metadata": metadata or {},
        "payment_intent": payment_intent,
        "reason": reason,
        "status": status,
    } | overrides


def transfer_reversal(
    *,
    transfer: str,
    amount: int,
    id: str | None = None,
    currency: str = "usd",
    created: int | datetime | None = None,
    destination_payment_refund: str | None = None,
    source_refund: str | None = None,
    metadata: dict | None = None,
    **overrides: Any,
) -> dict:
    return {
        "id": id or new_id("trr"),
        "object": "transfer_reversal",
        "amount": amount,
        "balance_transaction": new_id("txn"),
        "created": _ts(created),
        "currency": currency,
        "destination_payment_refund": destination_payment_refund or new_id("pyr"),
        "metadata": metadata or {},
        "source_refund": source_refund,
        "transfer": transfer,
    } | overrides


def transfer(
    *,
    amount: int,
    destination: str,
    id: str | None = None,
    currency: str = "usd",
    created: int | datetime | None = None,
    transfer_group: str | None = None,
    source_transaction: str | None = None,
    amount_reversed: int = 0,
    reversals: list[dict] | None = None,
    destination_payment: str | None = None,
    description: str | None = None,
    metadata: dict | None = None,
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    id = id or new_id("tr")
    return {
        "id": id,
        "object": "transfer",
        "amount": amount,
        "amount_reversed": amount_reversed,
        "balance_transaction": new_id("txn"),
        "created": _ts(created),
        "currency": currency,
        "description": description,
        "destination": destination,
        "destination_payment": destination_payment or new_id("py"),
        "livemode": livemode,
        "metadata": metadata or {},
        "reversals": _list(reversals or [], f"/v1/transfers/{id}/reversals"),
        "reversed": amount > 0 and amount_reversed >= amount,
        "source_transaction": source_transaction,
        "source_type": "card",
        "transfer_group": transfer_group,
    } | overrides


def payout(
    *,
    amount: int,
    id: str | None = None,
    currency: str = "usd",
    status: str = "paid",
    created: int | datetime | None = None,
    arrival_date: int | None = None,
    automatic: bool = True,
    method: str = "standard",
    failure_code: str | None = None,
    failure_message: str | None = None,
    destination: str | None = None,
    metadata: dict | None = None,
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    created = _ts(created)
    failed = status == "failed"
    failure_code = failure_code or ("account_closed" if failed else None)
    if automatic:
        reconciliation = "completed" if status in ("paid", "failed") else "in_progress"
    else:  # Stripe only maps transactions to automatic payouts
        reconciliation = "not_applicable"
    return {
        "id": id or new_id("po"),
        "object": "payout",
        "amount": amount,
        "arrival_date": arrival_date or created + 2 * DAY,
        "automatic": automatic,
        "balance_transaction": new_id("txn"),
        "created": created,
        "currency": currency,
        "description": None,
        "destination": destination or new_id("ba"),
        "failure_balance_transaction": new_id("txn") if failed else None,
        "failure_code": failure_code,
        "failure_message": failure_message or (
            _PAYOUT_FAILURE_MESSAGES.get(failure_code, "The payout failed.") if failure_code else None),
        "livemode": livemode,
        "metadata": metadata or {},
        "method": method,
        "original_payout": None,
        "reconciliation_status": reconciliation,
        "reversed_by": None,
        "source_type": "card",
        "statement_descriptor": None,
        "status": status,
        "type": "bank_account",
    } | overrides


def _requirements(due: Sequence[str] = (), disabled_reason: str | None = None) -> dict:
    return {"alternatives": [], "current_deadline": None, "currently_due": list(due),
            "disabled_reason": disabled_reason, "errors": [], "eventually_due": list(due),
            "past_due": list(due), "pending_verification": []}


def account(
    *,
    id: str | None = None,
    type: str = "express",
    charges_enabled: bool = True,
    payouts_enabled: bool = True,
    details_submitted: bool = True,
    country: str = "US",
    email: str | None = None,
    default_currency: str = "usd",
    requirements: dict | None = None,
    metadata: dict | None = None,
    created: int | datetime | None = None,
    **overrides: Any,
) -> dict:
    enabled = charges_enabled and payouts_enabled
    return {
        "id": id or new_id("acct", 16),
        "object": "account",
        "business_type": "individual",
        "capabilities": {"card_payments": "active" if charges_enabled else "inactive",
                         "transfers": "active" if payouts_enabled else "inactive"},
        "charges_enabled": charges_enabled,
        "country": country,
        "created": _ts(created),
        "default_currency": default_currency,
        "details_submitted": details_submitted,
        "email": email,
        "future_requirements": _requirements(),
        "metadata": metadata or {},
        "payouts_enabled": payouts_enabled,
        "requirements": requirements or (_requirements() if enabled else _requirements(
            ["external_account", "individual.verification.document"], "requirements.past_due")),
        "settings": {"payouts": {"schedule": {"delay_days": 2, "interval": "daily"}}},
        "type": type,
    } | overrides


# --- events ----------------------------------------------------------------------------------


def _default_api_version(obj: dict) -> str:
    legacy = (obj.get("object") == "invoice" and "paid" in obj) or (obj.get("object") == "charge" and "invoice" in obj)
    return LEGACY_API_VERSION if legacy else CURRENT_API_VERSION


def event(
    type: str,
    obj: dict,
    *,
    created: int | datetime | None = None,
    id: str | None = None,
    account: str | None = None,
    livemode: bool = False,
    api_version: str | None = None,
    previous_attributes: dict | None = None,
) -> dict:
    """v1 snapshot event; `account` only for Connect-endpoint events; api_version defaults to obj's shape."""
    ev: dict[str, Any] = {"id": id or new_id("evt"), "object": "event"}
    if account:
        ev["account"] = account
    ev |= {
        "api_version": api_version or _default_api_version(obj),
        "created": _ts(created),
        "data": {"object": copy.deepcopy(obj)},
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": new_id("req", 14), "idempotency_key": str(uuid.uuid4())},
        "type": type,
    }
    if previous_attributes is not None:
        ev["data"]["previous_attributes"] = copy.deepcopy(previous_attributes)
    return ev


def _apply(obj: dict, changes: dict) -> dict:
    """Mutate obj; return Stripe-style previous_attributes (only changed keys, nested dicts diffed)."""
    previous: dict[str, Any] = {}
    for key, value in changes.items():
        old = obj.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("object") != "list":
            changed = {k: old.get(k) for k, v in value.items() if old.get(k) != v}
            if changed:
                previous[key] = changed
            obj[key] = {**old, **value}
        elif old != value:
            previous[key] = copy.deepcopy(old)
            obj[key] = value
    return previous


class Seed(NamedTuple):
    """An object no event carries (a BT, a `py_…` payment, an InvoicePayment) and where it lives."""

    obj: dict
    account: str | None = None
    payout: str | None = None  # balance transactions swept into this automatic payout


class Timeline(list):
    """Events in delivery order, the extra objects behind them, and the Stripe ids involved (as attributes)."""

    def __init__(self, events: Iterable[dict] = (), objects: Iterable[Seed] = (), **ids: Any):
        super().__init__(events)
        self.objects = list(objects)
        self.ids = ids

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["ids"][name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def merge(cls, *parts: Timeline, **ids: Any) -> Timeline:
        events = sorted((e for p in parts for e in p), key=lambda e: e["created"])  # stable within a second
        return cls(events, [s for p in parts for s in p.objects], **ids)


def invoice_lifecycle(
    app_invoice_id: str,
    amount_cents: int,
    *,
    shape: str = "basil",
    start: int | datetime | None = None,
    outcome: str = "paid",
    currency: str = "usd",
    customer: str | None = None,
    api_version: str | None = None,
    collection_method: str = "charge_automatically",
    include_payments: bool = False,
    refund_amounts: Sequence[int] | None = None,
    dispute_outcome: str | None = None,
    livemode: bool = False,
) -> Timeline:
    """All events of one invoice, oldest first, at `api_version` (default: the current one for
    the basil shape, which sends `invoice_payment.paid`; 2025-03-31.basil does not). Ids:
    invoice_id, payment_intent_id, charge_id, failed_charge_id, invoice_payment_id (basil),
    refund_ids, dispute_id, customer_id. `include_payments` puts the expanded `payments` on the
    invoice snapshots, which no webhook does: only for tests of what a read would return."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}")
    if dispute_outcome not in (None, "won", "lost"):
        raise ValueError("dispute_outcome must be None, 'won' or 'lost'")
    basil = shape == "basil"
    version = api_version or (CURRENT_API_VERSION if basil else LEGACY_API_VERSION)
    t0 = _ts(start)
    pi = new_id("pi")
    inv = invoice(shape=shape, app_invoice_id=app_invoice_id, amount=amount_cents, status="draft", currency=currency,
                  customer=customer, created=t0, collection_method=collection_method,
                  include_payments=include_payments, livemode=livemode)
    ip = invoice_payment(invoice=inv["id"], amount=amount_cents, payment_intent=pi, status="open", currency=currency,
                         created=t0, livemode=livemode)
    tl = Timeline(invoice_id=inv["id"], payment_intent_id=pi, customer_id=inv["customer"], charge_id=None,
                  failed_charge_id=None, invoice_payment_id=ip["id"] if basil else None, refund_ids=[],
                  dispute_id=None)

    def emit(type: str, obj: dict, at: int, previous: dict | None = None) -> None:
        tl.append(event(type, obj, created=at, api_version=version, livemode=livemode,
                        previous_attributes=previous if type.endswith(".updated") else None))

    def update_invoice(at: int, types: Sequence[str], **changes: Any) -> None:
        if basil and include_payments:
            changes["payments"] = _list([copy.deepcopy(ip)], f"/v1/invoice_payments?invoice={inv['id']}")
        previous = _apply(inv, changes)
        for type in types:
            emit(type, inv, at, previous)

    def attempt(at: int, succeed: bool) -> dict:
        ch = charge(amount=amount_cents, shape=shape, invoice=inv["id"], currency=currency, payment_intent=pi,
                    customer=inv["customer"], created=at, status="succeeded" if succeed else "failed",
                    livemode=livemode)
        emit("charge.succeeded" if succeed else "charge.failed", ch, at)
        count = inv["attempt_count"] + 1
        legacy = {} if basil else {"charge": ch["id"], "paid": succeed}
        if succeed:
            tl.ids["charge_id"] = ch["id"]
            tl.objects.append(Seed(balance_transaction(amount=amount_cents, type="charge", source=ch["id"],
                                                       id=ch["balance_transaction"], currency=currency, created=at)))
            _apply(ip, {"status": "paid", "amount_paid": amount_cents, "status_transitions": {"paid_at": at}})
            if basil and version >= _INVOICE_PAYMENT_PAID_SINCE:
                emit("invoice_payment.paid", ip, at)
            update_invoice(at, ["invoice.paid", "invoice.payment_succeeded", "invoice.updated"],
                           status="paid", amount_paid=amount_cents, amount_remaining=0, attempted=True,
                           attempt_count=count, auto_advance=False, next_payment_attempt=None,
                           status_transitions={"paid_at": at}, **legacy)
        else:
            tl.ids["failed_charge_id"] = ch["id"]
            update_invoice(at, ["invoice.payment_failed", "invoice.updated"], attempted=True, attempt_count=count,
                           next_payment_attempt=at + 3 * DAY, **legacy)
        return ch

    emit("invoice.created", inv, t0)
    update_invoice(t0, ["invoice.finalized"], status="open", number=_number(),
                   effective_at=t0, status_transitions={"finalized_at": t0},
                   next_payment_attempt=t0 + HOUR if collection_method == "charge_automatically" else None,
                   **({} if basil else {"payment_intent": pi}))
    t_pay = t0 + HOUR
    if outcome == "void":
        _apply(ip, {"status": "canceled", "status_transitions": {"canceled_at": t0 + HOUR // 2}})
        update_invoice(t0 + HOUR // 2, ["invoice.voided", "invoice.updated"], status="void", auto_advance=False,
                       next_payment_attempt=None, status_transitions={"voided_at": t0 + HOUR // 2})
    elif outcome == "uncollectible":
        attempt(t_pay, succeed=False)
        at = t0 + 30 * DAY
        update_invoice(at, ["invoice.marked_uncollectible", "invoice.updated"], status="uncollectible",
                       auto_advance=False, next_payment_attempt=None,
                       status_transitions={"marked_uncollectible_at": at})
    else:
        if outcome == "payment_failed_then_paid":
            attempt(t_pay, succeed=False)
            t_pay += 3 * DAY
        ch = attempt(t_pay, succeed=True)
        if outcome in ("paid_partial_refund", "paid_full_refund"):
            amounts = list(refund_amounts or ([amount_cents // 4] * 2 if outcome == "paid_partial_refund"
                                              else [amount_cents]))
            full = sum(amounts) == amount_cents
            if min(amounts) <= 0 or sum(amounts) > amount_cents or full != (outcome == "paid_full_refund"):
                raise ValueError(f"refund_amounts {amounts} do not fit outcome {outcome!r}")
            for n, amount in enumerate(amounts, 1):
                at = t_pay + n * DAY
                re = refund(charge=ch["id"], amount=amount, currency=currency, payment_intent=pi, created=at,
                            reason="requested_by_customer")
                _apply(ch, {"amount_refunded": ch["amount_refunded"] + amount,
                            "refunded": ch["amount_refunded"] + amount == amount_cents})
                emit("charge.refunded", ch, at)
                emit("refund.created", re, at)
                tl.ids["refund_ids"].append(re["id"])
                tl.objects.append(Seed(balance_transaction(amount=-amount, type="refund", source=re["id"],
                                                           id=re["balance_transaction"], currency=currency,
                                                           created=at)))
        elif outcome == "paid_disputed":
            at = t_pay + 14 * DAY
            dp = dispute(charge=ch["id"], amount=amount_cents, currency=currency, payment_intent=pi, created=at,
                         livemode=livemode)
            tl.ids["dispute_id"] = dp["id"]
            emit("charge.dispute.created", dp, at)
            emit("charge.dispute.funds_withdrawn", dp, at)
            if dispute_outcome:
                at += 60 * DAY
                dp["status"] = dispute_outcome
                emit("charge.dispute.closed", dp, at)
                if dispute_outcome == "won":
                    dp["balance_transactions"].append(
                        _dispute_bt(dp["id"], ch["id"], amount_cents, currency, at, reinstate=True))
                    emit("charge.dispute.funds_reinstated", dp, at)
    if basil:
        tl.objects.append(Seed(copy.deepcopy(ip)))
    return tl


def transfer_history(
    destination: str,
    amount: int,
    *,
    start: int | datetime | None = None,
    transfer_group: str | None = None,
    reversal_amounts: Sequence[int] = (),
    metadata_update: dict | None = None,
    currency: str = "usd",
    livemode: bool = False,
) -> Timeline:
    """A platform transfer: transfer.created [, transfer.updated] [, transfer.reversed…], all on the platform
    endpoint (no `account`). Seeds the platform BTs and, on the destination, the `py_…` payment and its BTs.
    Ids: transfer_id, destination_payment_id, reversal_ids, connected_balance_transactions (BT dicts)."""
    t0 = _ts(start)
    tr = transfer(amount=amount, destination=destination, currency=currency, created=t0,
                  transfer_group=transfer_group, livemode=livemode)
    py = charge(amount=amount, id=tr["destination_payment"], currency=currency, created=t0, source_transfer=tr["id"],
                transfer_group=transfer_group, livemode=livemode, outcome=None)
    py_bt = balance_transaction(amount=amount, type="payment", source=py["id"], id=py["balance_transaction"],
                                fee=0, currency=currency, created=t0)
    tl = Timeline([event("transfer.created", tr, created=t0, livemode=livemode)],
                  [Seed(balance_transaction(amount=-amount, type="transfer", source=tr["id"],
                                            id=tr["balance_transaction"], currency=currency, created=t0)),
                   Seed(py_bt, destination)],
                  transfer_id=tr["id"], destination_payment_id=py["id"], reversal_ids=[],
                  connected_balance_transactions=[py_bt])
    if metadata_update:
        previous = _apply(tr, {"metadata": {**tr["metadata"], **metadata_update}})
        tl.append(event("transfer.updated", tr, created=t0 + 60, livemode=livemode, previous_attributes=previous))
    for n, reversed_amount in enumerate(reversal_amounts, 1):
        at = t0 + n * DAY
        trr = transfer_reversal(transfer=tr["id"], amount=reversed_amount, currency=currency, created=at)
        _apply(tr, {"amount_reversed": tr["amount_reversed"] + reversed_amount,
                    "reversed": tr["amount_reversed"] + reversed_amount >= amount,
                    "reversals": _list([trr, *tr["reversals"]["data"]], tr["reversals"]["url"])})
        py["amount_refunded"] += reversed_amount
        py["refunded"] = py["amount_refunded"] >= amount
        tl.append(event("transfer.reversed", tr, created=at, livemode=livemode))
        refund_bt = balance_transaction(amount=-reversed_amount, type="payment_refund", fee=0, currency=currency,
                                        source=trr["destination_payment_refund"], created=at)
        tl.objects += [Seed(balance_transaction(amount=reversed_amount, type="transfer_refund", source=trr["id"],
                                                id=trr["balance_transaction"], currency=currency, created=at)),
                       Seed(refund_bt, destination)]
        tl.ids["reversal_ids"].append(trr["id"])
        tl.ids["connected_balance_transactions"].append(refund_bt)
    tl.objects.append(Seed(py, destination))
    return tl


def payout_history(
    account: str,
    amount: int,
    *,
    start: int | datetime | None = None,
    outcome: str = "paid",
    automatic: bool = True,
    swept: Sequence[dict] = (),
    currency: str = "usd",
    livemode: bool = False,
) -> Timeline:
    """A connected account's payout, as the Connect endpoint sees it (`account` set on every event).
    `swept` are that account's BT dicts the payout carries (linked for `?payout=` only when automatic).
    Ids: payout_id."""
    if outcome not in PAYOUT_OUTCOMES:
        raise ValueError(f"outcome must be one of {PAYOUT_OUTCOMES}")
    t0 = _ts(start)
    po = payout(amount=amount, currency=currency, status="pending", created=t0, automatic=automatic,
                livemode=livemode)
    tl = Timeline(payout_id=po["id"])

    def emit(types: Sequence[str], at: int, **changes: Any) -> None:
        previous = _apply(po, changes)
        for type in types:
            tl.append(event(type, po, created=at, account=account, livemode=livemode,
                            previous_attributes=previous if type.endswith(".updated") else None))

    def bt(amount: int, type: str, id: str, at: int) -> Seed:
        return Seed(balance_transaction(amount=amount, type=type, source=po["id"], id=id, fee=0, currency=currency,
                                        created=at), account, po["id"] if automatic and type == "payout" else None)

    emit(["payout.created"], t0)
    tl.objects.append(bt(-amount, "payout", po["balance_transaction"], t0))
    tl.objects += [Seed(b, account, po["id"] if automatic else None) for b in swept]
    if outcome == "canceled":
        emit(["payout.canceled", "payout.updated"], t0 + HOUR, status="canceled")
        tl.objects.append(bt(amount, "payout_cancel", new_id("txn"), t0 + HOUR))
        return tl
    emit(["payout.updated"], t0 + HOUR, status="in_transit")
    arrival = po["arrival_date"]
    failure = {"status": "failed", "failure_code": "account_closed", "failure_balance_transaction": new_id("txn"),
               "failure_message": _PAYOUT_FAILURE_MESSAGES["account_closed"]}
    failed_at = arrival
    if outcome != "failed":
        emit(["payout.paid", "payout.updated"], arrival, status="paid")
        if automatic:
            emit(["payout.reconciliation_completed"], arrival, reconciliation_status="completed")
        failed_at += 2 * DAY  # some failures first show `paid`
    if outcome in ("failed", "paid_then_failed"):
        emit(["payout.failed", "payout.updated"], failed_at, **failure)
        tl.objects.append(bt(amount, "payout_failure", po["failure_balance_transaction"], failed_at))
    return tl


def account_updated(acct: dict, *, created: int | datetime | None = None, livemode: bool = False,
                    **changes: Any) -> dict:
    """account.updated (Connect endpoint) with `changes` applied to a copy of `acct`."""
    obj = copy.deepcopy(acct)
    previous = _apply(obj, changes)
    return event("account.updated", obj, created=created, account=obj["id"], livemode=livemode,
                 previous_attributes=previous)


def account_deauthorized(account_id: str, *, created: int | datetime | None = None,
                         application: str | None = None, livemode: bool = False) -> dict:
    app = {"id": application or new_id("ca", 32), "object": "application", "name": "Marketplace"}
    return event("account.application.deauthorized", app, created=created, account=account_id, livemode=livemode)


def connect_history(
    account_id: str | None = None,
    *,
    start: int | datetime | None = None,
    transfer_amounts: Sequence[int] = (5_000,),
    reversal_amount: int | None = None,
    payout_outcome: str | None = "paid",
    automatic_payout: bool = True,
    deauthorize: bool = False,
    currency: str = "usd",
) -> Timeline:
    """Onboarding (account.updated) → transfers (first one optionally reversed) → a payout of the net →
    optional deauthorization. Ids: account_id, transfer_ids, destination_payment_ids, reversal_ids, payout_id."""
    t0 = _ts(start)
    acct = account(id=account_id, charges_enabled=False, payouts_enabled=False, details_submitted=False,
                   created=t0 - DAY)
    onboarding = Timeline(
        [account_updated(acct, created=t0, charges_enabled=True, payouts_enabled=True, details_submitted=True,
                         requirements=_requirements(),
                         capabilities={"card_payments": "active", "transfers": "active"})])
    transfers = [transfer_history(acct["id"], amount, start=t0 + HOUR + n * 60, currency=currency,
                                  reversal_amounts=[reversal_amount] if reversal_amount and n == 0 else ())
                 for n, amount in enumerate(transfer_amounts)]
    parts = [onboarding, *transfers]
    swept = [bt for t in transfers for bt in t.connected_balance_transactions]
    payout_id = None
    if payout_outcome:
        po = payout_history(acct["id"], sum(bt["net"] for bt in swept), start=t0 + 3 * DAY, outcome=payout_outcome,
                            automatic=automatic_payout, swept=swept, currency=currency)
        payout_id = po.payout_id
        parts.append(po)
    if deauthorize:
        last = max(e["created"] for p in parts for e in p)
        parts.append(Timeline([account_deauthorized(acct["id"], created=last + DAY)]))
    return Timeline.merge(
        *parts, account_id=acct["id"], transfer_ids=[t.transfer_id for t in transfers],
        destination_payment_ids=[t.destination_payment_id for t in transfers],
        reversal_ids=[r for t in transfers for r in t.reversal_ids], payout_id=payout_id)


def publish(fake: Any, events: Iterable[dict], objects: Iterable[Seed] | None = None) -> None:
    """Store events (in their `account` scope) and the latest snapshot of each event's object in a FakeStripe,
    then `objects` (default: a Timeline's .objects; final snapshots, so they win), so /v1/events and
    retrieves can serve them."""
    for ev in sorted(events, key=lambda e: e["created"]):  # later snapshots overwrite earlier ones
        fake.add("events", ev, account=ev.get("account"))
        obj = ev["data"]["object"]
        if obj.get("object") in fake.COLLECTIONS:
            fake.add(obj["object"], obj, account=ev.get("account"))
    for seed in getattr(events, "objects", ()) if objects is None else objects:
        fake.add(seed.obj["object"], seed.obj, account=seed.account, payout=seed.payout)


# --- Connect fund flows: destination charges, refunds after transfer ----------------------------


def application_fee(
    *,
    charge: str,
    account: str,
    amount: int,
    id: str | None = None,
    currency: str = "usd",
    created: int | datetime | None = None,
    refund_amounts: Sequence[int] = (),
    livemode: bool = False,
    **overrides: Any,
) -> dict:
    """An ApplicationFee (fixtures3.json `application_fee`), with its `fee_refund`s."""
    id = id or new_id("fee")
    created = _ts(created)
    refunds = [{"amount": amount_, "balance_transaction": new_id("txn"), "created": created + n * DAY,
                "currency": currency, "fee": id, "id": new_id("fr"), "metadata": {}, "object": "fee_refund"}
               for n, amount_ in enumerate(refund_amounts, 1)]
    refunded = sum(refund_amounts)
    return {
        "account": account,
        "amount": amount,
        "amount_refunded": refunded,
        "application": "ca_" + "marketplace0000000000000000000",
        "balance_transaction": new_id("txn"),
        "charge": charge,
        "created": created,
        "currency": currency,
        "id": id,
        "livemode": livemode,
        "object": "application_fee",
        "originating_transaction": None,
        "refunded": refunded >= amount > 0,
        "refunds": _list(list(reversed(refunds)), f"/v1/application_fees/{id}/refunds"),
    } | overrides


def _share(part: int, of: int, whole: int) -> int:
    """part * of / whole, rounded half up: Stripe's proportional reversal or fee refund."""
    return (2 * part * of + whole) // (2 * whole)


def destination_charge_history(
    destination: str,
    amount: int,
    *,
    application_fee_amount: int | None = None,
    transfer_amount: int | None = None,
    start: int | datetime | None = None,
    refund_amounts: Sequence[int] = (),
    reversal_amounts: Sequence[int] | None = None,
    refund_application_fee: bool = True,
    currency: str = "usd",
    livemode: bool = False,
) -> Timeline:
    """A destination charge (`transfer_data.destination`) on the platform and what Stripe does
    with it: the transfer it creates itself (`source_transaction` = the charge, the whole amount
    unless `transfer_amount` is set, `destination_payment` = the `py_...` on the account), the
    application fee it collects back, and refunds with `reverse_transfer=true` (a proportional
    reversal unless `reversal_amounts` says otherwise; with `refund_application_fee`, the fee
    refunded proportionally too). Platform events, oldest first; the connected account's `py_...`
    payment and its balance transactions are seeded. Ids: charge_id, payment_intent_id,
    transfer_id, destination_payment_id, application_fee_id, refund_ids, reversal_ids,
    connected_balance_transactions (BT dicts on the account, the payment's first)."""
    if application_fee_amount is not None and transfer_amount is not None:
        raise ValueError("Stripe takes application_fee_amount or transfer_data.amount, not both")
    t0 = _ts(start)
    pi = new_id("pi")
    ch_id, tr_id = new_id("ch"), new_id("tr")
    sent = amount if transfer_amount is None else transfer_amount
    reversal_amounts = list(reversal_amounts if reversal_amounts is not None
                            else [_share(r, sent, amount) for r in refund_amounts])
    if len(reversal_amounts) != len(refund_amounts):
        raise ValueError("one reversal per refund")
    fee = None
    if application_fee_amount:
        fee_refunds = [_share(r, application_fee_amount, amount) for r in refund_amounts] \
            if refund_application_fee else []
        fee = application_fee(charge=ch_id, account=destination, amount=application_fee_amount,
                              currency=currency, created=t0, livemode=livemode)
    group = f"group_{pi}"
    ch = charge(amount=amount, id=ch_id, currency=currency, payment_intent=pi, created=t0, transfer=tr_id,
                transfer_group=group, livemode=livemode, application_fee=fee["id"] if fee else None,
                application_fee_amount=application_fee_amount,
                transfer_data={"amount": transfer_amount, "destination": destination})
    tr = transfer(amount=sent, id=tr_id, destination=destination, currency=currency, created=t0,
                  transfer_group=group, source_transaction=ch_id, livemode=livemode)
    py = charge(amount=sent, id=tr["destination_payment"], currency=currency, created=t0, source_transfer=tr_id,
                transfer_group=group, livemode=livemode, outcome=None)
    fee_cents = application_fee_amount or 0
    py_bt = balance_transaction(
        amount=sent, type="payment", source=py["id"], id=py["balance_transaction"], fee=fee_cents,
        currency=currency, created=t0,
        fee_details=[{"amount": fee_cents, "application": fee["application"], "currency": currency,
                      "description": "Application fee", "type": "application_fee"}] if fee else [])
    tl = Timeline([event("charge.succeeded", ch, created=t0, livemode=livemode),
                   event("transfer.created", tr, created=t0, livemode=livemode)],
                  [Seed(balance_transaction(amount=amount, type="charge", source=ch_id,
                                            id=ch["balance_transaction"], currency=currency, created=t0)),
                   Seed(balance_transaction(amount=-sent, type="transfer", source=tr_id,
                                            id=tr["balance_transaction"], currency=currency, created=t0)),
                   Seed(py_bt, destination)],
                  charge_id=ch_id, payment_intent_id=pi, transfer_id=tr_id, destination_payment_id=py["id"],
                  application_fee_id=fee["id"] if fee else None, refund_ids=[], reversal_ids=[],
                  connected_balance_transactions=[py_bt])
    if fee:
        tl.append(event("application_fee.created", fee, created=t0, livemode=livemode))
        tl.objects.append(Seed(balance_transaction(amount=fee_cents, type="application_fee", source=fee["id"],
                                                   id=fee["balance_transaction"], currency=currency, created=t0)))
    for n, (refunded, reversed_amount) in enumerate(zip(refund_amounts, reversal_amounts), 1):
        at = t0 + n * DAY
        re_id = new_id("re")
        trr = transfer_reversal(transfer=tr_id, amount=reversed_amount, currency=currency, created=at,
                                source_refund=re_id) if reversed_amount else None
        re = refund(charge=ch_id, amount=refunded, id=re_id, currency=currency, payment_intent=pi, created=at,
                    reason="requested_by_customer", transfer_reversal=trr["id"] if trr else None)
        _apply(ch, {"amount_refunded": ch["amount_refunded"] + refunded,
                    "refunded": ch["amount_refunded"] + refunded >= amount})
        tl.append(event("charge.refunded", ch, created=at, livemode=livemode))
        tl.append(event("refund.created", re, created=at, livemode=livemode))
        tl.ids["refund_ids"].append(re_id)
        tl.objects.append(Seed(balance_transaction(amount=-refunded, type="refund", source=re_id,
                                                   id=re["balance_transaction"], currency=currency, created=at)))
        if trr:
            _apply(tr, {"amount_reversed": tr["amount_reversed"] + reversed_amount,
                        "reversed": tr["amount_reversed"] + reversed_amount >= sent,
                        "reversals": _list([trr, *tr["reversals"]["data"]], tr["reversals"]["url"])})
            py["amount_refunded"] += reversed_amount
            py["refunded"] = py["amount_refunded"] >= sent
            tl.append(event("transfer.reversed", tr, created=at, livemode=livemode))
            refund_bt = balance_transaction(amount=-reversed_amount, type="payment_refund", fee=0,
                                            currency=currency, source=trr["destination_payment_refund"],
                                            created=at)
            tl.objects += [Seed(balance_transaction(amount=reversed_amount, type="transfer_refund", source=trr["id"],
                                                    id=trr["balance_transaction"], currency=currency, created=at)),
                           Seed(refund_bt, destination)]
            tl.ids["reversal_ids"].append(trr["id"])
            tl.ids["connected_balance_transactions"].append(refund_bt)
        if fee and fee_refunds and fee_refunds[n - 1]:
            fr = {"amount": fee_refunds[n - 1], "balance_transaction": new_id("txn"), "created": at,
                  "currency": currency, "fee": fee["id"], "id": new_id("fr"), "metadata": {}, "object": "fee_refund"}
            _apply(fee, {"amount_refunded": fee["amount_refunded"] + fr["amount"],
                         "refunded": fee["amount_refunded"] + fr["amount"] >= fee["amount"],
                         "refunds": _list([fr, *fee["refunds"]["data"]], fee["refunds"]["url"])})
            tl.append(event("application_fee.refunded", fee, created=at, livemode=livemode))
    tl.objects += [Seed(py, destination), Seed(copy.deepcopy(ch)), Seed(copy.deepcopy(tr))]
    if fee:
        tl.objects.append(Seed(copy.deepcopy(fee)))
    return tl
