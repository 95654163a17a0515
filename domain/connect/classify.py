"""Classifying a connected account's transactions and transfers from the mirror (SPEC §5),
completing the paid-out transactions, and keeping its discrepancies up to date.

Transfers are matched to the provider's transactions first (the match is stored on the
transfer). The provider's expected net is `providerPayoutCents` less its share of what was
refunded (lost disputes included), rounded half up; the net it got is its transfers less their
reversals and, for destination charges, less the application fee net of its refunds. What a
transaction comes out as: `paid_out` (then `completed`), `awaiting_payout`, `funds_available`
(manual payouts; then `completed`), `awaiting_funds` (manual payouts), `awaiting_transfer`
(paid less than RECONCILE_TRANSFER_GRACE_HOURS ago), or a discrepancy: `missing_transfer`,
`transfer_reversed` (after a reversal, short of the expected net by more than a cent per
refund), `amount_mismatch` (any other difference), `payout_failed`. Transfers:
`orphan_transfer` (no transaction of the provider), `transfer_not_reversed` (money left with
the provider for a refunded or cancelled transaction), and, over all accounts,
`unknown_destination` (no stripe_connect provider). Discrepancies seen again get
`last_seen_at`; open ones no longer seen get `resolved_at`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.orm import Session

from domain import lifecycle
from domain.clock import from_unix
from domain.connect import mirror
from domain.money import format_amount
from domain.stats_touch import touch_providers
from models import DiscrepancyChange

log = logging.getLogger(__name__)

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
# Who changed a discrepancy, in its history, when a run did.
RUN_ACTOR = "reconcile"


# --- matching ------------------------------------------------------------------------------

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


# --- classification ------------------------------------------------------------------------

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

# --- discrepancies -------------------------------------------------------------------------

# A finding's amounts are its expected and seen cents and its currency. One statement per
# batch stores the findings and writes their history: `opened` for a new discrepancy or one
# back after it was resolved (a new occurrence: first seen now, any old acknowledgement
# cleared), `amount_changed` for an open one whose amounts differ from the last run's, and
# `reopened` when that clears an acknowledgement (given for the amounts it saw). `before` is the
# rows as this statement found them: the snapshot the upsert's own changes do not show.
_UPSERT_DISCREPANCIES = text(
    """
    WITH f AS (
        SELECT * FROM unnest(
            CAST(:kind AS text[]), CAST(:subject AS text[]), CAST(:account AS text[]),
            CAST(:transaction_id AS bigint[]), CAST(:expected_cents AS bigint[]), CAST(:seen_cents AS bigint[]),
            CAST(:currency AS text[]), CAST(:transfer_ids AS text[]), CAST(:payout_id AS text[]),
            CAST(:detail AS text[])
        ) AS f(kind, subject, account, transaction_id, expected_cents, seen_cents, currency, transfer_ids,
               payout_id, detail)
    ),
    before AS (
        SELECT d.kind, d.subject, d.expected_cents, d.seen_cents, d.currency, d.resolved_at, d.acknowledged_by
        FROM marketplace_worker.reconcile_discrepancies d
        JOIN f ON d.kind = f.kind AND d.subject = f.subject
    ),
    up AS (
        INSERT INTO marketplace_worker.reconcile_discrepancies AS d
            (kind, subject, account, transaction_id, expected_cents, seen_cents, currency, transfer_ids,
             payout_id, detail, first_seen_at, last_seen_at)
        SELECT f.kind, f.subject, f.account, f.transaction_id, f.expected_cents, f.seen_cents, f.currency,
               CASE WHEN f.transfer_ids = '' THEN NULL ELSE string_to_array(f.transfer_ids, ',') END,
               f.payout_id, f.detail, now(), now()
        FROM f
        ON CONFLICT (kind, subject) DO UPDATE SET
            account = excluded.account, transaction_id = excluded.transaction_id,
            expected_cents = excluded.expected_cents, seen_cents = excluded.seen_cents,
            currency = excluded.currency, transfer_ids = excluded.transfer_ids, payout_id = excluded.payout_id,
            detail = excluded.detail, last_seen_at = now(), resolved_at = NULL,
            -- Back after it was resolved: a new occurrence.
            first_seen_at = CASE WHEN d.resolved_at IS NULL THEN d.first_seen_at ELSE now() END,
            -- An acknowledgement holds for one occurrence, at the amounts it was given at.
            (acknowledged_at, acknowledged_by, acknowledged_note) = (
                SELECT d.acknowledged_at, d.acknowledged_by, d.acknowledged_note
                WHERE d.resolved_at IS NULL
                  AND (d.expected_cents, d.seen_cents, d.currency) IS NOT DISTINCT FROM
                      (excluded.expected_cents, excluded.seen_cents, excluded.currency))
        RETURNING d.id, d.kind, d.subject, d.expected_cents, d.seen_cents, d.currency
    )
    INSERT INTO marketplace_worker.reconcile_discrepancy_events
        (discrepancy_id, change, by, note, expected_cents, seen_cents, currency)
    SELECT up.id, e.change, :by, e.note, up.expected_cents, up.seen_cents, up.currency
    FROM up
    LEFT JOIN before b ON b.kind = up.kind AND b.subject = up.subject
    CROSS JOIN LATERAL (
        SELECT b.kind IS NOT NULL AND b.resolved_at IS NULL
               AND (b.expected_cents, b.seen_cents, b.currency) IS DISTINCT FROM
                   (up.expected_cents, up.seen_cents, up.currency) AS changed
    ) c
    CROSS JOIN LATERAL (VALUES
        (1, CAST(:opened AS text), CAST(NULL AS text), b.kind IS NULL OR b.resolved_at IS NOT NULL),
        (2, :amount_changed, 'before: expected ' || coalesce(CAST(b.expected_cents AS text), '-')
                             || ', seen ' || coalesce(CAST(b.seen_cents AS text), '-')
                             || coalesce(' ' || b.currency, '') || ' (minor units)', c.changed),
        (3, :reopened, 'the amounts changed after ' || b.acknowledged_by || ' acknowledged it',
         c.changed AND b.acknowledged_by IS NOT NULL)
    ) AS e(n, change, note, happened)
    WHERE e.happened
    ORDER BY up.id, e.n
    RETURNING change
    """
)

# Open discrepancies of these kinds on the account that this run did not see again are fixed.
_RESOLVE = text(
    """
    WITH resolved AS (
        UPDATE marketplace_worker.reconcile_discrepancies d
        SET resolved_at = now()
        WHERE d.resolved_at IS NULL AND d.kind = ANY(CAST(:kinds AS text[]))
          AND (CAST(:account AS text) IS NULL OR d.account = :account)
          AND (d.kind, d.subject) NOT IN (
              SELECT * FROM unnest(CAST(:seen_kind AS text[]), CAST(:seen_subject AS text[])))
        RETURNING d.id, d.expected_cents, d.seen_cents, d.currency
    )
    INSERT INTO marketplace_worker.reconcile_discrepancy_events
        (discrepancy_id, change, by, note, expected_cents, seen_cents, currency)
    SELECT r.id, :resolved, :by, 'no longer seen', r.expected_cents, r.seen_cents, r.currency
    FROM resolved r
    ORDER BY r.id
    RETURNING discrepancy_id
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
    def amount(cents: int) -> str:
        return format_amount(cents, row.currency)

    if row.kind == "missing_transfer":
        finding.detail = f"paid {row.paid_at:%Y-%m-%d %H:%M} UTC, no transfer to {account} yet"
    elif row.kind == "amount_mismatch":
        finding.detail = f"transferred {amount(row.net)} net, expected {amount(row.expected)}" + (
            f" (after an application fee of {amount(row.fee)})" if row.fee else "") + (
            f" ({amount(row.refunded)} refunded)" if row.refunded else "")
    elif row.kind == "transfer_reversed":
        finding.detail = (f"{amount(row.reversed)} reversed; {amount(row.net)} of {amount(row.expected)} left with "
                          "the provider") + (f" ({amount(row.refunded)} refunded)" if row.refunded else "")
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
    """Store what a run saw and write the history of what changed (one statement); returns how
    many discrepancies are new (or back after they were resolved). An acknowledged one whose
    amounts changed loses its acknowledgement."""
    if not findings:
        return 0
    rows = session.execute(_UPSERT_DISCREPANCIES, {
        "kind": [f.kind for f in findings], "subject": [f.subject for f in findings],
        "account": [f.account for f in findings], "transaction_id": [f.transaction_id for f in findings],
        "expected_cents": [f.expected_cents for f in findings], "seen_cents": [f.seen_cents for f in findings],
        "currency": [f.currency for f in findings], "transfer_ids": [",".join(f.transfer_ids) for f in findings],
        "payout_id": [f.payout_id for f in findings], "detail": [f.detail for f in findings],
        "by": RUN_ACTOR, "opened": DiscrepancyChange.OPENED, "amount_changed": DiscrepancyChange.AMOUNT_CHANGED,
        "reopened": DiscrepancyChange.REOPENED,
    }).all()
    return sum(1 for row in rows if row.change == DiscrepancyChange.OPENED)


def resolve_unseen(session: Session, kinds: Iterable[str], account: str | None, seen: list[Finding]) -> int:
    """Resolve the open discrepancies of these kinds (on the account, or on any with None) that
    are not among `seen`, writing their history (one statement); returns how many."""
    return len(session.execute(_RESOLVE, {
        "kinds": list(kinds), "account": account,
        "seen_kind": [f.kind for f in seen], "seen_subject": [f.subject for f in seen],
        "resolved": DiscrepancyChange.RESOLVED, "by": RUN_ACTOR,
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
    result = AccountResult(account, payouts=payouts or mirror.payout_mode(session, account))
    rows = session.execute(_CLASSIFY, {
        "account": account, "provider": provider_id, "completed_since": from_unix(completed_since),
        "grace_cutoff": now - grace, "manual": result.payouts == "manual",
        "now_unix": int((now if now.tzinfo is not None else now.replace(tzinfo=UTC)).timestamp()),
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
