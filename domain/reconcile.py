"""Stripe Connect: account sync, the transfer/payout mirror, and payouts reconciliation (SPEC §5).

For a `stripe_connect` provider, money reaches the provider in two hops: a transfer to the
connected account (`tr_...`, which creates a `py_...` payment there), then the account's
payout to its bank (`po_...`). The transfer comes from either fund flow: the platform's own
(separate charges and transfers, `providerPayoutCents`), or Stripe's for a destination charge
(`transfer_data.destination`: the whole charge, its application fee collected back from the
account). Reconciliation proves the second hop the way Stripe documents it: the transfer's
`destination_payment` appears as the `source` of a balance transaction inside a **paid**
automatic payout (`GET /v1/balance_transactions?payout=` with `Stripe-Account`). A payout that
failed or was canceled returns its money to the account's balance; the `payout_failure` /
`payout_cancel` balance transaction then rides in a later payout, which is followed to see the
money leave again. Stripe itemizes no manual payout: on an account on manual payouts the
transfer's money being available on the account (its `payment` balance transaction's
`available_on`) is what completes a transaction.

One account's run:
  1. takes a per-account advisory lock (two workers on one account: one does the work);
  2. lists, read-only and `limit=100`, the platform's transfers to the account (each with its
     source charge and application fee expanded) and the account's payouts created in the
     window;
  3. stores them in the mirror (`connect_transfers`, `connect_payouts`), which webhook events
     also feed, so each listing only needs the window since the last, and matches the
     transfers that are new or matched nothing yet to the provider's transactions;
  4. reads what the mirror now calls for: the balance transactions of every finished
     automatic payout not listed before (a payout's contents never change); on manual payouts,
     the account's `payment` balance transactions not stored yet (`connect_payments`); the
     application fees of destination charges reversed since their fee was last read; and, when
     no standard payout tells whether the account is on manual payouts, its payout schedule;
  5. classifies, in SQL, every paid transaction of the provider (and the completed ones
     whose payout may still fail, whose transfer changed after a reversal, or with an open
     discrepancy), completes the paid-out ones (unless a dispute holds them), and upserts
     discrepancies: seen ones get `last_seen_at`, open ones no longer seen get `resolved_at`.

The run holds no database transaction open while it talks to Stripe.

The provider's expected net is `providerPayoutCents` less its share of what was refunded
(lost disputes included), rounded half up; the net it got is its transfers less their
reversals and, for destination charges, less the application fee net of its refunds. What a
transaction comes out as: `paid_out` (then `completed`), `awaiting_payout`, `funds_available`
(manual payouts; then `completed`), `awaiting_funds` (manual payouts), `awaiting_transfer`
(paid less than RECONCILE_TRANSFER_GRACE_HOURS ago), or a discrepancy: `missing_transfer`,
`transfer_reversed` (after a reversal, short of the expected net by more than a cent per
refund), `amount_mismatch` (any other difference), `payout_failed`. Transfers:
`orphan_transfer` (no transaction of the provider), `transfer_not_reversed` (money left with
the provider for a refunded or cancelled transaction), and, over all accounts,
`unknown_destination` (no stripe_connect provider).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import stripe
from sqlalchemy import Engine, bindparam, select, text
from sqlalchemy.orm import Session

from domain import lifecycle
from domain.clock import from_unix
from domain.errors import InvalidPayload
from domain.stats_touch import touch_providers
from domain.stripe_api import with_rate_limit_retry
from models import ConnectAccount, Provider

log = logging.getLogger(__name__)

SessionFactory = Callable[[], AbstractContextManager[Session]]
T = TypeVar("T")
R = TypeVar("R")

DAY = 86_400
# Each listing reaches back this far before the previous one: an object Stripe created just
# before that listing may have become visible only after it.
OVERLAP_SECONDS = DAY
# An account's first run also reports transfers this old that match nothing.
FIRST_LOOKBACK_SECONDS = 35 * DAY
# A paid payout can still turn `failed` (Stripe: within 5 business days): payouts created
# this recently are listed on every run of the account, whatever its window.
PAYOUT_FAILURE_WINDOW_SECONDS = 14 * DAY
# Sorts after every event id: a listing beats an event of the same second, and of two
# versions that tie, the later write wins (an event's own redelivery rewrites the same data).
API_VERSION_ID = "~api"

# Outcomes of a transaction; these are fine, the others are discrepancies. On manual payouts
# Stripe itemizes no payout: a transaction is done once its money is available on the account
# (`funds_available`), and until then `awaiting_funds`, never `awaiting_payout`.
FINE = ("paid_out", "awaiting_payout", "awaiting_transfer", "funds_available", "awaiting_funds")
# The outcomes that complete a `paid` transaction.
DONE = ("paid_out", "funds_available")
TRANSACTION_KINDS = ("missing_transfer", "amount_mismatch", "transfer_reversed", "payout_failed")
TRANSFER_KINDS = ("orphan_transfer", "transfer_not_reversed")
UNKNOWN_DESTINATION = "unknown_destination"
# Transactions a paid-out classification holds back from `completed`.
HELD_BY_DISPUTE = "held_by_dispute"


# --- the mirror ----------------------------------------------------------------------------

_UPSERT_TRANSFERS = text(
    """
    INSERT INTO marketplace_worker.connect_transfers AS t
        (id, destination, amount, amount_reversed, currency, destination_payment, source_transaction,
         transfer_group, marketplace_transaction_id, created, as_of, as_of_id)
    SELECT * FROM unnest(
        CAST(:id AS text[]), CAST(:destination AS text[]), CAST(:amount AS bigint[]),
        CAST(:amount_reversed AS bigint[]), CAST(:currency AS text[]), CAST(:destination_payment AS text[]),
        CAST(:source_transaction AS text[]), CAST(:transfer_group AS text[]),
        CAST(:marketplace_transaction_id AS text[]), CAST(:created AS bigint[]), CAST(:as_of AS bigint[]),
        CAST(:as_of_id AS text[]))
    ON CONFLICT (id) DO UPDATE SET
        destination = excluded.destination, amount = excluded.amount,
        amount_reversed = excluded.amount_reversed, currency = excluded.currency,
        destination_payment = excluded.destination_payment, source_transaction = excluded.source_transaction,
        transfer_group = excluded.transfer_group, marketplace_transaction_id = excluded.marketplace_transaction_id,
        created = excluded.created, as_of = excluded.as_of, as_of_id = excluded.as_of_id, updated_at = now(),
        -- Matched again when the keys it was matched by change.
        transaction_id = CASE
            WHEN (t.destination, t.marketplace_transaction_id, t.transfer_group, t.source_transaction)
                 IS NOT DISTINCT FROM (excluded.destination, excluded.marketplace_transaction_id,
                                       excluded.transfer_group, excluded.source_transaction)
            THEN t.transaction_id END
    WHERE (t.as_of, t.as_of_id COLLATE "C") <= (excluded.as_of, excluded.as_of_id COLLATE "C")
    """
)

# What the expanded source charge says, whichever snapshot wins: events never expand it, and an
# application fee's `amount_refunded` only grows.
_FILL_SOURCE_CHARGES = text(
    """
    UPDATE marketplace_worker.connect_transfers AS t
    SET source_payment_intent = coalesce(v.source_payment_intent, t.source_payment_intent),
        destination_charge = v.destination_charge,
        application_fee_id = v.application_fee_id,
        application_fee_amount = v.application_fee_amount,
        application_fee_refunded = greatest(v.application_fee_refunded, t.application_fee_refunded),
        fee_checked_reversed = coalesce(v.fee_checked_reversed, t.fee_checked_reversed),
        transaction_id = CASE WHEN t.source_payment_intent IS NULL AND v.source_payment_intent IS NOT NULL
                              THEN NULL ELSE t.transaction_id END,
        updated_at = now()
    FROM unnest(CAST(:id AS text[]), CAST(:source_payment_intent AS text[]), CAST(:destination_charge AS boolean[]),
                CAST(:application_fee_id AS text[]), CAST(:application_fee_amount AS bigint[]),
                CAST(:application_fee_refunded AS bigint[]), CAST(:fee_checked_reversed AS bigint[]))
         AS v(id, source_payment_intent, destination_charge, application_fee_id, application_fee_amount,
              application_fee_refunded, fee_checked_reversed)
    WHERE t.id = v.id AND v.destination_charge IS NOT NULL
    """
)

# Stripe's `amount_reversed` only grows: a snapshot showing more than the mirror holds is
# news even when it is not the newest (an event of the second of a listing, which loses the
# tie), and a transfer older than the listing window is not listed again to correct it.
_RAISE_REVERSED = text(
    """
    UPDATE marketplace_worker.connect_transfers AS t
    SET amount_reversed = v.amount_reversed, updated_at = now()
    FROM unnest(CAST(:id AS text[]), CAST(:amount_reversed AS bigint[])) AS v(id, amount_reversed)
    WHERE t.id = v.id AND t.amount_reversed < v.amount_reversed
    """
)

_UPSERT_PAYOUTS = text(
    """
    INSERT INTO marketplace_worker.connect_payouts AS p
        (id, account, amount, currency, status, automatic, reconciliation_status, arrival_date,
         failure_code, created, as_of, as_of_id, method)
    SELECT * FROM unnest(
        CAST(:id AS text[]), CAST(:account AS text[]), CAST(:amount AS bigint[]), CAST(:currency AS text[]),
        CAST(:status AS text[]), CAST(:automatic AS boolean[]), CAST(:reconciliation_status AS text[]),
        CAST(:arrival_date AS bigint[]), CAST(:failure_code AS text[]), CAST(:created AS bigint[]),
        CAST(:as_of AS bigint[]), CAST(:as_of_id AS text[]), CAST(:method AS text[]))
    ON CONFLICT (id) DO UPDATE SET
        account = excluded.account, amount = excluded.amount, currency = excluded.currency,
        status = excluded.status, automatic = excluded.automatic, method = excluded.method,
        reconciliation_status = excluded.reconciliation_status, arrival_date = excluded.arrival_date,
        failure_code = excluded.failure_code, created = excluded.created, as_of = excluded.as_of,
        as_of_id = excluded.as_of_id, updated_at = now()
    WHERE (p.as_of, p.as_of_id COLLATE "C") <= (excluded.as_of, excluded.as_of_id COLLATE "C")
    """
)

_INSERT_ITEMS = text(
    """
    INSERT INTO marketplace_worker.connect_payout_items (balance_transaction_id, account, payout_id, source, type, amount)
    SELECT * FROM unnest(CAST(:id AS text[]), CAST(:account AS text[]), CAST(:payout_id AS text[]),
                         CAST(:source AS text[]), CAST(:type AS text[]), CAST(:amount AS bigint[]))
    ON CONFLICT (balance_transaction_id) DO NOTHING
    """
)

_UPSERT_PAYMENTS = text(
    """
    INSERT INTO marketplace_worker.connect_payments (id, account, balance_transaction_id, amount, available_on, created)
    SELECT * FROM unnest(CAST(:id AS text[]), CAST(:account AS text[]), CAST(:balance_transaction_id AS text[]),
                         CAST(:amount AS bigint[]), CAST(:available_on AS bigint[]), CAST(:created AS bigint[]))
    ON CONFLICT (id) DO UPDATE SET available_on = excluded.available_on, amount = excluded.amount
    """
)

_ITEMS_LISTED = text(
    "UPDATE marketplace_worker.connect_payouts SET items_listed_at = now(), updated_at = now() "
    "WHERE id = ANY(CAST(:ids AS text[]))"
)

_MARK_DIRTY = text(
    """
    INSERT INTO marketplace_worker.connect_accounts (account, dirty_at)
    SELECT DISTINCT unnest(CAST(:accounts AS text[])), now()
    ON CONFLICT (account) DO UPDATE SET dirty_at = now(), updated_at = now()
    """
)


def _ref(value: Any) -> str | None:
    """An id field, whether Stripe sent the id or the expanded object."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _int(obj: dict[str, Any], name: str, default: int | None = None) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{obj.get('object', 'object')} {obj.get('id')} {name} is not an integer")
    return value


def _columns(rows: list[dict[str, Any]], names: Iterable[str]) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in names}


def transfer_row(obj: dict[str, Any], as_of: int, as_of_id: str) -> dict[str, Any]:
    transfer_id, destination = _ref(obj.get("id")), _ref(obj.get("destination"))
    if transfer_id is None or destination is None:
        raise InvalidPayload("transfer without an id or a destination")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    named = metadata.get("marketplace_transaction_id")
    amount_reversed = _int(obj, "amount_reversed", 0)
    return {
        "id": transfer_id, "destination": destination, "amount": _int(obj, "amount"),
        "amount_reversed": amount_reversed, "currency": str(obj.get("currency") or "").lower(),
        "destination_payment": _ref(obj.get("destination_payment")),
        "source_transaction": _ref(obj.get("source_transaction")),
        "transfer_group": obj.get("transfer_group") or None,
        "marketplace_transaction_id": str(named) if named not in (None, "") else None,
        "created": _int(obj, "created"), "as_of": as_of, "as_of_id": as_of_id,
        **_source_charge(obj.get("source_transaction"), destination, amount_reversed),
    }


_NO_SOURCE_CHARGE = {"source_payment_intent": None, "destination_charge": None, "application_fee_id": None,
                     "application_fee_amount": None, "application_fee_refunded": None, "fee_checked_reversed": None}


def _source_charge(charge: Any, destination: str, amount_reversed: int) -> dict[str, Any]:
    """The fund flow, from the transfer's source charge when the listing expanded it.

    A destination charge names the account in `transfer_data.destination`; its application fee
    is collected back from that account. Separate charges and transfers take no fee from the
    provider's transfer (the platform keeps its fee by transferring less)."""
    if not isinstance(charge, dict) or charge.get("object") != "charge":
        return dict(_NO_SOURCE_CHARGE)
    transfer_data = charge.get("transfer_data") if isinstance(charge.get("transfer_data"), dict) else {}
    row = {**_NO_SOURCE_CHARGE, "source_payment_intent": _ref(charge.get("payment_intent")),
           "destination_charge": _ref(transfer_data.get("destination")) == destination}
    if not row["destination_charge"]:
        return row
    fee = charge.get("application_fee")
    if isinstance(fee, dict):
        row |= {"application_fee_id": _ref(fee.get("id")), "application_fee_amount": _int(fee, "amount"),
                "application_fee_refunded": _int(fee, "amount_refunded", 0),
                "fee_checked_reversed": amount_reversed}
    else:
        # Not expanded: the fee as charged; its refunds are read before they can matter.
        amount = charge.get("application_fee_amount")
        row |= {"application_fee_id": _ref(fee),
                "application_fee_amount": amount if isinstance(amount, int) and not isinstance(amount, bool) else 0,
                "application_fee_refunded": 0}
    return row


def payout_row(account: str, obj: dict[str, Any], as_of: int, as_of_id: str) -> dict[str, Any]:
    payout_id = _ref(obj.get("id"))
    if payout_id is None or not isinstance(obj.get("status"), str):
        raise InvalidPayload("payout without an id or a status")
    return {
        "id": payout_id, "account": account, "amount": _int(obj, "amount"),
        "currency": str(obj.get("currency") or "").lower(), "status": obj["status"],
        "automatic": bool(obj.get("automatic", True)), "reconciliation_status": obj.get("reconciliation_status"),
        "arrival_date": obj.get("arrival_date") if isinstance(obj.get("arrival_date"), int) else None,
        "failure_code": obj.get("failure_code"), "created": _int(obj, "created"), "as_of": as_of,
        "as_of_id": as_of_id, "method": obj.get("method") if isinstance(obj.get("method"), str) else None,
    }


_TRANSFER_COLUMNS = ("id", "destination", "amount", "amount_reversed", "currency", "destination_payment",
                     "source_transaction", "transfer_group", "marketplace_transaction_id", "created", "as_of",
                     "as_of_id")


def store_transfers(session: Session, rows: list[dict[str, Any]]) -> None:
    """Store transfer snapshots: the newest wins, and a reversal once seen stays."""
    if not rows:
        return
    rows = list({row["id"]: row for row in rows}.values())
    session.execute(_UPSERT_TRANSFERS, _columns(rows, _TRANSFER_COLUMNS))
    session.execute(_RAISE_REVERSED, _columns(rows, ("id", "amount_reversed")))
    expanded = [row for row in rows if row.get("destination_charge") is not None]
    if expanded:
        session.execute(_FILL_SOURCE_CHARGES, _columns(expanded, ("id", *_NO_SOURCE_CHARGE)))


def record_transfers(session: Session, rows: list[dict[str, Any]]) -> None:
    """Store transfer snapshots from events and mark their destinations for reconciliation."""
    store_transfers(session, rows)
    mark_dirty(session, [row["destination"] for row in rows])


def store_payouts(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        rows = list({row["id"]: row for row in rows}.values())
        session.execute(_UPSERT_PAYOUTS, _columns(rows, rows[0].keys()))


def record_payouts(session: Session, rows: list[dict[str, Any]]) -> None:
    """Store payout snapshots from events and mark their accounts for reconciliation."""
    store_payouts(session, rows)
    mark_dirty(session, [row["account"] for row in rows])


def mark_dirty(session: Session, accounts: Iterable[str]) -> None:
    """The account has news: the next reconciliation pass takes it, whatever its other activity."""
    accounts = sorted(set(accounts))
    if accounts:
        session.execute(_MARK_DIRTY, {"accounts": accounts})


# --- reading Stripe ------------------------------------------------------------------------


class StripeReader:
    """Read-only listings for reconciliation, every page at `limit=100`; counts its requests.

    Each request goes through the client's shared rate limiter; the SDK retries network
    errors and 5xx itself (STRIPE_MAX_NETWORK_RETRIES), and a 429 is retried here with
    exponential backoff and jitter. Independent lists are read `concurrency` at a time:
    pages of one list follow each other (each needs the previous page's last id), so without
    this a run would wait out Stripe's latency once per page even when the rate cap allows more.
    """

    def __init__(self, client: stripe.StripeClient, retry_base_seconds: float = 0.5, concurrency: int = 4) -> None:
        self.client = client
        self.retry_base_seconds = retry_base_seconds
        self.concurrency = concurrency
        self.calls = 0
        self._lock = threading.Lock()
        # Long-lived threads: each keeps its HTTP connection to Stripe alive between runs.
        self._pool: ThreadPoolExecutor | None = None

    def _get(self, path: str, params: dict[str, Any], account: str | None) -> dict[str, Any]:
        # The raw response, not the SDK's objects: building StripeObjects for a page of 100
        # transfers with their charges expanded costs more CPU than the request's latency.
        # The same requestor: rate-limit bucket, network retries and errors are the SDK's.
        options = {"stripe_account": account} if account else {}

        def fetch():
            with self._lock:
                self.calls += 1
            return self.client.raw_request("get", path, **params, **options)

        data = with_rate_limit_retry(fetch, base=self.retry_base_seconds).data
        if not isinstance(data, dict):
            raise stripe.APIError(f"unexpected response to GET {path}")
        return data

    def list_all(self, resource: str, params: dict[str, Any], account: str | None = None) -> list[dict[str, Any]]:
        params = {**params, "limit": 100}
        items: list[dict[str, Any]] = []
        while True:
            page = self._get(f"/v1/{resource}", params, account)
            data = page.get("data") or []
            items.extend(data)
            if not page.get("has_more") or not data:
                return items
            params = {**params, "starting_after": data[-1]["id"]}

    def retrieve(self, resource: str, id: str, account: str | None = None) -> dict[str, Any]:
        return self._get(f"/v1/{resource}/{id}", {}, account)

    def map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """`fn` over independent items (each making its own requests), `concurrency` at a time;
        results in the order of `items`."""
        if len(items) <= 1 or self.concurrency <= 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="stripe-read")
        futures = [self._pool.submit(fn, item) for item in items]
        wait(futures)  # when one fails, the others still finish before the run gives up
        return [future.result() for future in futures]


@dataclass
class Listing:
    transfers: list[dict[str, Any]] = field(default_factory=list)
    payouts: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    itemized: list[str] = field(default_factory=list)
    payments: list[dict[str, Any]] = field(default_factory=list)
    fees: list[dict[str, Any]] = field(default_factory=list)  # (transfer id, the application fee read)


# The source charge (and its application fee) ride along with each transfer: the fund flow and
# the fee collected back cost no request of their own.
TRANSFER_EXPAND = ["data.source_transaction.application_fee"]


def list_transfers_and_payouts(reader: StripeReader, account: str, plan: Plan, now: int) -> Listing:
    transfers, payouts = reader.map(lambda spec: reader.list_all(*spec), [
        ("transfers", {"destination": account, "created": {"gte": plan.since}, "expand": TRANSFER_EXPAND}, None),
        ("payouts", {"created": {"gte": plan.payouts_since}}, account),
    ])
    return Listing(
        transfers=[transfer_row(obj, now, API_VERSION_ID) for obj in transfers],
        payouts=[payout_row(account, obj, now, API_VERSION_ID) for obj in payouts],
    )


def _read_after_store(reader: StripeReader, account: str, payout_ids: list[str], payments_since: int | None,
                      fees: list[tuple[str, str, int]]) -> Listing:
    """The reads the stored listing calls for, independent of each other: the balance transactions
    of finished automatic payouts; on manual payouts, the account's `payment` balance
    transactions since `payments_since`; application fees a reversal may have refunded."""
    def balance_transactions(payout_id: str) -> list[dict[str, Any]]:
        try:
            return reader.list_all("balance_transactions", {"payout": payout_id}, account)
        except stripe.InvalidRequestError as error:
            # A payout Stripe will not itemize: asking again would not tell more.
            log.warning("balance transactions of payout %s not listable: %s", payout_id, error.user_message,
                        extra={"account": account, "payout_id": payout_id})
            return []

    payout_ids = sorted(payout_ids)
    jobs: list[Callable[[], Any]] = [lambda p=p: balance_transactions(p) for p in payout_ids]
    if payments_since is not None:
        jobs.append(lambda: reader.list_all(
            "balance_transactions", {"type": "payment", "created": {"gte": payments_since}}, account))
    jobs += [lambda f=fee_id: reader.retrieve("application_fees", f) for _, fee_id, _ in fees]
    done = reader.map(lambda job: job(), jobs)
    listing = Listing(itemized=payout_ids)
    for payout_id, bts in zip(payout_ids, done):
        listing.items += [
            {"id": bt["id"], "account": account, "payout_id": payout_id, "source": _ref(bt.get("source")),
             "type": str(bt.get("type") or ""), "amount": _int(bt, "amount")}
            for bt in bts
        ]
    rest = done[len(payout_ids):]
    if payments_since is not None:
        listing.payments = [
            {"id": _ref(bt.get("source")), "account": account, "balance_transaction_id": bt["id"],
             "amount": _int(bt, "amount"), "available_on": _int(bt, "available_on"), "created": _int(bt, "created")}
            for bt in rest.pop(0) if bt.get("type") == "payment" and _ref(bt.get("source"))
        ]
    listing.fees = [{"transfer_id": transfer_id, "fee": fee, "reversed_then": reversed_then}
                    for (transfer_id, _, reversed_then), fee in zip(fees, rest)]
    return listing


_FEE_READ = text(
    """
    UPDATE marketplace_worker.connect_transfers
    SET application_fee_amount = :amount,
        application_fee_refunded = greatest(:refunded, application_fee_refunded),
        fee_checked_reversed = :reversed_then, updated_at = now()
    WHERE id = :id
    """
)


def store(session: Session, listing: Listing) -> None:
    store_transfers(session, listing.transfers)
    store_payouts(session, listing.payouts)
    if listing.items:
        session.execute(_INSERT_ITEMS, _columns(listing.items, ("id", "account", "payout_id", "source", "type",
                                                                 "amount")))
    if listing.itemized:
        session.execute(_ITEMS_LISTED, {"ids": listing.itemized})
    if listing.payments:
        rows = list({row["id"]: row for row in listing.payments}.values())
        session.execute(_UPSERT_PAYMENTS, _columns(rows, rows[0].keys()))
    for read in listing.fees:
        fee = read["fee"]
        session.execute(_FEE_READ, {"id": read["transfer_id"], "amount": _int(fee, "amount"),
                                    "refunded": _int(fee, "amount_refunded", 0),
                                    "reversed_then": read["reversed_then"]})


# Stripe maps balance transactions to automatic payouts only, and a paid one's are complete
# once its reconciliation_status is `completed`.
_PAYOUTS_TO_ITEMIZE = text(
    """
    SELECT id FROM marketplace_worker.connect_payouts
    WHERE account = :account AND items_listed_at IS NULL AND automatic
      AND (status IN ('failed', 'canceled')
           OR (status = 'paid' AND coalesce(reconciliation_status, 'completed') = 'completed'))
    """
)


def payouts_to_itemize(session: Session, account: str) -> list[str]:
    """Finished automatic payouts, as the mirror now holds them, whose contents are not stored."""
    return list(session.execute(_PAYOUTS_TO_ITEMIZE, {"account": account}).scalars())


# --- payout mode, and what else a run must read ------------------------------------------

# The newest standard payout tells the schedule: instant payouts are never automatic.
_NEWEST_STANDARD_PAYOUT = text(
    """
    SELECT automatic FROM marketplace_worker.connect_payouts
    WHERE account = :account AND coalesce(method, 'standard') <> 'instant'
    ORDER BY created DESC, id DESC LIMIT 1
    """
)
# An account's schedule read from the API is trusted this long.
PAYOUT_INTERVAL_TTL = timedelta(days=1)


def payout_mode(session: Session, account: str) -> str:
    """"automatic", "manual", or "unknown": from the newest standard payout, else the schedule
    last read from the account."""
    automatic = session.execute(_NEWEST_STANDARD_PAYOUT, {"account": account}).scalar()
    if automatic is not None:
        return "automatic" if automatic else "manual"
    state = session.get(ConnectAccount, account)
    if state is None or state.payout_interval is None:
        return "unknown"
    return "manual" if state.payout_interval == "manual" else "automatic"


def _schedule_read_due(session: Session, account: str, provider_id: int, now: datetime) -> bool:
    """Whether to read the account's payout schedule: its payouts do not tell, a transaction
    waits for one, and the last read (if any) is stale."""
    state = session.get(ConnectAccount, account)
    if state is not None and state.payout_interval_read_at is not None \
            and state.payout_interval_read_at > now - PAYOUT_INTERVAL_TTL:
        return False
    return session.execute(
        text("SELECT EXISTS (SELECT 1 FROM marketplace.transactions t "
             "JOIN marketplace_worker.connect_transfers tr ON tr.transaction_id = t.id "
             "WHERE t.\"providerId\" = :provider AND t.status = :paid AND tr.destination = :account)"),
        {"provider": provider_id, "paid": lifecycle.PAID, "account": account},
    ).scalar_one()


def _store_schedule(session: Session, account: str, obj: dict[str, Any]) -> None:
    settings = obj.get("settings") if isinstance(obj.get("settings"), dict) else {}
    schedule = ((settings.get("payouts") or {}).get("schedule") or {}) if isinstance(settings, dict) else {}
    interval = schedule.get("interval") if isinstance(schedule, dict) else None
    session.execute(
        text(
            """
            INSERT INTO marketplace_worker.connect_accounts AS a (account, payout_interval, payout_interval_read_at)
            VALUES (:account, :interval, now())
            ON CONFLICT (account) DO UPDATE SET payout_interval = excluded.payout_interval,
                payout_interval_read_at = now(), updated_at = now()
            """
        ),
        {"account": account, "interval": interval if isinstance(interval, str) else None},
    )


def _payments_since(session: Session, account: str, provider_id: int) -> int | None:
    """On manual payouts: list the account's `payment` balance transactions from the oldest
    transfer of a paid transaction whose payment is not stored yet (a transfer's payment is
    created with it); None when every such payment is stored."""
    oldest = session.execute(
        text(
            """
            SELECT min(tr.created) FROM marketplace.transactions t
            JOIN marketplace_worker.connect_transfers tr ON tr.transaction_id = t.id
            WHERE t."providerId" = :provider AND t.status = :paid AND tr.destination = :account
              AND tr.amount > tr.amount_reversed
              AND NOT EXISTS (SELECT 1 FROM marketplace_worker.connect_payments cp WHERE cp.id = tr.destination_payment)
            """
        ),
        {"provider": provider_id, "paid": lifecycle.PAID, "account": account},
    ).scalar()
    return oldest


def _fees_to_read(session: Session, account: str, changed_since: datetime) -> list[tuple[str, str, int]]:
    """Destination charges reversed since their application fee was last read: the refund that
    reversed them may have refunded part of the fee (`refund_application_fee`)."""
    return [tuple(row) for row in session.execute(
        text(
            """
            SELECT id, application_fee_id, amount_reversed FROM marketplace_worker.connect_transfers
            WHERE destination = :account AND updated_at >= :changed_since AND destination_charge
              AND application_fee_id IS NOT NULL AND amount_reversed > 0
              AND fee_checked_reversed IS DISTINCT FROM amount_reversed
            ORDER BY id
            """
        ),
        {"account": account, "changed_since": changed_since},
    )]


# --- planning a run ------------------------------------------------------------------------


@dataclass
class Plan:
    since: int  # transfers (and payouts) created at or after this are listed
    payouts_since: int
    covers_default_window: bool  # whether the listing may advance `listed_until`


def _provider_of(session: Session, account: str) -> int | None:
    return session.execute(
        select(Provider.id).where(
            Provider.stripeConnectAccountId == account, Provider.paymentMode == "stripe_connect"
        )
    ).scalar_one_or_none()


def _unix(naive_utc: datetime) -> int:
    return int(naive_utc.replace(tzinfo=UTC).timestamp())


def plan_run(session: Session, account: str, provider_id: int, since: int | None, now: int) -> Plan:
    """The listing window: from the previous listing (less an overlap), or on the first run
    from the oldest transaction still waiting for its payout (at least FIRST_LOOKBACK_SECONDS)."""
    state = session.get(ConnectAccount, account)
    if state is not None and state.listed_until is not None:
        default_since = state.listed_until - OVERLAP_SECONDS
    else:
        oldest_paid = session.execute(
            text('SELECT min(coalesce("paidAt", "createdAt")) FROM marketplace.transactions '
                 'WHERE "providerId" = :provider AND status = :paid'),
            {"provider": provider_id, "paid": lifecycle.PAID},
        ).scalar()
        default_since = min(_unix(oldest_paid) if oldest_paid else now, now - FIRST_LOOKBACK_SECONDS) - OVERLAP_SECONDS
    chosen = default_since if since is None else since
    # A payout still on its way changes status without a new `created`: list back to it.
    oldest_unsettled = session.execute(
        text("SELECT min(created) FROM marketplace_worker.connect_payouts "
             "WHERE account = :account AND status IN ('pending', 'in_transit')"),
        {"account": account},
    ).scalar()
    payouts_since = min(chosen, now - PAYOUT_FAILURE_WINDOW_SECONDS)
    if oldest_unsettled is not None:
        payouts_since = min(payouts_since, oldest_unsettled)
    return Plan(since=chosen, payouts_since=payouts_since, covers_default_window=chosen <= default_since)


# --- classification ------------------------------------------------------------------------

# The transaction each transfer to the account belongs to, among the provider's transactions:
# by metadata.marketplace_transaction_id, else transfer_group `mtx_<id>`, else the invoice's
# charge (or its PaymentIntent) as source_transaction. A transfer that names a transaction by
# metadata or group is held to that name: it never falls back to a weaker key. The match is
# stored on the transfer, so a run matches only transfers that are new, changed their keys, or
# matched nothing before (an invoice may be linked to its charge after its transfer arrived).
# By charge, the worker's own key (`invoice_transactions`) leads from the invoice (unique on its
# charge and PaymentIntent) to the transaction; transactions the worker has not keyed yet are
# found through the app's ("tenantId", "invoiceId") index (or, without a tenant, among the
# provider's own).
_MATCH_NEW = text(
    """
    WITH keyed AS (
        SELECT tr.id, tr.source_transaction, tr.source_payment_intent,
               CASE WHEN tr.marketplace_transaction_id ~ '^[0-9]{1,18}$'
                        THEN CAST(tr.marketplace_transaction_id AS bigint)
                    WHEN tr.marketplace_transaction_id IS NULL AND tr.transfer_group ~ '^mtx_[0-9]{1,18}$'
                        THEN CAST(substr(tr.transfer_group, 5) AS bigint)
               END AS named_id,
               tr.marketplace_transaction_id IS NULL
                   AND (tr.transfer_group IS NULL OR tr.transfer_group !~ '^mtx_') AS by_charge
        FROM marketplace_worker.connect_transfers tr
        WHERE tr.destination = :account AND tr.transaction_id IS NULL
    ),
    invoices AS (
        SELECT k.id AS transfer_id, i.id AS invoice_id, i."tenantId" AS tenant_id
        FROM keyed k JOIN public."Invoice" i ON i."stripeChargeId" = k.source_transaction
        WHERE k.by_charge
        UNION
        SELECT k.id, i.id, i."tenantId"
        FROM keyed k JOIN public."Invoice" i ON i."stripePaymentIntentId" = k.source_payment_intent
        WHERE k.by_charge
    ),
    found AS (
        SELECT k.id, coalesce(
            (SELECT t.id FROM marketplace.transactions t WHERE t.id = k.named_id AND t."providerId" = :provider),
            (SELECT t.id FROM invoices v
               JOIN marketplace_worker.invoice_transactions it ON it.invoice_id = v.invoice_id
               JOIN marketplace.transactions t ON t.id = it.transaction_id
             WHERE v.transfer_id = k.id AND t."providerId" = :provider
             ORDER BY t.id LIMIT 1),
            (SELECT t.id FROM invoices v
               JOIN marketplace.transactions t ON t."tenantId" = v.tenant_id AND t."invoiceId" = v.invoice_id
             WHERE v.transfer_id = k.id AND t."providerId" = :provider
             ORDER BY t.id LIMIT 1),
            -- No tenant: among the provider's own transactions.
            (SELECT t.id FROM invoices v
               JOIN marketplace.transactions t ON t."providerId" = :provider AND t."invoiceId" = v.invoice_id
             WHERE v.transfer_id = k.id AND v.tenant_id IS NULL AND t."tenantId" IS NULL
             ORDER BY t.id LIMIT 1)
        ) AS transaction_id
        FROM keyed k
    )
    UPDATE marketplace_worker.connect_transfers tr
    SET transaction_id = f.transaction_id
    FROM found f
    WHERE tr.id = f.id AND f.transaction_id IS NOT NULL
    RETURNING tr.id
    """
)


def match_transfers(session: Session, account: str, provider_id: int) -> int:
    """Match the account's unmatched transfers to the provider's transactions; returns how many matched."""
    return len(session.execute(_MATCH_NEW, {"account": account, "provider": provider_id}).all())


# The provider's expected net: `providerPayoutCents` less its share of what was refunded (lost
# disputes included), rounded half up; Stripe rounds each proportional reversal (and fee refund)
# on its own, so the net may differ from it by a cent per refund.
_CLASSIFY = text(
    """
    WITH RECURSIVE scope AS (
        SELECT t.id, t.status, coalesce(t."paidAt", t."createdAt") AS paid_at,
               coalesce(t."providerPayoutCents", t."totalCents" - t."platformFeeCents") AS payout_cents,
               t."totalCents" AS total_cents, coalesce(r.refunded_cents, 0) AS refunded,
               lower(i.currency) AS currency, i."stripeChargeId" AS charge_id,
               i."stripePaymentIntentId" AS payment_intent_id
        FROM marketplace.transactions t
        JOIN public."Invoice" i ON i.id = t."invoiceId"
        LEFT JOIN marketplace_worker.transaction_refunds r ON r.transaction_id = t.id
        WHERE t."providerId" = :provider
          AND (t.status = :paid
               -- Completed ones while their payout may still fail, while a discrepancy is
               -- open, and when their transfer changed (a reversal, at any time).
               OR (t.status = :completed
                   AND (t."completedAt" >= :completed_since
                        OR t.id IN (SELECT d.transaction_id FROM marketplace_worker.reconcile_discrepancies d
                                    WHERE d.account = :account AND d.resolved_at IS NULL
                                      AND d.transaction_id IS NOT NULL)
                        OR t.id IN (SELECT tr.transaction_id FROM marketplace_worker.connect_transfers tr
                                    WHERE tr.destination = :account AND tr.updated_at >= :changed_since
                                      AND tr.amount_reversed > 0))))
    ),
    expected AS (
        SELECT s.*,
               s.payout_cents - CASE WHEN s.refunded > 0 AND s.total_cents > 0
                                     THEN (2 * s.refunded * s.payout_cents + s.total_cents) / (2 * s.total_cents)
                                     ELSE 0 END AS expected,
               CASE WHEN s.refunded = 0 THEN 0 ELSE greatest(1, (
                   SELECT count(*) FROM marketplace_worker.stripe_refunds x
                   WHERE (x.charge_id = s.charge_id OR x.payment_intent_id = s.payment_intent_id)
                     AND x.status IN ('succeeded', 'pending')) + (
                   SELECT count(*) FROM marketplace_worker.stripe_disputes x
                   WHERE (x.charge_id = s.charge_id OR x.payment_intent_id = s.payment_intent_id)
                     AND x.status = 'lost')) END AS tolerance,
               EXISTS (
                   SELECT 1 FROM marketplace_worker.stripe_disputes d
                   WHERE (d.charge_id = s.charge_id OR d.payment_intent_id = s.payment_intent_id)
                     AND d.status NOT IN :settled
               ) AS disputed
        FROM scope s
    ),
    xfer AS (
        SELECT tr.*,
               CASE WHEN tr.destination_charge
                    THEN coalesce(tr.application_fee_amount, 0) - coalesce(tr.application_fee_refunded, 0)
                    ELSE 0 END AS fee
        FROM scope s JOIN marketplace_worker.connect_transfers tr ON tr.transaction_id = s.id
        WHERE tr.destination = :account
    ),
    -- The payouts each transfer's money left the account in: the one carrying its `py_...`
    -- payment, then, while that one failed or was canceled, the one carrying its return.
    chain AS (
        SELECT x.id AS transfer_id, it.payout_id, 0 AS depth
        FROM xfer x
        JOIN marketplace_worker.connect_payout_items it
          ON it.account = :account AND it.source = x.destination_payment
        UNION ALL
        SELECT c.transfer_id, it.payout_id, c.depth + 1
        FROM chain c
        JOIN marketplace_worker.connect_payouts p ON p.id = c.payout_id AND p.status IN ('failed', 'canceled')
        JOIN marketplace_worker.connect_payout_items it
          ON it.account = :account AND it.source = c.payout_id AND it.type IN ('payout_failure', 'payout_cancel')
        WHERE c.depth < 12
    ),
    settled AS (
        SELECT DISTINCT ON (c.transfer_id) c.transfer_id, p.id AS payout_id, p.status, p.arrival_date,
               p.failure_code
        FROM chain c JOIN marketplace_worker.connect_payouts p ON p.id = c.payout_id
        ORDER BY c.transfer_id, c.depth DESC
    ),
    per_transaction AS (
        SELECT x.transaction_id,
               CAST(sum(x.amount) AS bigint) AS gross,
               CAST(sum(x.amount_reversed) AS bigint) AS reversed,
               CAST(sum(x.fee) AS bigint) AS fee,
               bool_or(x.currency <> e.currency) AS other_currency,
               array_agg(x.id ORDER BY x.created, x.id) AS transfer_ids,
               -- Fully reversed transfers carry no money to pay out.
               bool_and(coalesce(st.status = 'paid', false)) FILTER (WHERE x.amount_reversed < x.amount) AS all_paid,
               bool_or(st.status IN ('failed', 'canceled')) FILTER (WHERE x.amount_reversed < x.amount) AS any_failed,
               max(st.arrival_date) FILTER (WHERE st.status = 'paid') AS arrival_date,
               max(st.payout_id) FILTER (WHERE st.status IN ('failed', 'canceled')) AS failed_payout,
               max(st.failure_code) FILTER (WHERE st.status IN ('failed', 'canceled')) AS failure_code,
               max(st.payout_id) FILTER (WHERE st.status = 'paid') AS paid_payout,
               bool_and(coalesce(cp.available_on <= :now_unix, false))
                   FILTER (WHERE x.amount_reversed < x.amount) AS all_available,
               max(cp.available_on) AS available_on
        FROM xfer x
        JOIN expected e ON e.id = x.transaction_id
        LEFT JOIN settled st ON st.transfer_id = x.id
        LEFT JOIN marketplace_worker.connect_payments cp ON CAST(:manual AS boolean) AND cp.id = x.destination_payment
        GROUP BY x.transaction_id
    ),
    netted AS (
        SELECT e.*, p.transaction_id AS matched, p.transfer_ids, p.other_currency, p.all_paid, p.any_failed,
               p.failed_payout, p.failure_code, p.paid_payout, p.all_available,
               coalesce(p.gross - p.reversed - p.fee, 0) AS net, coalesce(p.reversed, 0) AS reversed,
               coalesce(p.fee, 0) AS fee,
               CASE WHEN p.all_paid THEN p.arrival_date ELSE p.available_on END AS arrival_date
        FROM expected e LEFT JOIN per_transaction p ON p.transaction_id = e.id
    )
    SELECT n.id, n.status, n.paid_at, n.expected, n.currency, n.disputed, n.net, n.reversed, n.fee, n.refunded,
           n.transfer_ids, n.arrival_date, n.failed_payout, n.failure_code, n.paid_payout,
           CASE
               WHEN n.matched IS NULL THEN
                   CASE WHEN n.paid_at < :grace_cutoff THEN 'missing_transfer' ELSE 'awaiting_transfer' END
               WHEN n.other_currency THEN 'amount_mismatch'
               WHEN n.net < n.expected - n.tolerance AND n.reversed > 0 THEN 'transfer_reversed'
               WHEN abs(n.net - n.expected) > n.tolerance THEN 'amount_mismatch'
               WHEN n.any_failed THEN 'payout_failed'
               WHEN n.all_paid THEN 'paid_out'
               WHEN CAST(:manual AS boolean) AND n.all_available THEN 'funds_available'
               WHEN CAST(:manual AS boolean) THEN 'awaiting_funds'
               ELSE 'awaiting_payout'
           END AS kind
    FROM netted n
    ORDER BY n.id
    """
).bindparams(bindparam("settled", expanding=True))

# Transfers wrong in themselves: matching no transaction of the provider, or leaving money
# with the provider for a transaction that was refunded or cancelled.
_TRANSFER_FINDINGS = text(
    """
    SELECT tr.id, tr.amount, tr.amount_reversed, tr.currency, tr.marketplace_transaction_id, tr.transfer_group,
           tr.transaction_id, NULL AS status
    FROM marketplace_worker.connect_transfers tr
    WHERE tr.destination = :account AND tr.transaction_id IS NULL
    UNION ALL
    SELECT tr.id, tr.amount, tr.amount_reversed, tr.currency, tr.marketplace_transaction_id, tr.transfer_group,
           tr.transaction_id, t.status
    FROM marketplace.transactions t
    JOIN marketplace_worker.connect_transfers tr ON tr.transaction_id = t.id
    WHERE t."providerId" = :provider AND t.status IN (:refunded, :cancelled)
      AND tr.destination = :account AND tr.amount > tr.amount_reversed
    ORDER BY 1
    """
)

# Completion as everywhere else (domain/completion.py): only `paid` moves, and a row an
# event handler holds is skipped, to be completed by the next run.
_COMPLETE = text(
    """
    WITH due AS (
        SELECT t.id, d.completed_at
        FROM marketplace.transactions t
        JOIN unnest(CAST(:ids AS bigint[]), CAST(:completed_at AS timestamp[])) AS d(id, completed_at)
          ON d.id = t.id
        WHERE t.status = :paid
        ORDER BY t.id
        FOR UPDATE OF t SKIP LOCKED
    )
    UPDATE marketplace.transactions t
    SET status = :completed, "completedAt" = coalesce(t."completedAt", due.completed_at)
    FROM due
    WHERE t.id = due.id AND t.status = :paid
    RETURNING t.id, t."providerId"
    """
)

_UPSERT_DISCREPANCIES = text(
    """
    INSERT INTO marketplace_worker.reconcile_discrepancies AS d
        (kind, subject, account, transaction_id, expected_cents, seen_cents, currency, transfer_ids,
         payout_id, detail, first_seen_at, last_seen_at)
    SELECT f.kind, f.subject, f.account, f.transaction_id, f.expected_cents, f.seen_cents, f.currency,
           CASE WHEN f.transfer_ids = '' THEN NULL ELSE string_to_array(f.transfer_ids, ',') END,
           f.payout_id, f.detail, now(), now()
    FROM unnest(
        CAST(:kind AS text[]), CAST(:subject AS text[]), CAST(:account AS text[]),
        CAST(:transaction_id AS bigint[]), CAST(:expected_cents AS bigint[]), CAST(:seen_cents AS bigint[]),
        CAST(:currency AS text[]), CAST(:transfer_ids AS text[]), CAST(:payout_id AS text[]),
        CAST(:detail AS text[])
    ) AS f(kind, subject, account, transaction_id, expected_cents, seen_cents, currency, transfer_ids,
           payout_id, detail)
    ON CONFLICT (kind, subject) DO UPDATE SET
        account = excluded.account, transaction_id = excluded.transaction_id,
        expected_cents = excluded.expected_cents, seen_cents = excluded.seen_cents,
        currency = excluded.currency, transfer_ids = excluded.transfer_ids, payout_id = excluded.payout_id,
        detail = excluded.detail, last_seen_at = now(), resolved_at = NULL,
        -- Back after it was resolved: a new occurrence.
        first_seen_at = CASE WHEN d.resolved_at IS NULL THEN d.first_seen_at ELSE now() END
    RETURNING d.first_seen_at = now() AS opened
    """
)

# Open discrepancies of these kinds on the account that this run did not see again are fixed.
_RESOLVE = text(
    """
    UPDATE marketplace_worker.reconcile_discrepancies d
    SET resolved_at = now()
    WHERE d.resolved_at IS NULL AND d.kind = ANY(CAST(:kinds AS text[]))
      AND (CAST(:account AS text) IS NULL OR d.account = :account)
      AND (d.kind, d.subject) NOT IN (
          SELECT * FROM unnest(CAST(:seen_kind AS text[]), CAST(:seen_subject AS text[])))
    RETURNING d.id
    """
)


@dataclass
class Finding:
    kind: str
    subject: str
    account: str
    detail: str
    transaction_id: int | None = None
    expected_cents: int | None = None
    seen_cents: int | None = None
    currency: str | None = None
    transfer_ids: list[str] = field(default_factory=list)
    payout_id: str | None = None


@dataclass
class AccountResult:
    account: str
    skipped: str | None = None  # "busy" (another worker has it) | "no_provider"
    payouts: str = "automatic"  # "automatic" | "manual" | "unknown" (no standard payout yet, schedule unread)
    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)  # per transaction, and orphan transfers
    completed: list[int] = field(default_factory=list)
    opened: int = 0
    resolved: int = 0

    def describe(self) -> str:
        if self.skipped:
            return f"{self.account}: skipped ({self.skipped})"
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.outcomes.items())) or "nothing to reconcile"
        manual = " (manual payouts: completed when the funds are available)" if self.payouts == "manual" else ""
        return (f"{self.account}{manual}: {counts}; completed {len(self.completed)}, new discrepancies "
                f"{self.opened}, resolved {self.resolved}; {self.calls} Stripe call(s)")


def _transaction_finding(account: str, row: Any) -> Finding | None:
    if row.kind in FINE:
        return None
    finding = Finding(
        kind=row.kind, subject=str(row.id), account=account, detail="", transaction_id=row.id,
        expected_cents=row.expected, seen_cents=row.net, currency=row.currency,
        transfer_ids=list(row.transfer_ids or []),
    )
    if row.kind == "missing_transfer":
        finding.detail = f"paid {row.paid_at:%Y-%m-%d %H:%M} UTC, no transfer to {account} yet"
    elif row.kind == "amount_mismatch":
        finding.detail = f"transferred {row.net} cents net, expected {row.expected}" + (
            f" (after an application fee of {row.fee})" if row.fee else "") + (
            f" ({row.refunded} cents refunded)" if row.refunded else "")
    elif row.kind == "transfer_reversed":
        finding.detail = f"{row.reversed} cents reversed; {row.net} of {row.expected} cents left with the provider" + (
            f" ({row.refunded} cents refunded)" if row.refunded else "")
    else:
        finding.payout_id = row.failed_payout
        finding.detail = f"payout {row.failed_payout} {row.failure_code or 'failed or was canceled'}" + (
            "; the transaction was already completed" if row.status == lifecycle.COMPLETED else "")
    return finding


def _transfer_finding(account: str, provider_id: int, row: Any) -> Finding:
    finding = Finding(
        kind="orphan_transfer", subject=row.id, account=account, detail="",
        seen_cents=row.amount - row.amount_reversed, currency=row.currency, transfer_ids=[row.id],
    )
    if row.transaction_id is not None:
        finding.kind, finding.transaction_id, finding.expected_cents = "transfer_not_reversed", row.transaction_id, 0
        finding.detail = f"transaction {row.transaction_id} is {row.status}; the transfer was not reversed"
    elif row.marketplace_transaction_id or (row.transfer_group or "").startswith("mtx_"):
        named = row.marketplace_transaction_id or row.transfer_group
        finding.detail = f"transfer names {named}, which is not a transaction of provider {provider_id}"
    else:
        finding.detail = f"transfer matches no transaction of provider {provider_id}"
    return finding


def upsert_findings(session: Session, findings: list[Finding]) -> int:
    """Store what was seen; returns how many discrepancies are new (or reopened)."""
    if not findings:
        return 0
    rows = session.execute(_UPSERT_DISCREPANCIES, {
        "kind": [f.kind for f in findings], "subject": [f.subject for f in findings],
        "account": [f.account for f in findings], "transaction_id": [f.transaction_id for f in findings],
        "expected_cents": [f.expected_cents for f in findings], "seen_cents": [f.seen_cents for f in findings],
        "currency": [f.currency for f in findings], "transfer_ids": [",".join(f.transfer_ids) for f in findings],
        "payout_id": [f.payout_id for f in findings], "detail": [f.detail for f in findings],
    }).all()
    return sum(1 for row in rows if row.opened)


def resolve_unseen(session: Session, kinds: Iterable[str], account: str | None, seen: list[Finding]) -> int:
    return len(session.execute(_RESOLVE, {
        "kinds": list(kinds), "account": account,
        "seen_kind": [f.kind for f in seen], "seen_subject": [f.subject for f in seen],
    }).all())


def classify_and_apply(
    session: Session, account: str, provider_id: int, *, completed_since: int, grace: timedelta, now: datetime,
    payouts: str | None = None, changed_since: datetime | None = None, matched: bool = False,
) -> AccountResult:
    """Classify the account's transactions and transfers from the mirror, complete the paid-out
    transactions and bring its discrepancies up to date. Completed transactions are looked at
    again when completed after `completed_since` (unix seconds), or when one of their reversed
    transfers changed after `changed_since`. `payouts` is the account's payout mode (read from
    the mirror when not given); `matched` when the caller has just matched the transfers."""
    if not matched:
        match_transfers(session, account, provider_id)
    result = AccountResult(account, payouts=payouts or payout_mode(session, account))
    rows = session.execute(_CLASSIFY, {
        "account": account, "provider": provider_id, "completed_since": from_unix(completed_since),
        "grace_cutoff": now - grace, "now_unix": _unix(now) if now.tzinfo is None else int(now.timestamp()), "manual": result.payouts == "manual",
        "changed_since": changed_since or datetime(1970, 1, 1, tzinfo=UTC),
        "paid": lifecycle.PAID, "completed": lifecycle.COMPLETED, "settled": list(lifecycle.DISPUTE_SETTLED),
    }).all()
    findings: list[Finding] = []
    due: list[tuple[int, datetime]] = []
    for row in rows:
        kind = row.kind
        if kind in DONE and row.status == lifecycle.PAID:
            if row.disputed:
                kind = HELD_BY_DISPUTE
            else:
                due.append((row.id, from_unix(row.arrival_date) or now))
        result.outcomes[kind] += 1
        if (finding := _transaction_finding(account, row)) is not None:
            findings.append(finding)
    for row in session.execute(_TRANSFER_FINDINGS, {
        "account": account, "provider": provider_id, "refunded": lifecycle.REFUNDED, "cancelled": lifecycle.CANCELLED,
    }).all():
        finding = _transfer_finding(account, provider_id, row)
        findings.append(finding)
        result.outcomes[finding.kind] += 1
    if due:
        done = session.execute(_COMPLETE, {
            "ids": [i for i, _ in due], "completed_at": [at for _, at in due],
            "paid": lifecycle.PAID, "completed": lifecycle.COMPLETED,
        }).all()
        result.completed = sorted(row.id for row in done)
        touch_providers(session, [row.providerId for row in done])
    result.opened = upsert_findings(session, findings)
    result.resolved = resolve_unseen(session, (*TRANSACTION_KINDS, *TRANSFER_KINDS), account, findings)
    if result.payouts == "manual" and (result.outcomes["funds_available"] or result.outcomes["awaiting_funds"]):
        log.info("%s is on manual payouts: %d transaction(s) with their funds available, %d awaiting them",
                 account, result.outcomes["funds_available"], result.outcomes["awaiting_funds"],
                 extra={"account": account, "payouts": "manual"})
    elif result.payouts == "unknown" and result.outcomes["awaiting_payout"]:
        log.warning("%s has made no standard payout and its payout schedule is unknown: %d transaction(s) "
                    "awaiting a payout", account, result.outcomes["awaiting_payout"],
                    extra={"account": account, "payouts": "unknown"})
    return result


# --- runs ----------------------------------------------------------------------------------


def _lock_key(account: str) -> str:
    return f"marketplace_worker.reconcile:{account}"


def reconcile_account(
    session_factory: SessionFactory,
    engine: Engine,
    reader: StripeReader,
    account: str,
    *,
    grace: timedelta,
    since: int | None = None,
    now: int | None = None,
) -> AccountResult:
    """Reconcile one connected account (see the module docstring). Idempotent: a rerun with
    nothing new changes only `last_seen_at`."""
    now = int(time.time()) if now is None else now
    # The lock lives on its own autocommit connection: no transaction stays open while
    # Stripe answers, and the lock goes away with the connection if the worker dies.
    with engine.connect() as lock_conn:
        lock_conn = lock_conn.execution_options(isolation_level="AUTOCOMMIT")
        key = {"key": _lock_key(account)}
        if not lock_conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), key).scalar():
            return AccountResult(account, skipped="busy")
        try:
            with session_factory() as session:
                provider_id = _provider_of(session, account)
                if provider_id is None:
                    return AccountResult(account, skipped="no_provider")
                plan = plan_run(session, account, provider_id, since, now)
                # The database's clock, as the dirty marks carry it.
                started = session.execute(text("SELECT clock_timestamp()")).scalar_one()
                changed_since = _changed_since(session, account)
            calls_before = reader.calls
            listing = list_transfers_and_payouts(reader, account, plan, now)
            def what_to_read(session: Session, mode: str) -> tuple[list[str], int | None, list]:
                return (payouts_to_itemize(session, account),
                        _payments_since(session, account, provider_id) if mode == "manual" else None,
                        _fees_to_read(session, account, changed_since))

            with session_factory() as session:
                store(session, listing)
                match_transfers(session, account, provider_id)
                mode = payout_mode(session, account)
                read_schedule = mode == "unknown" and _schedule_read_due(session, account, provider_id,
                                                                         from_unix(now).replace(tzinfo=UTC))
                if not read_schedule:
                    to_read = what_to_read(session, mode)
            if read_schedule:
                try:
                    account_obj = reader.retrieve("accounts", account)
                except (stripe.InvalidRequestError, stripe.PermissionError) as error:
                    # Deauthorized or gone: the schedule stays unknown until the next read is due.
                    log.warning("payout schedule of %s not readable: %s", account, error.user_message,
                                extra={"account": account})
                    account_obj = {}
                with session_factory() as session:
                    _store_schedule(session, account, account_obj)
                    mode = payout_mode(session, account)
                    to_read = what_to_read(session, mode)
            reads = _read_after_store(reader, account, *to_read)
            with session_factory() as session:
                store(session, reads)
                result = classify_and_apply(session, account, provider_id, completed_since=plan.payouts_since,
                                            grace=grace, now=from_unix(now), payouts=mode,
                                            changed_since=changed_since, matched=True)
                _finish_state(session, account, now if plan.covers_default_window else None, started)
            result.calls = reader.calls - calls_before
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)
    log.info("reconciled %s", result.describe(), extra={"account": account})
    return result


def _changed_since(session: Session, account: str) -> datetime:
    """Transfers changed after this are looked at again: the previous run's start, less an
    overlap (a change committed while it ran). The first run looks at all."""
    state = session.get(ConnectAccount, account)
    if state is None or state.last_reconciled_at is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return state.last_reconciled_at - timedelta(seconds=OVERLAP_SECONDS)


def _finish_state(session: Session, account: str, listed_until: int | None, started: datetime) -> None:
    """Record how far the listing got, and clear the dirty mark unless an event came in after
    this run began (that event's account is then taken by the next pass)."""
    session.execute(
        text(
            """
            INSERT INTO marketplace_worker.connect_accounts AS a (account, listed_until, last_reconciled_at)
            VALUES (:account, :listed_until, now())
            ON CONFLICT (account) DO UPDATE SET
                listed_until = coalesce(excluded.listed_until, a.listed_until),
                last_reconciled_at = now(), updated_at = now(),
                dirty_at = CASE WHEN a.dirty_at <= :started THEN NULL ELSE a.dirty_at END
            """
        ),
        {"account": account, "listed_until": listed_until, "started": started},
    )


# --- the nightly pass -----------------------------------------------------------------------

_ACTIVE_ACCOUNTS = text(
    """
    SELECT p."stripeConnectAccountId" AS account
    FROM marketplace.providers p
    WHERE p."paymentMode" = 'stripe_connect' AND p."stripeConnectAccountId" IS NOT NULL
      AND (EXISTS (SELECT 1 FROM marketplace_worker.connect_accounts a
                   WHERE a.account = p."stripeConnectAccountId" AND a.dirty_at IS NOT NULL)
           OR EXISTS (SELECT 1 FROM marketplace.transactions t
                      WHERE t."providerId" = p.id AND t.status = :paid)
           OR EXISTS (SELECT 1 FROM marketplace_worker.reconcile_discrepancies d
                      WHERE d.account = p."stripeConnectAccountId" AND d.resolved_at IS NULL))
    ORDER BY 1
    """
)


def active_accounts(session: Session) -> list[str]:
    """Accounts with something to reconcile: news from events, paid transactions waiting for
    their payout, or open discrepancies to re-check."""
    return list(session.execute(_ACTIVE_ACCOUNTS, {"paid": lifecycle.PAID}).scalars())


_DIRTY_ACCOUNTS = text(
    """
    SELECT a.account FROM marketplace_worker.connect_accounts a
    WHERE a.dirty_at IS NOT NULL
      AND EXISTS (SELECT 1 FROM marketplace.providers p
                  WHERE p."stripeConnectAccountId" = a.account AND p."paymentMode" = 'stripe_connect')
    ORDER BY 1
    """
)


def dirty_accounts(session: Session) -> list[str]:
    """Accounts transfer or payout events named since their last reconciliation."""
    return list(session.execute(_DIRTY_ACCOUNTS).scalars())


_UNKNOWN_DESTINATIONS = text(
    """
    SELECT tr.id, tr.destination, tr.amount - tr.amount_reversed AS net, tr.currency
    FROM marketplace_worker.connect_transfers tr
    WHERE NOT EXISTS (SELECT 1 FROM marketplace.providers p
                      WHERE p."stripeConnectAccountId" = tr.destination AND p."paymentMode" = 'stripe_connect')
    ORDER BY tr.id
    """
)


def report_unknown_destinations(session: Session) -> tuple[int, int]:
    """Transfers the platform sent to accounts no `stripe_connect` provider has; returns
    (how many are open now, how many got resolved)."""
    findings = [
        Finding(kind=UNKNOWN_DESTINATION, subject=row.id, account=row.destination, seen_cents=row.net,
                currency=row.currency, transfer_ids=[row.id],
                detail=f"transfer to {row.destination}, which no stripe_connect provider has")
        for row in session.execute(_UNKNOWN_DESTINATIONS)
    ]
    upsert_findings(session, findings)
    return len(findings), resolve_unseen(session, (UNKNOWN_DESTINATION,), None, findings)


def open_discrepancies(session: Session, account: str | None = None) -> list[Any]:
    query = text(
        """
        SELECT kind, subject, account, transaction_id, expected_cents, seen_cents, currency, transfer_ids,
               payout_id, detail, first_seen_at, last_seen_at
        FROM marketplace_worker.reconcile_discrepancies
        WHERE resolved_at IS NULL AND (CAST(:account AS text) IS NULL OR account = :account)
        ORDER BY kind, first_seen_at, subject
        """
    )
    return list(session.execute(query, {"account": account}))
