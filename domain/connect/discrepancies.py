"""Working the discrepancies reconciliation finds (SPEC §5): listing them for operators and
finance, acknowledging one, its history, and the count that alerts.

A discrepancy is `open` while the last run that covered it still saw it, `acknowledged` once
an operator took note of it (with a note and a name), and `resolved` when a later run no longer
sees it. An acknowledgement stands for the amounts it was given at: when a later run sees other
expected or seen cents, or another currency, it is cleared and the history says so
(`amount_changed`, then `reopened`). Only unacknowledged open discrepancies count toward the
alert (`count_unacknowledged`). Runs write their changes in classify.py (`upsert_findings`,
`resolve_unseen`); this module writes acknowledgements and reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import money
from models import DiscrepancyChange, DiscrepancyState


class DiscrepancyError(Exception):
    """An operator's request about a discrepancy that cannot be done; the message says why."""


class DiscrepancyNotFound(DiscrepancyError):
    def __init__(self, discrepancy_id: int) -> None:
        super().__init__(f"no discrepancy {discrepancy_id}")
        self.discrepancy_id = discrepancy_id


class DiscrepancyResolved(DiscrepancyError):
    def __init__(self, discrepancy_id: int, resolved_at: datetime) -> None:
        super().__init__(f"discrepancy {discrepancy_id} was resolved at {resolved_at.astimezone(UTC):%Y-%m-%d %H:%M} "
                         "UTC: there is nothing to acknowledge")
        self.discrepancy_id = discrepancy_id
        self.resolved_at = resolved_at


class InvalidAcknowledgement(DiscrepancyError, ValueError):
    """An acknowledgement without a note or a name."""


@dataclass(frozen=True)
class Discrepancy:
    """A discrepancy as operators and finance see it. Amounts are in the currency's minor unit."""

    id: int
    kind: str
    account: str
    # The transaction id for transaction kinds, the transfer id for transfer kinds.
    subject: str
    transaction_id: int | None
    expected_cents: int | None
    seen_cents: int | None
    currency: str | None
    transfer_ids: tuple[str, ...]
    payout_id: str | None
    detail: str
    first_seen_at: datetime
    last_seen_at: datetime
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    acknowledged_note: str | None
    resolved_at: datetime | None

    @property
    def state(self) -> DiscrepancyState:
        if self.resolved_at is not None:
            return DiscrepancyState.RESOLVED
        if self.acknowledged_at is not None:
            return DiscrepancyState.ACKNOWLEDGED
        return DiscrepancyState.OPEN

    def as_json(self) -> dict[str, Any]:
        """Everything above, JSON-safe: amounts as `money.json_amount`, times in ISO 8601 (UTC)."""
        return {
            "id": self.id, "kind": self.kind, "state": str(self.state), "account": self.account,
            "subject": self.subject, "transaction_id": self.transaction_id,
            "expected": money.json_amount(self.expected_cents, self.currency),
            "seen": money.json_amount(self.seen_cents, self.currency),
            "currency": self.currency, "transfer_ids": list(self.transfer_ids), "payout_id": self.payout_id,
            "detail": self.detail, "first_seen_at": _iso(self.first_seen_at), "last_seen_at": _iso(self.last_seen_at),
            "acknowledged_at": _iso(self.acknowledged_at), "acknowledged_by": self.acknowledged_by,
            "acknowledged_note": self.acknowledged_note, "resolved_at": _iso(self.resolved_at),
        }


@dataclass(frozen=True)
class DiscrepancyEvent:
    """One change in a discrepancy's history, with its amounts at the time."""

    discrepancy_id: int
    at: datetime
    change: DiscrepancyChange
    # The operator's name for an acknowledgement; "reconcile" for the changes runs make.
    by: str
    note: str | None
    expected_cents: int | None
    seen_cents: int | None
    currency: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "discrepancy_id": self.discrepancy_id, "at": _iso(self.at), "change": str(self.change), "by": self.by,
            "note": self.note, "expected": money.json_amount(self.expected_cents, self.currency),
            "seen": money.json_amount(self.seen_cents, self.currency), "currency": self.currency,
        }


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat() if at is not None else None


_COLUMNS = """
    d.id, d.kind, d.account, d.subject, d.transaction_id, d.expected_cents, d.seen_cents, d.currency,
    d.transfer_ids, d.payout_id, d.detail, d.first_seen_at, d.last_seen_at, d.acknowledged_at,
    d.acknowledged_by, d.acknowledged_note, d.resolved_at
"""


def _discrepancy(row: Any) -> Discrepancy:
    values = row._asdict()
    values["transfer_ids"] = tuple(values["transfer_ids"] or ())
    return Discrepancy(**values)


_LIST = text(
    f"""
    SELECT {_COLUMNS}
    FROM marketplace_worker.reconcile_discrepancies d
    WHERE (CAST(:unresolved AS boolean) IS FALSE OR d.resolved_at IS NULL)
      AND (CAST(:account AS text) IS NULL OR d.account = :account)
      AND (CAST(:kind AS text) IS NULL OR d.kind = :kind)
      AND (CAST(:since AS timestamptz) IS NULL OR d.last_seen_at >= :since)
    ORDER BY d.kind, d.first_seen_at, d.subject
    """
)


def list_discrepancies(
    session: Session, *, state: Literal["open", "all"] = "open", account: str | None = None,
    kind: str | None = None, since: datetime | None = None,
) -> list[Discrepancy]:
    """Discrepancies by kind, then first seen. `state`: "open" for those not resolved
    (acknowledged or not), "all" for resolved ones too. `since` keeps those a run saw at or
    after that moment (a naive datetime is UTC): still open then, or resolved later."""
    if state not in ("open", "all"):
        raise ValueError(f"state must be 'open' or 'all', not {state!r}")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    rows = session.execute(_LIST, {"unresolved": state == "open", "account": account, "kind": kind, "since": since})
    return [_discrepancy(row) for row in rows]


_COUNT_UNACKNOWLEDGED = text(
    """
    SELECT count(*) FROM marketplace_worker.reconcile_discrepancies d
    WHERE d.resolved_at IS NULL AND d.acknowledged_at IS NULL
      AND (CAST(:account AS text) IS NULL OR d.account = :account)
    """
)


def count_unacknowledged(session: Session, account: str | None = None) -> int:
    """How many discrepancies are open and nobody has acknowledged (on the account, with one):
    what `reconcile`'s exit code and the alert go by."""
    return session.execute(_COUNT_UNACKNOWLEDGED, {"account": account}).scalar_one()


# The acknowledgement and its history in one statement; a resolved discrepancy is left alone.
_ACK = text(
    f"""
    WITH acked AS (
        UPDATE marketplace_worker.reconcile_discrepancies d
        SET acknowledged_at = now(), acknowledged_by = :by, acknowledged_note = :note
        WHERE d.id = :id AND d.resolved_at IS NULL
        RETURNING {_COLUMNS}
    ),
    history AS (
        INSERT INTO marketplace_worker.reconcile_discrepancy_events
            (discrepancy_id, change, by, note, expected_cents, seen_cents, currency)
        SELECT a.id, :acknowledged, :by, :note, a.expected_cents, a.seen_cents, a.currency FROM acked a
    )
    SELECT * FROM acked
    """
)


def ack(session: Session, discrepancy_id: int, note: str, by: str) -> Discrepancy:
    """Acknowledge an open discrepancy: `by` (a person's name) took note of it, and `note`
    says what is being done. It stays listed but no longer counts toward the alert, until a
    run sees other amounts (then it is open again) or no longer sees it (resolved). A second
    acknowledgement replaces the first; the history keeps both. Returns the discrepancy as
    acknowledged.

    Raises InvalidAcknowledgement for an empty note or name, DiscrepancyNotFound for an
    unknown id, DiscrepancyResolved for a resolved one; nothing changes then."""
    note, by = (note or "").strip(), (by or "").strip()
    if not note:
        raise InvalidAcknowledgement("an acknowledgement needs a note: what is being done about it")
    if not by:
        raise InvalidAcknowledgement("an acknowledgement needs the name of who acknowledges it")
    row = session.execute(_ACK, {
        "id": discrepancy_id, "note": note, "by": by, "acknowledged": DiscrepancyChange.ACKNOWLEDGED,
    }).one_or_none()
    if row is not None:
        return _discrepancy(row)
    resolved_at = get_discrepancy(session, discrepancy_id).resolved_at
    if resolved_at is None:  # resolved and seen again between the two statements
        raise DiscrepancyError(f"discrepancy {discrepancy_id} changed while it was acknowledged; try again")
    raise DiscrepancyResolved(discrepancy_id, resolved_at)


_ONE = text(f"SELECT {_COLUMNS} FROM marketplace_worker.reconcile_discrepancies d WHERE d.id = :id")


def get_discrepancy(session: Session, discrepancy_id: int) -> Discrepancy:
    """One discrepancy, whatever its state. Raises DiscrepancyNotFound for an unknown id."""
    row = session.execute(_ONE, {"id": discrepancy_id}).one_or_none()
    if row is None:
        raise DiscrepancyNotFound(discrepancy_id)
    return _discrepancy(row)


_HISTORY = text(
    """
    SELECT e.discrepancy_id, e.at, e.change, e.by, e.note, e.expected_cents, e.seen_cents, e.currency
    FROM marketplace_worker.reconcile_discrepancy_events e
    WHERE e.discrepancy_id = :id
    ORDER BY e.id
    """
)


def history(session: Session, discrepancy_id: int) -> list[DiscrepancyEvent]:
    """Every change of the discrepancy, oldest first. Raises DiscrepancyNotFound for an unknown id."""
    get_discrepancy(session, discrepancy_id)
    return [
        DiscrepancyEvent(**{**row._asdict(), "change": DiscrepancyChange(row.change)})
        for row in session.execute(_HISTORY, {"id": discrepancy_id})
    ]
