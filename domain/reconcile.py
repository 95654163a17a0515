"""Stripe Connect: account sync, the transfer/payout mirror, and payouts reconciliation (SPEC §5).

For a `stripe_connect` provider, money reaches the provider in two hops: the platform's
transfer to the connected account (`tr_...`, which creates a `py_...` payment there), then
the account's payout to its bank (`po_...`). Reconciliation proves the second hop the way
Stripe documents it: the transfer's `destination_payment` appears as the `source` of a
balance transaction inside a **paid** automatic payout (`GET /v1/balance_transactions?payout=`
with `Stripe-Account`). A payout that failed or was canceled returns its money to the
account's balance; the `payout_failure` / `payout_cancel` balance transaction then rides in
a later payout, which is followed to see the money leave again.

One account's run:
  1. takes a per-account advisory lock (two workers on one account: one does the work);
  2. lists, read-only and `limit=100`, the platform's transfers to the account and the
     account's payouts created in the window, then the balance transactions of every
     finished automatic payout not listed before (a payout's contents never change);
  3. stores them in the mirror (`connect_transfers`, `connect_payouts`, `connect_payout_items`),
     which webhook events also feed, so each listing only needs the window since the last;
  4. classifies, in SQL, every paid transaction of the provider (and the completed ones
     whose payout may still fail, whose transfer was reversed, or with an open discrepancy),
     completes the paid-out ones (unless a dispute holds them), and upserts discrepancies:
     seen ones get `last_seen_at`, open ones no longer seen get `resolved_at`.

The run holds no database transaction open while it talks to Stripe.

What a transaction comes out as, from its transfers (their sum, net of reversals) and the
payouts that carried them: `paid_out` (then `completed`), `awaiting_payout`,
`awaiting_transfer` (paid less than RECONCILE_TRANSFER_GRACE_HOURS ago), or a discrepancy:
`missing_transfer`, `amount_mismatch` (net transferred is not `providerPayoutCents`, no
reversal), `transfer_reversed` (short of it after a reversal; a reversal that corrects an
over-transfer is fine), `payout_failed`. Transfers: `orphan_transfer` (no transaction of the
provider), `transfer_not_reversed` (money left with the provider for a refunded or cancelled
transaction), and, over all accounts, `unknown_destination` (no stripe_connect provider).
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

from domain import lifecycle, versions
from domain.clock import from_unix, utcnow
from domain.dispatch import InvalidPayload
from domain.stats_touch import touch_providers
from domain.stripe_api import with_rate_limit_retry
from domain.transactions import DISPUTE_SETTLED
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

# Outcomes of a transaction; the first three are fine, the others are discrepancies.
FINE = ("paid_out", "awaiting_payout", "awaiting_transfer")
TRANSACTION_KINDS = ("missing_transfer", "amount_mismatch", "transfer_reversed", "payout_failed")
TRANSFER_KINDS = ("orphan_transfer", "transfer_not_reversed")
UNKNOWN_DESTINATION = "unknown_destination"
# Transactions a paid-out classification holds back from `completed`.
HELD_BY_DISPUTE = "held_by_dispute"


# --- account sync --------------------------------------------------------------------------


def sync_account(
    session: Session, account: str, *, onboarding_complete: bool, payouts_enabled: bool, created: int, event_id: str
) -> str:
    """Keep the provider's Connect flags in step with the newest account event; returns what
    happened (for logs and tests)."""
    provider = session.execute(
        select(Provider).where(Provider.stripeConnectAccountId == account).with_for_update()
    ).scalar_one_or_none()
    if provider is None:
        log.warning("account event for %s, which no provider has; nothing changed", account,
                    extra={"account": account, "event_id": event_id})
        return "unknown_account"
    if not versions.advance(session, account, "account", created, event_id):
        return "stale"
    if (provider.stripeConnectOnboardingComplete, provider.stripeConnectPayoutsEnabled) == (
        onboarding_complete, payouts_enabled
    ):
        return "unchanged"
    provider.stripeConnectOnboardingComplete = onboarding_complete
    provider.stripeConnectPayoutsEnabled = payouts_enabled
    provider.updatedAt = utcnow()
    log.info("provider %s Connect flags: onboarding complete %s, payouts enabled %s", provider.id,
             onboarding_complete, payouts_enabled, extra={"account": account, "provider_id": provider.id})
    return "updated"


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
        created = excluded.created, as_of = excluded.as_of, as_of_id = excluded.as_of_id, updated_at = now()
    WHERE (t.as_of, t.as_of_id COLLATE "C") <= (excluded.as_of, excluded.as_of_id COLLATE "C")
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
         failure_code, created, as_of, as_of_id)
    SELECT * FROM unnest(
        CAST(:id AS text[]), CAST(:account AS text[]), CAST(:amount AS bigint[]), CAST(:currency AS text[]),
        CAST(:status AS text[]), CAST(:automatic AS boolean[]), CAST(:reconciliation_status AS text[]),
        CAST(:arrival_date AS bigint[]), CAST(:failure_code AS text[]), CAST(:created AS bigint[]),
        CAST(:as_of AS bigint[]), CAST(:as_of_id AS text[]))
    ON CONFLICT (id) DO UPDATE SET
        account = excluded.account, amount = excluded.amount, currency = excluded.currency,
        status = excluded.status, automatic = excluded.automatic,
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
    return {
        "id": transfer_id, "destination": destination, "amount": _int(obj, "amount"),
        "amount_reversed": _int(obj, "amount_reversed", 0), "currency": str(obj.get("currency") or "").lower(),
        "destination_payment": _ref(obj.get("destination_payment")),
        "source_transaction": _ref(obj.get("source_transaction")),
        "transfer_group": obj.get("transfer_group") or None,
        "marketplace_transaction_id": str(named) if named not in (None, "") else None,
        "created": _int(obj, "created"), "as_of": as_of, "as_of_id": as_of_id,
    }


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
        "as_of_id": as_of_id,
    }


def store_transfers(session: Session, rows: list[dict[str, Any]]) -> None:
    """Store transfer snapshots: the newest wins, and a reversal once seen stays."""
    if not rows:
        return
    rows = list({row["id"]: row for row in rows}.values())
    session.execute(_UPSERT_TRANSFERS, _columns(rows, rows[0].keys()))
    session.execute(_RAISE_REVERSED, _columns(rows, ("id", "amount_reversed")))


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

    def list_all(self, resource: str, params: dict[str, Any], account: str | None = None) -> list[dict[str, Any]]:
        service = getattr(self.client.v1, resource)
        options = {"stripe_account": account} if account else {}
        params = {**params, "limit": 100}
        items: list[dict[str, Any]] = []
        while True:
            def fetch(page_params: dict[str, Any] = params):
                with self._lock:
                    self.calls += 1
                return service.list(page_params, options)

            page = with_rate_limit_retry(fetch, base=self.retry_base_seconds)
            items.extend(obj.to_dict() for obj in page.data)
            if not page.has_more or not page.data:
                return items
            params = {**params, "starting_after": page.data[-1].id}

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


def list_transfers_and_payouts(reader: StripeReader, account: str, plan: Plan, now: int) -> Listing:
    transfers, payouts = reader.map(lambda spec: reader.list_all(*spec), [
        ("transfers", {"destination": account, "created": {"gte": plan.since}}, None),
        ("payouts", {"created": {"gte": plan.payouts_since}}, account),
    ])
    return Listing(
        transfers=[transfer_row(obj, now, API_VERSION_ID) for obj in transfers],
        payouts=[payout_row(account, obj, now, API_VERSION_ID) for obj in payouts],
    )


def list_payout_items(reader: StripeReader, account: str, payout_ids: list[str]) -> Listing:
    def balance_transactions(payout_id: str) -> list[dict[str, Any]]:
        try:
            return reader.list_all("balance_transactions", {"payout": payout_id}, account)
        except stripe.InvalidRequestError as error:
            # A payout Stripe will not itemize: asking again would not tell more.
            log.warning("balance transactions of payout %s not listable: %s", payout_id, error.user_message,
                        extra={"account": account, "payout_id": payout_id})
            return []

    payout_ids = sorted(payout_ids)
    listed = reader.map(balance_transactions, payout_ids)
    listing = Listing(itemized=payout_ids)
    for payout_id, bts in zip(payout_ids, listed):
        listing.items += [
            {"id": bt["id"], "account": account, "payout_id": payout_id, "source": _ref(bt.get("source")),
             "type": str(bt.get("type") or ""), "amount": _int(bt, "amount")}
            for bt in bts
        ]
    return listing


def store(session: Session, listing: Listing) -> None:
    store_transfers(session, listing.transfers)
    store_payouts(session, listing.payouts)
    if listing.items:
        session.execute(_INSERT_ITEMS, _columns(listing.items, ("id", "account", "payout_id", "source", "type",
                                                                 "amount")))
    if listing.itemized:
        session.execute(_ITEMS_LISTED, {"ids": listing.itemized})


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
# charge as source_transaction. A transfer that names a transaction by metadata or group is
# held to that name: it never falls back to a weaker key.
_MATCHED = """
    keyed AS (
        SELECT tr.*,
               CASE WHEN tr.marketplace_transaction_id ~ '^[0-9]{1,18}$'
                        THEN CAST(tr.marketplace_transaction_id AS bigint)
                    WHEN tr.marketplace_transaction_id IS NULL AND tr.transfer_group ~ '^mtx_[0-9]{1,18}$'
                        THEN CAST(substr(tr.transfer_group, 5) AS bigint)
               END AS named_id,
               tr.marketplace_transaction_id IS NULL
                   AND (tr.transfer_group IS NULL OR tr.transfer_group !~ '^mtx_') AS by_charge
        FROM marketplace_worker.connect_transfers tr
        WHERE tr.destination = :account
    ),
    matched AS (
        SELECT k.*, coalesce(
            (SELECT t.id FROM marketplace.transactions t
             WHERE t.id = k.named_id AND t."providerId" = :provider),
            (SELECT t.id FROM public."Invoice" i JOIN marketplace.transactions t ON t."invoiceId" = i.id
             WHERE k.by_charge AND i."stripeChargeId" = k.source_transaction AND t."providerId" = :provider
             ORDER BY t.id LIMIT 1)
        ) AS transaction_id
        FROM keyed k
    )
"""

_CLASSIFY = text(
    "WITH RECURSIVE" + _MATCHED + """,
    -- The payouts each transfer's money left the account in: the one carrying its `py_...`
    -- payment, then, while that one failed or was canceled, the one carrying its return.
    chain AS (
        SELECT m.id AS transfer_id, it.payout_id, 0 AS depth
        FROM matched m
        JOIN marketplace_worker.connect_payout_items it
          ON it.account = :account AND it.source = m.destination_payment
        WHERE m.transaction_id IS NOT NULL
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
    scope AS (
        SELECT t.id, t.status, coalesce(t."paidAt", t."createdAt") AS paid_at, t."completedAt" AS completed_at,
               coalesce(t."providerPayoutCents", t."totalCents" - t."platformFeeCents") AS expected,
               lower(i.currency) AS currency,
               EXISTS (
                   SELECT 1 FROM marketplace_worker.stripe_disputes d
                   WHERE (d.charge_id = i."stripeChargeId" OR d.payment_intent_id = i."stripePaymentIntentId")
                     AND d.status NOT IN :settled
               ) AS disputed
        FROM marketplace.transactions t JOIN public."Invoice" i ON i.id = t."invoiceId"
        WHERE t."providerId" = :provider
          AND (t.status = :paid
               -- Completed ones while their payout may still fail, while a discrepancy is
               -- open, and whenever their transfer was reversed (at any time).
               OR (t.status = :completed
                   AND (t."completedAt" >= :completed_since
                        OR t.id IN (SELECT d.transaction_id FROM marketplace_worker.reconcile_discrepancies d
                                    WHERE d.account = :account AND d.resolved_at IS NULL
                                      AND d.transaction_id IS NOT NULL)
                        OR t.id IN (SELECT m.transaction_id FROM matched m WHERE m.amount_reversed > 0))))
    ),
    per_transaction AS (
        SELECT m.transaction_id,
               CAST(sum(m.amount) AS bigint) AS gross,
               CAST(sum(m.amount_reversed) AS bigint) AS reversed,
               bool_or(m.currency <> s.currency) AS other_currency,
               array_agg(m.id ORDER BY m.created, m.id) AS transfer_ids,
               -- Fully reversed transfers carry no money to pay out.
               bool_and(coalesce(st.status = 'paid', false)) FILTER (WHERE m.amount_reversed < m.amount) AS all_paid,
               bool_or(st.status IN ('failed', 'canceled')) FILTER (WHERE m.amount_reversed < m.amount) AS any_failed,
               max(st.arrival_date) FILTER (WHERE st.status = 'paid') AS arrival_date,
               max(st.payout_id) FILTER (WHERE st.status IN ('failed', 'canceled')) AS failed_payout,
               max(st.failure_code) FILTER (WHERE st.status IN ('failed', 'canceled')) AS failure_code,
               max(st.payout_id) FILTER (WHERE st.status = 'paid') AS paid_payout
        FROM matched m
        JOIN scope s ON s.id = m.transaction_id
        LEFT JOIN settled st ON st.transfer_id = m.id
        GROUP BY m.transaction_id
    )
    SELECT s.id, s.status, s.paid_at, s.expected, s.currency, s.disputed,
           coalesce(p.gross - p.reversed, 0) AS net, coalesce(p.reversed, 0) AS reversed,
           p.transfer_ids, p.arrival_date, p.failed_payout, p.failure_code, p.paid_payout,
           CASE
               WHEN p.transaction_id IS NULL THEN
                   CASE WHEN s.paid_at < :grace_cutoff THEN 'missing_transfer' ELSE 'awaiting_transfer' END
               WHEN p.other_currency OR (p.gross - p.reversed <> s.expected AND p.reversed = 0)
                   THEN 'amount_mismatch'
               WHEN p.gross - p.reversed <> s.expected THEN 'transfer_reversed'
               WHEN p.any_failed THEN 'payout_failed'
               WHEN p.all_paid THEN 'paid_out'
               ELSE 'awaiting_payout'
           END AS kind
    FROM scope s LEFT JOIN per_transaction p ON p.transaction_id = s.id
    ORDER BY s.id
    """
).bindparams(bindparam("settled", expanding=True))

# Transfers wrong in themselves: matching no transaction of the provider, or leaving money
# with the provider for a transaction that was refunded or cancelled.
_TRANSFER_FINDINGS = text(
    "WITH" + _MATCHED + """
    SELECT m.id, m.amount, m.amount_reversed, m.currency, m.marketplace_transaction_id, m.transfer_group,
           m.transaction_id, t.status
    FROM matched m LEFT JOIN marketplace.transactions t ON t.id = m.transaction_id
    WHERE m.transaction_id IS NULL
       OR (t.status IN (:refunded, :cancelled) AND m.amount > m.amount_reversed)
    ORDER BY m.id
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
    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)  # per transaction, and orphan transfers
    completed: list[int] = field(default_factory=list)
    opened: int = 0
    resolved: int = 0

    def describe(self) -> str:
        if self.skipped:
            return f"{self.account}: skipped ({self.skipped})"
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(self.outcomes.items())) or "nothing to reconcile"
        return (f"{self.account}: {counts}; completed {len(self.completed)}, new discrepancies {self.opened}, "
                f"resolved {self.resolved}; {self.calls} Stripe call(s)")


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
        finding.detail = f"transferred {row.net} cents, expected {row.expected}"
    elif row.kind == "transfer_reversed":
        finding.detail = f"{row.reversed} cents reversed; {row.net} of {row.expected} cents left with the provider"
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
    session: Session, account: str, provider_id: int, *, completed_since: int, grace: timedelta, now: datetime
) -> AccountResult:
    """Classify the account's transactions and transfers from the mirror, complete the paid-out
    transactions and bring its discrepancies up to date. Completed transactions are looked at
    again when completed after `completed_since` (unix seconds)."""
    result = AccountResult(account)
    rows = session.execute(_CLASSIFY, {
        "account": account, "provider": provider_id, "completed_since": from_unix(completed_since),
        "grace_cutoff": now - grace,
        "paid": lifecycle.PAID, "completed": lifecycle.COMPLETED, "settled": list(DISPUTE_SETTLED),
    }).all()
    findings: list[Finding] = []
    due: list[tuple[int, datetime]] = []
    for row in rows:
        kind = row.kind
        if kind == "paid_out" and row.status == lifecycle.PAID:
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
            calls_before = reader.calls
            listing = list_transfers_and_payouts(reader, account, plan, now)
            with session_factory() as session:
                store(session, listing)
                due_items = payouts_to_itemize(session, account)
            items = list_payout_items(reader, account, due_items)
            with session_factory() as session:
                store(session, items)
                result = classify_and_apply(session, account, provider_id, completed_since=plan.payouts_since,
                                            grace=grace, now=from_unix(now))
                _finish_state(session, account, now if plan.covers_default_window else None, started)
            result.calls = reader.calls - calls_before
        finally:
            lock_conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), key)
    log.info("reconciled %s", result.describe(), extra={"account": account})
    return result


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
