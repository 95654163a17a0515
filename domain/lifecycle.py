"""The transaction state machine (SPEC §3), in one place: every writer (event handlers, the
poller, completion) moves a transaction only through `merge`.

    pending_invoice < invoiced < paid < completed     (by rank, never backwards)
    pending_invoice | invoiced -> cancelled           (void or uncollectible before payment)
    paid | completed -> refunded                      (fully refunded, or a dispute lost in full)
    cancelled -> paid                                 (money collected after "uncollectible")
    refunded, and cancelled by a void: terminal

Money is the one way back out of `cancelled`: Stripe (and the app) can still collect an
invoice marked uncollectible, and what was collected must be counted. A void invoice can
never be paid, so a transaction cancelled by a void stays cancelled.

`merge` is monotone: a late or replayed fact about an earlier state changes nothing. With
`target_from_invoice` reading Stripe's `status_transitions` (later snapshots keep earlier
transitions), merging the snapshots of one invoice in any order ends in the same status.
"""

from __future__ import annotations

from typing import TypeVar

PENDING_INVOICE = "pending_invoice"
INVOICED = "invoiced"
PAID = "paid"
COMPLETED = "completed"
CANCELLED = "cancelled"
REFUNDED = "refunded"

RANK = {PENDING_INVOICE: 0, INVOICED: 1, PAID: 2, COMPLETED: 3}
TERMINAL = frozenset({CANCELLED, REFUNDED})
CANCELLABLE = frozenset({PENDING_INVOICE, INVOICED})
REFUNDABLE = frozenset({PAID, COMPLETED})
# States in which the money was received (they carry `paidAt`).
PAID_STATES = frozenset({PAID, COMPLETED, REFUNDED})
INVOICED_STATES = frozenset({INVOICED}) | PAID_STATES

# Dispute statuses after which a dispute no longer holds its transaction back from completing:
# won (or closed without a chargeback), or lost, which is then counted as a refund of its
# amount (the ledger's refunded total). Any other status is an open dispute.
DISPUTE_SETTLED = ("won", "lost", "warning_closed", "prevented")

T = TypeVar("T")


def allowed(current: str, target: str, *, voided: bool = False) -> bool:
    """Whether `current` may move to `target` (a move to itself is not a move); `voided`:
    the invoice was voided, which no payment can follow."""
    if current == CANCELLED and target == PAID:
        return not voided
    if current == target or current in TERMINAL:
        return False
    if target == CANCELLED:
        return current in CANCELLABLE
    if target == REFUNDED:
        return current in REFUNDABLE
    return target in RANK and RANK[target] > RANK.get(current, -1)


def merge(current: str, target: str, *, voided: bool = False) -> str:
    """The status after learning that the invoice reached `target`."""
    return target if allowed(current, target, voided=voided) else current


def target_from_invoice(
    status: str | None,
    *,
    finalized_at: T | None = None,
    paid_at: T | None = None,
    voided_at: T | None = None,
    uncollectible_at: T | None = None,
) -> str:
    """The transaction status an invoice snapshot stands for (Stripe's invoice or the app's).

    A payment wins over "uncollectible" (the money was collected after all); a void before
    the payment (which Stripe never allows) keeps it cancelled whatever a later snapshot says.
    """
    if voided_at is not None and (paid_at is None or voided_at < paid_at):
        return CANCELLED
    paid = status == "paid" or paid_at is not None
    if not paid and (status in ("void", "uncollectible") or uncollectible_at is not None):
        return CANCELLED
    if paid:
        return PAID
    if status == "open" or finalized_at is not None:
        return INVOICED
    return PENDING_INVOICE

