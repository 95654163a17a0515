"""Payment facts: charges, refunds, disputes and invoice payments, recorded per Stripe object
(newest snapshot wins) even when no invoice is linked to their payment yet; the links from an
invoice to the charge and PaymentIntent that paid it; and the refunds those facts add up to on
the invoice's transaction (domain/ledger.py).

Lock order, shared by every writer (event handlers, the poller, completion and
reconciliation), so concurrent work serializes without deadlocks:

    1. the inbox row of the event (`stripe_events`, FOR UPDATE)
    2. the `"Invoice"` row the event is about (FOR UPDATE)
    3. that invoice's `marketplace.transactions` row
    4. the worker's per-object rows (`stripe_object_versions`, refunds, disputes, ...)
       and the per-payment advisory lock (below)

(`touched_providers` takes no lock anyone waits for: its rows are only ever inserted.)

Work that has no event (the poller) starts at step 2; several invoice rows are locked in
id order. A charge, refund or dispute that matches no invoice skips steps 2-3.

Two liberties the order allows. A transaction row is only ever locked by whoever holds its
invoice row, so a payment fact writes its step-4 rows before it looks up the transaction:
nobody can hold the transaction and wait for those rows. An `invoice_payment.paid` writes its
own version and fact rows before it looks for the invoice: only events about that same
InvoicePayment write them, and they all take them first. A batch of events (domain/dispatch.py)
holds several invoices: its snapshots' in id order, then its payment events' all at once in id
order, with their transactions, before any of their step-4 rows (`PaymentInvoices.locked_for`);
two batches that cross wait for each other at most the batch's `lock_timeout` (100 ms), after
which the waiting events are left for transactions of their own.

Whoever links an invoice to a charge or PaymentIntent later recomputes the refunds recorded
against it. A per-payment advisory lock closes the race between the two:

    linker:   invoice lock -> sets stripeChargeId/PaymentIntentId -> payment lock -> reads facts
    recorder: finds no invoice -> payment lock -> looks again -> records the fact

so either the recorder sees the committed link, or the linker reads the committed fact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, TextClause, case, or_, select, text
from sqlalchemy.orm import Session

from domain import lifecycle, versions
from domain.clock import utcnow
from domain.errors import InvalidPayload
from domain.ledger import Outcome, apply_refunds, touch, transaction_for, transactions_for
from domain.payload import integer, ref, required_id
from models import Invoice, StripeCharge, Transaction

log = logging.getLogger(__name__)


# --- locks ---------------------------------------------------------------------------------


# The keys locked one after the other, in the array's order (unnest's), in one statement.
_LOCKING_SQL = "SELECT count(pg_advisory_xact_lock(hashtextextended(key, 0))) FROM unnest(CAST(:keys AS text[])) AS key"
_LOCK_KEYS = text(_LOCKING_SQL)


def _lock_keys(session: Session, keys: list[str]) -> None:
    if keys:
        session.execute(_LOCK_KEYS, {"keys": sorted(set(keys))})


def _payment_keys(payment_ids: list[str]) -> list[str]:
    return sorted({f"stripe-payment:{payment_id}" for payment_id in payment_ids})


def lock_payments(session: Session, payment_ids: list[str]) -> None:
    """Serialize the recording of a payment's facts with the linking of an invoice to it."""
    _lock_keys(session, _payment_keys(payment_ids))


def _app_invoice_id(value: Any) -> int | None:
    """A charge's `metadata.invoiceId`, which names the app's invoice only as ASCII digits."""
    return int(value) if isinstance(value, str) and value.isascii() and value.isdigit() else None


@dataclass(frozen=True)
class PaymentRefs:
    """What a payment fact names that its invoice is found by, best first: the invoice's
    charge, its PaymentIntent, its Stripe invoice, the app's id; and the locks that a look
    finding nothing takes before it looks again (the per-payment protocol above)."""

    charge_id: str | None = None
    payment_intent_id: str | None = None
    stripe_invoice_id: str | None = None
    app_invoice_id: int | None = None
    lock_keys: tuple[str, ...] = ()

    @classmethod
    def of_payment(cls, charge_id: str | None, payment_intent_id: str | None, *,
                   stripe_invoice_id: str | None = None, app_invoice_id: int | None = None) -> PaymentRefs:
        return cls(charge_id, payment_intent_id, stripe_invoice_id, app_invoice_id,
                   tuple(f"stripe-payment:{p}" for p in (charge_id, payment_intent_id) if p))

    @classmethod
    def of_stripe_invoice(cls, stripe_invoice_id: str) -> PaymentRefs:
        # The mirror that fills an invoice's Stripe id takes this lock before reading what was recorded.
        return cls(stripe_invoice_id=stripe_invoice_id, lock_keys=(f"stripe-invoice:{stripe_invoice_id}",))

    def named(self) -> list[tuple[int, str, str | int]]:
        """(rank, `"Invoice"` attribute, value) of each thing named, best first."""
        return [(rank, attribute, value) for rank, (field, attribute) in enumerate(_FOUND_BY)
                if (value := getattr(self, field)) is not None]

    def conditions(self) -> list[tuple[int, Any]]:
        """(rank, condition) of each thing named, best first."""
        return [(rank, getattr(Invoice, attribute) == value) for rank, attribute, value in self.named()]

    def rank(self, invoice: Invoice) -> int | None:
        """`conditions`' rank of the first one the invoice meets, as it stands in this session."""
        return next((rank for rank, attribute, value in self.named() if getattr(invoice, attribute) == value), None)


# What an invoice is found by, best first: a `PaymentRefs` field and the `"Invoice"` attribute it names.
_FOUND_BY = (("charge_id", "stripeChargeId"), ("payment_intent_id", "stripePaymentIntentId"),
             ("stripe_invoice_id", "stripeInvoiceId"), ("app_invoice_id", "id"))


class PaymentInvoices:
    """The invoices payment facts belong to, looked up and locked.

    Alone (`PaymentInvoices(session)`), each fact looks in the database: by one ranked locking
    read; when it finds nothing, it takes its payment locks and reads again, so a link
    committed meanwhile is not missed. For a batch's facts (`PaymentInvoices.locked_for`), the
    same two looks are made once for all of them, before any of their rows is written: every
    invoice any of them names is locked in one statement, in id order; then the payment locks
    of the facts that found none, and one more read for those. Each fact then finds its
    invoice among those held, as its own changes and its predecessors' left them: an invoice
    held is one no one else can change, and one not held did not match when the batch looked
    (with the payment locks held since, no one can link it to those payments meanwhile).
    The transactions of the invoices held are locked the same way, in one go, and the providers
    whose transactions the batch changed are marked for the stats in one go at its end
    (`touch_changed`): the marks are only ever inserted, so when does not matter."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.held: dict[int, Invoice] = {}
        self.looked_again: set[PaymentRefs] = set()
        self.transactions: dict[int, Transaction | None] = {}
        self.changed: list[Outcome] | None = None  # a batch's, until `touch_changed`; None: at once

    @classmethod
    def locked_for(cls, session: Session, facts: list[PaymentRefs]) -> PaymentInvoices:
        invoices = cls(session)
        invoices.changed = []
        invoices._lock(facts)
        lost = [refs for refs in facts if invoices._best(refs) is None]
        _lock_keys(session, [key for refs in lost for key in refs.lock_keys])
        invoices._lock(lost)
        invoices.looked_again.update(lost)
        marketplace = [invoice for invoice in invoices.held.values() if invoice.isMarketplaceInvoice]
        found = transactions_for(session, marketplace) if marketplace else {}
        invoices.transactions = {invoice.id: found.get(invoice.id) for invoice in marketplace}
        return invoices

    def _lock(self, facts: list[PaymentRefs]) -> None:
        named: dict[str, set] = {attribute: set() for _, attribute in _FOUND_BY}
        for refs in facts:
            for _, attribute, value in refs.named():
                named[attribute].add(value)
        wanted = [getattr(Invoice, attribute).in_(sorted(values)) for attribute, values in named.items() if values]
        if wanted:  # one IN list per attribute: a statement compiled once, whatever the batch
            self.held |= {invoice.id: invoice for invoice in self.session.execute(
                select(Invoice).where(or_(*wanted)).order_by(Invoice.id).with_for_update()).scalars()}

    def _best(self, refs: PaymentRefs) -> Invoice | None:
        ranked = [(rank, invoice.id, invoice) for invoice in self.held.values()
                  if (rank := refs.rank(invoice)) is not None]
        return min(ranked, key=lambda r: r[:2])[2] if ranked else None

    def _read(self, refs: PaymentRefs) -> Invoice | None:
        ranked = refs.conditions()
        if not ranked:
            return None
        return self.session.execute(
            select(Invoice).where(or_(*(condition for _, condition in ranked)))
            .order_by(case(*((condition, rank) for rank, condition in ranked)), Invoice.id)
            .limit(1).with_for_update()
        ).scalar_one_or_none()

    def find(self, refs: PaymentRefs) -> Invoice | None:
        """The invoice the fact belongs to, locked; None when none is linked."""
        invoice = self._best(refs)
        if invoice is not None or refs in self.looked_again:
            return invoice
        self.session.flush()  # a held invoice whose links changed must not match what they were
        invoice = self._read(refs)
        if invoice is None:
            _lock_keys(self.session, list(refs.lock_keys))
            invoice = self._read(refs)
        if invoice is not None:
            self.held[invoice.id] = invoice
        return invoice

    def touch(self, outcome: Outcome) -> None:
        if self.changed is None:
            touch(self.session, [outcome])
        else:
            self.changed.append(outcome)

    def touch_changed(self) -> None:
        """Mark the providers of the batch's changed transactions (`locked_for`)."""
        touch(self.session, self.changed or [])
        self.changed = []

    def transaction(self, invoice: Invoice) -> Transaction | None:
        """The invoice's transaction, locked (the invoice is held)."""
        if invoice.id not in self.transactions:
            self.transactions[invoice.id] = transaction_for(self.session, invoice)
        return self.transactions[invoice.id]


# --- linking an invoice to its payment --------------------------------------------------------


# The rank of an `invoice_payment.paid`'s link: a paid payment, as a paid invoice's snapshot.
PAYMENT_LINK_RANK = 3

_RECORDED_PAYMENTS = text(
    """
    SELECT stripe_invoice_id, charge_id, payment_intent_id, event_created, event_id
    FROM marketplace_worker.stripe_invoice_payments
    WHERE stripe_invoice_id = ANY(CAST(:stripe_invoice_ids AS text[])) AND status = 'paid'
    ORDER BY event_created, event_id
    """
)


_LINKS = ("stripeChargeId", "stripePaymentIntentId")

# A link's version advanced and the payment locks of `:keys` taken, in one statement.
_ADVANCE_LINK = versions.advancing(None, also=f"({_LOCKING_SQL})")


def payment_links(stripe_invoice_id: str | None, charge_id: str | None,
                  payment_intent_id: str | None) -> list[tuple[str, str | None]]:
    """The version key of each of an invoice's payment links (`stripe_object_versions`), with
    the value a source gives it."""
    return [(f"{stripe_invoice_id}#{column}", value) for column, value in zip(_LINKS, (charge_id, payment_intent_id))]


def link_payment(
    session: Session, invoice: Invoice, charge_id: str | None, payment_intent_id: str | None,
    created: int, event_id: str, rank: int, *, newer: dict[str, bool] | None = None,
) -> bool:
    """Link the (locked) invoice to the charge and PaymentIntent that paid it, from whatever
    told: an invoice snapshot, an `invoice_payment.paid`, a read of Stripe's invoice payments.
    Each link follows the newest source that names one (a retried payment changes the charge).
    Returns whether a link is new; the caller then brings the refunds up to date.
    `newer`: the links' versions the caller has already advanced (`versions.advance_all`).

    The locks of the payments a link would change to are taken with the first version this
    advances (any that ends up unchanged was locked for nothing), else after the caller's."""
    advanced = dict(newer or {})
    links = [(column, key, value) for column, (key, value)
             in zip(_LINKS, payment_links(invoice.stripeInvoiceId, charge_id, payment_intent_id)) if value]
    unlocked = [value for column, _, value in links if getattr(invoice, column) != value]
    new_links = []
    for column, key, value in links:
        if key not in advanced:
            advanced[key], _ = versions.advance_writing_seeing(
                session, _ADVANCE_LINK, key, "invoice_link", created, event_id, rank, keys=_payment_keys(unlocked))
            unlocked = []
        if advanced[key] and getattr(invoice, column) != value:
            setattr(invoice, column, value)
            new_links.append(value)
    if new_links:
        invoice.updatedAt = utcnow()
        with session.no_autoflush:  # neither reads the invoice: its new links and charge go out in one UPDATE
            lock_payments(session, unlocked)
            if invoice.stripeChargeId is None and invoice.stripePaymentIntentId is not None:
                _charge_from_facts(session, invoice)
    return bool(new_links)


def recorded_payments(session: Session, stripe_invoice_ids: list[str]) -> dict[str, list[Row]]:
    """The `invoice_payment.paid` recorded for invoices about to become known by these Stripe
    ids (their mirror fills them), by Stripe id, oldest first: for `link_recorded_payments`.
    All in one read, under the locks that pair with `apply_invoice_payment`'s second look,
    taken in one go."""
    if not stripe_invoice_ids:
        return {}
    _lock_keys(session, [key for stripe_id in stripe_invoice_ids
                         for key in PaymentRefs.of_stripe_invoice(stripe_id).lock_keys])
    recorded: dict[str, list[Row]] = {}
    for payment in session.execute(_RECORDED_PAYMENTS, {"stripe_invoice_ids": stripe_invoice_ids}):
        recorded.setdefault(payment.stripe_invoice_id, []).append(payment)
    return recorded


def link_recorded_payments(session: Session, invoice: Invoice, recorded: list[Row]) -> bool:
    """Link an invoice that has just become known by its Stripe id to the payments recorded
    before it was (`recorded_payments`); returns whether a link is new."""
    linked = False
    for payment in recorded:
        linked |= link_payment(session, invoice, payment.charge_id, payment.payment_intent_id,
                               payment.event_created, payment.event_id, PAYMENT_LINK_RANK)
    return linked


def _charge_from_facts(session: Session, invoice: Invoice) -> None:
    """A basil invoice names its PaymentIntent, not the charge; a charge of that
    PaymentIntent recorded earlier fills it, as the charge's event would had it come later."""
    charge_id = session.execute(
        select(StripeCharge.charge_id)
        .where(StripeCharge.payment_intent_id == invoice.stripePaymentIntentId)
        .order_by(StripeCharge.charge_id)
        .limit(1)
    ).scalar_one_or_none()
    if charge_id is not None:
        invoice.stripeChargeId = charge_id


def payment_of_invoice(obj: dict[str, Any]) -> tuple[str | None, str | None]:
    """(charge id, PaymentIntent id) of an invoice in either shape: top-level `charge` /
    `payment_intent` before 2025-03-31.basil, `payments.data[].payment` after (only present
    when expanded). A paid payment wins over an open or canceled one."""
    charge_id, payment_intent_id = ref(obj.get("charge")), ref(obj.get("payment_intent"))
    payments = obj.get("payments")
    if isinstance(payments, dict) and isinstance(payments.get("data"), list):
        ranked = sorted(
            (p for p in payments["data"] if isinstance(p, dict)),
            key=lambda p: (p.get("status") != "paid", not p.get("is_default")),
        )
        for item in ranked:
            payment = item.get("payment") or {}
            charge_id = charge_id or ref(payment.get("charge"))
            payment_intent_id = payment_intent_id or ref(payment.get("payment_intent"))
    return charge_id, payment_intent_id


# --- charges, refunds, disputes --------------------------------------------------------------


def _fill_payment_ids(
    session: Session, invoice: Invoice, charge_id: str | None, payment_intent_id: str | None
) -> bool:
    """Fill the invoice's missing payment ids from a charge that names the invoice; returns
    whether one was missing."""
    filled = []
    for column, value in (("stripeChargeId", charge_id), ("stripePaymentIntentId", payment_intent_id)):
        if value and getattr(invoice, column) is None:
            setattr(invoice, column, value)
            filled.append(value)
    if filled:
        invoice.updatedAt = utcnow()
        lock_payments(session, filled)
    return bool(filled)


def _after_payment_fact(invoices: PaymentInvoices, invoice: Invoice | None, what: str, changed: bool) -> Outcome:
    """Bring the invoice's transaction's refunds up to date with a payment fact just recorded;
    `changed`: whether the fact can have changed them (a stale snapshot that links nothing
    cannot: what it would count was counted when the newer one came)."""
    session = invoices.session
    if invoice is None:
        log.info("%s matches no invoice yet; recorded until an invoice is linked to its payment", what)
        return Outcome(skipped="unlinked_payment")
    if not changed:
        return Outcome()
    row = invoices.transaction(invoice)
    if row is None:
        return Outcome(skipped="no_transaction")
    outcome = Outcome(provider_id=row.providerId, refunds_changed=apply_refunds(session, invoice, row))
    invoices.touch(outcome)
    return outcome


# The charge's version advanced and, when newer, its snapshot stored: one statement.
_RECORD_CHARGE = versions.advancing(
    """
    INSERT INTO marketplace_worker.stripe_charges AS c
        (charge_id, payment_intent_id, amount, amount_refunded, refunded, updated_at)
    SELECT :object_id, :payment_intent_id, CAST(:amount AS bigint), CAST(:amount_refunded AS bigint),
           CAST(:refunded AS boolean), now()
    FROM newer
    ON CONFLICT (charge_id) DO UPDATE SET
        payment_intent_id = excluded.payment_intent_id, amount = excluded.amount,
        amount_refunded = excluded.amount_refunded, refunded = excluded.refunded, updated_at = now()
    """
)


def charge_refs(obj: dict[str, Any]) -> PaymentRefs:
    """A charge's own ids, and what it names of its invoice: its `invoice` (before basil), the
    app's `metadata.invoiceId`."""
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return PaymentRefs.of_payment(
        required_id(obj, "charge"), ref(obj.get("payment_intent")),
        stripe_invoice_id=ref(obj.get("invoice")), app_invoice_id=_app_invoice_id(metadata.get("invoiceId")))


def apply_charge(session: Session, obj: dict[str, Any], created: int, event_id: str,
                 invoices: PaymentInvoices | None = None) -> Outcome:
    """A charge snapshot (charge.refunded): its cumulative refunds, newest snapshot wins."""
    refs = charge_refs(obj)
    charge_id, payment_intent_id = refs.charge_id, refs.payment_intent_id
    invoices = invoices or PaymentInvoices(session)
    invoice = invoices.find(refs)
    if invoice is not None and not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    linked = invoice is not None and _fill_payment_ids(session, invoice, charge_id, payment_intent_id)
    newer = versions.advance_writing(
        session, _RECORD_CHARGE, charge_id, "charge", created, event_id, payment_intent_id=payment_intent_id,
        amount=integer(obj, "amount"), amount_refunded=integer(obj, "amount_refunded"),
        refunded=obj.get("refunded") is True)
    return _after_payment_fact(invoices, invoice, f"charge {charge_id}", newer or linked)


def _recording(table: str, key: str, also: str = "NULL") -> TextClause:
    """The statement that advances a refund's or a dispute's version and, when newer, stores
    its snapshot; `also` as `versions.advancing`'s."""
    return versions.advancing(
        f"""
        INSERT INTO marketplace_worker.{table} ({key}, charge_id, payment_intent_id, amount, status, updated_at)
        SELECT :object_id, :charge_id, :payment_intent_id, CAST(:amount AS bigint), :status, now()
        FROM newer
        ON CONFLICT ({key}) DO UPDATE SET
            charge_id = excluded.charge_id, payment_intent_id = excluded.payment_intent_id,
            amount = excluded.amount, status = excluded.status, updated_at = now()
        """,
        also,
    )


_RECORD_REFUND = _recording("stripe_refunds", "refund_id")
# Whether the snapshot replaced was lost. Read under the invoice's lock, which every writer
# that counts this dispute holds (one that finds no invoice counts nothing): no such writer
# can commit between this statement's snapshot and its write.
_RECORD_DISPUTE = _recording("stripe_disputes", "dispute_id", also="""coalesce(
    (SELECT d.status = 'lost' FROM marketplace_worker.stripe_disputes d WHERE d.dispute_id = :object_id), false)""")


def refund_refs(obj: dict[str, Any]) -> PaymentRefs:
    """The payment a refund or a dispute is of (a refund's `charge` is null when its payment
    has none: Stripe names its PaymentIntent)."""
    return PaymentRefs.of_payment(ref(obj.get("charge")), ref(obj.get("payment_intent")))


def apply_refund(session: Session, obj: dict[str, Any], created: int, event_id: str,
                 invoices: PaymentInvoices | None = None) -> Outcome:
    """A refund snapshot (refund.created / refund.updated / ...): amount and status, newest wins."""
    refund_id = required_id(obj, "refund")
    refs = refund_refs(obj)
    charge_id, payment_intent_id = refs.charge_id, refs.payment_intent_id
    if charge_id is None and payment_intent_id is None:
        raise InvalidPayload(f"refund {refund_id} names neither a charge nor a PaymentIntent")
    status = obj.get("status")
    if not isinstance(status, str):
        raise InvalidPayload(f"refund {refund_id} has no status")
    invoices = invoices or PaymentInvoices(session)
    invoice = invoices.find(refs)
    if invoice is not None and not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    newer = versions.advance_writing(
        session, _RECORD_REFUND, refund_id, "refund", created, event_id, 0 if status == "pending" else 1,
        charge_id=charge_id, payment_intent_id=payment_intent_id, amount=integer(obj, "amount"), status=status)
    return _after_payment_fact(invoices, invoice, f"refund {refund_id}", newer)


def apply_dispute(session: Session, obj: dict[str, Any], created: int, event_id: str,
                  invoices: PaymentInvoices | None = None) -> Outcome:
    """A dispute snapshot: its newest status decides whether it holds back completion."""
    dispute_id = required_id(obj, "dispute")
    refs = refund_refs(obj)
    charge_id, payment_intent_id = refs.charge_id, refs.payment_intent_id
    status = obj.get("status")
    if not isinstance(status, str) or (charge_id is None and payment_intent_id is None):
        raise InvalidPayload(f"dispute {dispute_id} lacks a status or a charge")
    invoices = invoices or PaymentInvoices(session)
    invoice = invoices.find(refs)
    if invoice is not None and not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    newer, was_lost = versions.advance_writing_seeing(
        session, _RECORD_DISPUTE, dispute_id, "dispute", created, event_id,
        charge_id=charge_id, payment_intent_id=payment_intent_id, amount=integer(obj, "amount"), status=status)
    if newer and status not in lifecycle.DISPUTE_SETTLED:
        log.warning("dispute %s on charge %s is open (%s)", dispute_id, charge_id, status)
    # A lost dispute counts as a refund of its amount, so only a snapshot that is or replaces a
    # lost one changes what is refunded; a won one undoes nothing counted.
    return _after_payment_fact(invoices, invoice, f"dispute {dispute_id}", newer and (status == "lost" or was_lost))


_RECORD_INVOICE_PAYMENT = versions.advancing(
    """
    INSERT INTO marketplace_worker.stripe_invoice_payments AS p
        (invoice_payment_id, stripe_invoice_id, charge_id, payment_intent_id, status, event_created, event_id,
         updated_at)
    SELECT :object_id, :stripe_invoice_id, :charge_id, :payment_intent_id, :status, CAST(:created AS bigint),
           :event_id, now()
    FROM newer
    ON CONFLICT (invoice_payment_id) DO UPDATE SET
        charge_id = excluded.charge_id, payment_intent_id = excluded.payment_intent_id, status = excluded.status,
        event_created = excluded.event_created, event_id = excluded.event_id, updated_at = now()
    """
)


def invoice_payment_refs(obj: dict[str, Any]) -> PaymentRefs:
    """The Stripe invoice an InvoicePayment pays, the one thing its invoice is found by."""
    stripe_invoice_id = ref(obj.get("invoice"))
    if stripe_invoice_id is None:
        raise InvalidPayload(f"invoice_payment {obj.get('id')} lacks its invoice")
    return PaymentRefs.of_stripe_invoice(stripe_invoice_id)


def apply_invoice_payment(session: Session, obj: dict[str, Any], created: int, event_id: str,
                          invoices: PaymentInvoices | None = None) -> Outcome:
    """An InvoicePayment snapshot (`invoice_payment.paid`): on current API versions the one
    event that says which charge or PaymentIntent paid an invoice. Recorded, then linked to the
    app's invoice if it is known by its Stripe id; else linked when it becomes known."""
    payment_id = required_id(obj, "invoice_payment")
    stripe_invoice_id, status, payment = ref(obj.get("invoice")), obj.get("status"), obj.get("payment")
    if stripe_invoice_id is None or not isinstance(status, str) or not isinstance(payment, dict):
        raise InvalidPayload(f"invoice_payment {payment_id} lacks its invoice, status or payment")
    charge_id, payment_intent_id = ref(payment.get("charge")), ref(payment.get("payment_intent"))
    versions.advance_writing(
        session, _RECORD_INVOICE_PAYMENT, payment_id, "invoice_payment", created, event_id, 1 if status == "paid" else 0,
        stripe_invoice_id=stripe_invoice_id, charge_id=charge_id, payment_intent_id=payment_intent_id, status=status)
    invoices = invoices or PaymentInvoices(session)
    invoice = invoices.find(PaymentRefs.of_stripe_invoice(stripe_invoice_id))
    if invoice is None:
        log.info("invoice payment %s of %s recorded until the app's invoice is known", payment_id, stripe_invoice_id)
        return Outcome(skipped="unknown_invoice")
    if not invoice.isMarketplaceInvoice:
        return Outcome(skipped="not_marketplace")
    if status != "paid" or not link_payment(
            session, invoice, charge_id, payment_intent_id, created, event_id, PAYMENT_LINK_RANK):
        return Outcome()
    return _after_payment_fact(invoices, invoice, f"invoice payment {payment_id}", True)


def apply_charge_link(session: Session, invoice_id: int, charge_id: str, created: int, event_id: str) -> Outcome:
    """The charge of an invoice's PaymentIntent, read from Stripe: link it and count what was
    recorded against it."""
    invoice = session.execute(select(Invoice).where(Invoice.id == invoice_id).with_for_update()).scalar_one_or_none()
    if invoice is None or not link_payment(session, invoice, charge_id, None, created, event_id, PAYMENT_LINK_RANK):
        return Outcome()
    return _after_payment_fact(PaymentInvoices(session), invoice, f"charge {charge_id}", True)
