"""The chaos run's report: what was delivered and answered, the faults, what the audit and the
comparison with the reference found, and the verdict."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from harness.chaos.deliveries import HOSTILE, Answer
from harness.chaos.faults import FaultRecord
from harness.chaos.reference import Mismatch, ReferenceResult

if TYPE_CHECKING:
    from harness.chaos.run import ChaosConfig


@dataclass
class ChaosReport:
    config: ChaosConfig
    seed: int
    scenario_summary: str
    deliveries: int
    answers: list[Answer]
    faults: list[FaultRecord]
    statuses: dict[str, int]
    parked: list[tuple[str, str, str]]
    lost: list[str]
    never_accepted: list[str]
    hostile_stored: list[str]
    applied_twice: list[str]
    sweeps: tuple[int, int]  # sweeper runs, events it re-enqueued
    tables_compared: list[str]
    mismatches: list[Mismatch]
    oracle: list[str]
    unlinkable_refunds: int
    reference: ReferenceResult
    drained: bool
    drain_after_last_fault: float
    drain_after_last_delivery: float
    delivery_seconds: float
    total_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.drained and not self.lost and not self.never_accepted and not self.applied_twice
                and not self.mismatches and not self.wrong_answers() and not self.hostile_stored
                and not self.oracle)

    @property
    def accepted(self) -> list[Answer]:
        return [a for a in self.answers if a.delivery.kind == "genuine" and a.status == 200]

    def wrong_answers(self) -> list[Answer]:
        """Hostile requests not refused as they must be, genuine ones refused."""
        wrong = []
        for a in self.answers:
            if a.delivery.kind == "genuine":
                if a.status != 200:
                    wrong.append(a)
            else:
                code, reason = HOSTILE[a.delivery.kind]
                if a.status != code or not a.outcome.startswith(reason):
                    wrong.append(a)
        return wrong

    def format(self) -> str:
        c = self.config
        out = [f"chaos run, seed {self.seed}: {self.scenario_summary}"]
        genuine = [a for a in self.answers if a.delivery.kind == "genuine"]
        hostile = [a for a in self.answers if a.delivery.kind != "genuine"]
        out.append(f"deliveries: {self.deliveries} in {self.delivery_seconds:.1f} s "
                   f"({len(genuine)} genuine incl. {round(c.duplicate_rate * 100)} % duplicates, "
                   f"{len(hostile)} hostile), random order, {c.client_concurrency} concurrent, "
                   f"{c.workers} workers x {c.worker_concurrency}")
        out.append("faults:")
        out += [f"  {f.at:7.1f} s  {f.kind:<16} {f.detail} (back after {f.seconds:.1f} s)" for f in self.faults]
        accepted = Counter(a.outcome for a in self.accepted)
        retried = [a for a in genuine if a.unavailable or a.connection_errors]
        distinct = len({a.delivery.event.id for a in self.accepted})
        out.append(f"events accepted: {distinct} distinct events; {len(self.accepted)} deliveries answered 200 "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(accepted.items()))}), "
                   f"{len(retried)} of them after a 503 (or a cut connection), retried as Stripe does "
                   f"({sum(a.unavailable for a in genuine)} 503 answers, "
                   f"{sum(a.connection_errors for a in genuine)} connection errors)")
        out.append("rejected, by reason:")
        by_reason = defaultdict(Counter)
        for a in self.answers:
            if a.status != 200:
                by_reason[(a.status, a.outcome)][a.delivery.kind] += 1
        for (status, reason), kinds in sorted(by_reason.items()):
            verdict = []
            for kind, n in sorted(kinds.items()):
                right = kind != "genuine" and HOSTILE[kind][0] == status and reason.startswith(HOSTILE[kind][1])
                verdict.append(f"{kind} {n} {'(right)' if right else '(WRONG)'}")
            out.append(f"  {status} {reason!r}: {', '.join(verdict)}")
        unavailable = [a for a in self.answers if a.unavailable]
        if unavailable:
            kinds = Counter(a.delivery.kind for a in unavailable)
            right = all(a.delivery.kind == "genuine" and a.status == 200 for a in unavailable)
            out.append(f"  503 'temporarily unavailable' (database down): {sum(a.unavailable for a in unavailable)} "
                       f"answers to {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))} deliveries, each "
                       f"retried until accepted {'(right)' if right else '(WRONG)'}")
        wrong = self.wrong_answers()
        out.append(f"  hostile requests not refused as they must be: "
                   f"{sum(1 for a in wrong if a.delivery.kind != 'genuine')}; "
                   f"genuine deliveries refused: {sum(1 for a in wrong if a.delivery.kind == 'genuine')}; "
                   f"hostile requests stored: {len(self.hostile_stored)}")
        out.append(f"inbox after the drain: {', '.join(f'{k} {v}' for k, v in sorted(self.statuses.items()))}")
        out.append(f"processed: {self.statuses.get('processed', 0)} (+ {self.statuses.get('ignored', 0)} "
                   f"ignored: types the worker does not act on)")
        out.append(f"sweeper: {self.sweeps[0]} runs re-enqueued {self.sweeps[1]} events whose messages were lost")
        out.append(f"parked: {len(self.parked)}")
        out += [f"  {event_id} {event_type}: {error}" for event_id, event_type, error in self.parked[:20]]
        out.append(f"lost (accepted, then missing or unprocessed): {len(self.lost)}"
                   + (f" {self.lost[:10]}" if self.lost else ""))
        if self.never_accepted:
            out.append(f"genuine events never accepted (client gave up): {len(self.never_accepted)}")
        out.append(f"applied twice: {len(self.applied_twice)}")
        out += [f"  {line}" for line in self.applied_twice[:10]]
        out.append(f"state mismatches vs the reference: {len(self.mismatches)} tables differ "
                   f"(compared: {', '.join(self.tables_compared)})")
        out += [f"  {m.describe()}" for m in self.mismatches]
        out.append(f"reference: {self.reference.processed} accepted distinct events processed once, in order, "
                   f"in {self.reference.seconds:.1f} s; {len(self.reference.failures)} failed there")
        out.append(f"oracle (expected outcome of each invoice, from the histories alone): "
                   f"{len(self.oracle)} differences")
        same_second = [line for line in self.oracle if "in one second" in line]
        out += [f"  {line}" for line in [line for line in self.oracle if line not in same_second][:10]]
        if same_second:
            out.append(f"  {len(same_second)} of them: the \"Invoice\" mirror of a paid invoice whose events all share "
                       f"one second keeps the snapshot with the greatest (random) event id, e.g.")
            out += [f"    {line}" for line in same_second[:3]]
        if self.unlinkable_refunds:
            out.append(f"  not checked: {self.unlinkable_refunds} refunded invoices on 2025-03-31.basil endpoints, whose "
                       f"webhooks never name their payment (no `payments` unexpanded, no invoice_payment.paid "
                       f"before 2025-05-28): the poller links those from the API (tests/test_polling.py), and it "
                       f"does not run here")
        out.append(f"time to drain after the last fault: {self.drain_after_last_fault:.1f} s "
                   f"(after the last delivery: {self.drain_after_last_delivery:.1f} s)"
                   + ("" if self.drained else " -- DID NOT DRAIN"))
        out.append(f"total {self.total_seconds:.0f} s; verdict: {'OK' if self.ok else 'FAILED'}")
        out += self.notes
        return "\n".join(out)
