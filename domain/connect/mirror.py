"""The mirror of the platform's Stripe Connect money (SPEC §5): its transfers to connected
accounts (`connect_transfers`), their payouts (`connect_payouts`), the balance transactions of
finished automatic payouts (`connect_payout_items`) and, on manual payouts, the accounts'
`payment` balance transactions (`connect_payments`).

Webhook events (domain/handlers/connect.py) and reconciliation's listings both feed it: the
newest snapshot wins, a reversal once seen stays, and an event marks its account dirty for the
next reconciliation pass. What the mirror holds then tells a run what else to read: the payouts
to itemize, the payments, the application fees, and whether the account is on manual payouts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import lifecycle
from domain.errors import InvalidPayload
from domain.payload import integer, ref
from models import ConnectAccount

# --- transfers and payouts -----------------------------------------------------------------

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


def _columns(rows: list[dict[str, Any]], names: Iterable[str]) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in names}


def transfer_row(obj: dict[str, Any], as_of: int, as_of_id: str) -> dict[str, Any]:
    transfer_id, destination = ref(obj.get("id")), ref(obj.get("destination"))
    if transfer_id is None or destination is None:
        raise InvalidPayload("transfer without an id or a destination")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    named = metadata.get("marketplace_transaction_id")
    amount_reversed = integer(obj, "amount_reversed", 0)
    return {
        "id": transfer_id, "destination": destination, "amount": integer(obj, "amount"),
        "amount_reversed": amount_reversed, "currency": str(obj.get("currency") or "").lower(),
        "destination_payment": ref(obj.get("destination_payment")),
        "source_transaction": ref(obj.get("source_transaction")),
        "transfer_group": obj.get("transfer_group") or None,
        "marketplace_transaction_id": str(named) if named not in (None, "") else None,
        "created": integer(obj, "created"), "as_of": as_of, "as_of_id": as_of_id,
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
    row = {**_NO_SOURCE_CHARGE, "source_payment_intent": ref(charge.get("payment_intent")),
           "destination_charge": ref(transfer_data.get("destination")) == destination}
    if not row["destination_charge"]:
        return row
    fee = charge.get("application_fee")
    if isinstance(fee, dict):
        row |= {"application_fee_id": ref(fee.get("id")), "application_fee_amount": integer(fee, "amount"),
                "application_fee_refunded": integer(fee, "amount_refunded", 0),
                "fee_checked_reversed": amount_reversed}
    else:
        # Not expanded: the fee as charged; its refunds are read before they can matter.
        amount = charge.get("application_fee_amount")
        row |= {"application_fee_id": ref(fee),
                "application_fee_amount": amount if isinstance(amount, int) and not isinstance(amount, bool) else 0,
                "application_fee_refunded": 0}
    return row


def payout_row(account: str, obj: dict[str, Any], as_of: int, as_of_id: str) -> dict[str, Any]:
    payout_id = ref(obj.get("id"))
    if payout_id is None or not isinstance(obj.get("status"), str):
        raise InvalidPayload("payout without an id or a status")
    return {
        "id": payout_id, "account": account, "amount": integer(obj, "amount"),
        "currency": str(obj.get("currency") or "").lower(), "status": obj["status"],
        "automatic": bool(obj.get("automatic", True)), "reconciliation_status": obj.get("reconciliation_status"),
        "arrival_date": obj.get("arrival_date") if isinstance(obj.get("arrival_date"), int) else None,
        "failure_code": obj.get("failure_code"), "created": integer(obj, "created"), "as_of": as_of,
        "as_of_id": as_of_id, "method": obj.get("method") if isinstance(obj.get("method"), str) else None,
    }


def payout_item_row(account: str, payout_id: str, bt: dict[str, Any]) -> dict[str, Any]:
    """A balance transaction of an automatic payout: what `connect_payout_items` keeps of it."""
    return {"id": bt["id"], "account": account, "payout_id": payout_id, "source": ref(bt.get("source")),
            "type": str(bt.get("type") or ""), "amount": integer(bt, "amount")}


def payment_row(account: str, bt: dict[str, Any]) -> dict[str, Any] | None:
    """A `payment` balance transaction (a transfer's money arriving on the account), as
    `connect_payments` keeps it; None for any other balance transaction."""
    if bt.get("type") != "payment" or not ref(bt.get("source")):
        return None
    return {"id": ref(bt.get("source")), "account": account, "balance_transaction_id": bt["id"],
            "amount": integer(bt, "amount"), "available_on": integer(bt, "available_on"), "created": integer(bt, "created")}


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


# --- what a run read -----------------------------------------------------------------------


@dataclass
class Listing:
    """What one run read from Stripe, for `store`."""

    transfers: list[dict[str, Any]] = field(default_factory=list)
    payouts: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    itemized: list[str] = field(default_factory=list)
    payments: list[dict[str, Any]] = field(default_factory=list)
    fees: list[dict[str, Any]] = field(default_factory=list)  # (transfer id, the application fee read)


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
        session.execute(_FEE_READ, {"id": read["transfer_id"], "amount": integer(fee, "amount"),
                                    "refunded": integer(fee, "amount_refunded", 0),
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


def schedule_read_due(session: Session, account: str, provider_id: int, now: datetime) -> bool:
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


def store_schedule(session: Session, account: str, obj: dict[str, Any]) -> None:
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


def payments_since(session: Session, account: str, provider_id: int) -> int | None:
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


def fees_to_read(session: Session, account: str, changed_since: datetime) -> list[tuple[str, str, int]]:
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
