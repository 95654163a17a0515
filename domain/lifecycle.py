"""The transaction state machine (SPEC §3), in one place: every writer (event handlers, the
poller, completion) moves a transaction only through `merge`.

    pending_invoice < invoiced < paid < completed     (by rank, never backwards)
    pending_invoice | invoiced -> cancelled           (void or uncollectible before payment)
    paid | completed -> refunded                      (fully refunded)
    cancelled, refunded: terminal

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

T = TypeVar("T")


def allowed(current: str, target: str) -> bool:
    """Whether `current` may move to `target` (a move to itself is not a move)."""
    if current == target or current in TERMINAL:
        return False
    if target == CANCELLED:
        return current in CANCELLABLE
    if target == REFUNDED:
        return current in REFUNDABLE
    return target in RANK and RANK[target] > RANK.get(current, -1)


def merge(current: str, target: str) -> str:
    """The status after learning that the invoice reached `target`."""
    return target if allowed(current, target) else current


def target_from_invoice(
    status: str | None,
    *,
    finalized_at: T | None = None,
    paid_at: T | None = None,
    voided_at: T | None = None,
    uncollectible_at: T | None = None,
) -> str:
    """The transaction status an invoice snapshot stands for (Stripe's invoice or the app's).

    An invoice voided or marked uncollectible before it was paid stands for `cancelled` even
    in a later snapshot that shows it paid, so the answer does not depend on which snapshot
    of the invoice is seen first.
    """
    ended = min((t for t in (voided_at, uncollectible_at) if t is not None), default=None)
    if ended is not None and (paid_at is None or ended < paid_at):
        return CANCELLED
    if status in ("void", "uncollectible") and paid_at is None:
        return CANCELLED
    if status == "paid" or paid_at is not None:
        return PAID
    if status == "open" or finalized_at is not None:
        return INVOICED
    return PENDING_INVOICE

