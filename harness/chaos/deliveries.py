"""What the chaos run sends the receiver: every event, some twice, in random order, mixed with
hostile requests; and the concurrent client that sends them as Stripe does, retrying a 503 or a
dropped connection."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from harness import stripe_events as se
from harness.chaos.scenario import GeneratedEvent

WEBHOOK_SECRET = "whsec_chaos_platform_0123456789"
CONNECT_WEBHOOK_SECRET = "whsec_chaos_connect_0123456789"
ATTACKER_SECRET = "whsec_attacker_9876543210"
TOLERANCE_SECONDS = 300
MAX_BODY_BYTES = 1024 * 1024
PATHS = {"platform": "/webhooks/stripe", "connect": "/webhooks/stripe/connect"}
SECRETS = {"platform": WEBHOOK_SECRET, "connect": CONNECT_WEBHOOK_SECRET}

# What the receiver must answer to each kind of hostile request (SPEC §2), and the start of
# its error text.
HOSTILE = {
    "forged": (400, "invalid or expired signature"),  # a real event, altered after signing
    "wrong_secret": (400, "invalid or expired signature"),
    "stale": (400, "invalid or expired signature"),  # a replay signed outside the tolerance
    "unsigned": (400, "missing signature"),
    "malformed": (400, "body is not JSON"),  # signed, truncated
    "not_event": (400, "not an event"),
    "oversize": (413, "body too large"),  # a real, correctly signed event padded past the limit
}


@dataclass
class Delivery:
    kind: str  # "genuine" or one of HOSTILE
    event: GeneratedEvent  # the one delivered, or the one a hostile request is made from


@dataclass
class Answer:
    delivery: Delivery
    status: int = 0
    outcome: str = ""  # the answer's "status" on 200, its "error" otherwise
    unavailable: int = 0  # 503s answered before the final answer
    connection_errors: int = 0
    gave_up: bool = False


def build_deliveries(rng: random.Random, events: list[GeneratedEvent], duplicate_rate: float,
                     hostile_rate: float) -> list[Delivery]:
    genuine = [Delivery("genuine", e) for e in events]
    genuine += [Delivery("genuine", e) for e in rng.sample(events, round(len(events) * duplicate_rate))]
    hostile_count = round(len(genuine) * hostile_rate / (1 - hostile_rate))
    kinds = list(HOSTILE)
    hostile = [Delivery(kinds[n % len(kinds)], rng.choice(events)) for n in range(hostile_count)]
    deliveries = genuine + hostile
    rng.shuffle(deliveries)
    return deliveries


def request_for(delivery: Delivery, now: int) -> tuple[str, bytes, dict[str, str]]:
    """Path, body and headers of one delivery attempt, signed at send time as Stripe signs."""
    event = delivery.event
    path, secret, body = PATHS[event.endpoint], SECRETS[event.endpoint], event.body
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "Stripe/1.0 (chaos)"}
    kind = delivery.kind
    timestamp = now
    if kind == "forged":
        data = json.loads(body)
        obj = data["data"]["object"]
        obj["amount"] = obj["amount_paid"] = obj["amount_refunded"] = 1  # whichever it carries
        headers["Stripe-Signature"] = se.sign(body, secret, timestamp)
        return path, se.encode(data), headers
    if kind == "wrong_secret":
        secret = ATTACKER_SECRET
    elif kind == "stale":
        timestamp = now - TOLERANCE_SECONDS - 60
    elif kind == "malformed":
        body = body[: len(body) // 2]
    elif kind == "not_event":
        body = json.dumps({"object": "list", "data": [], "has_more": False}).encode()
    elif kind == "oversize":
        body = body + b" " * (MAX_BODY_BYTES + 1 - len(body))  # still valid JSON
    if kind != "unsigned":
        headers["Stripe-Signature"] = se.sign(body, secret, timestamp)
    return path, body, headers


class Client:
    """Posts deliveries concurrently, retrying 503s and dropped connections as Stripe does."""

    def __init__(self, url: str, deliveries: list[Delivery], *, concurrency: int, rate: float | None,
                 seed: int, give_up_after: float = 600.0) -> None:
        self.url = url
        self.deliveries = deliveries
        self.concurrency = concurrency
        self.rate = rate
        self.rng = random.Random(seed)
        self.give_up_after = give_up_after
        self.answers: list[Answer] = [Answer(d) for d in deliveries]
        self.done = 0
        self.last_answer_at = 0.0

    def run(self) -> list[Answer]:
        asyncio.run(self._run())
        return self.answers

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as http:
            queue = iter(range(len(self.deliveries)))
            started = time.monotonic()

            async def sender() -> None:
                for index in queue:
                    if self.rate:
                        delay = started + index / self.rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await self._deliver(http, self.answers[index])
                    self.done += 1
                    self.last_answer_at = time.monotonic()

            await asyncio.gather(*(sender() for _ in range(self.concurrency)))

    async def _deliver(self, http, answer: Answer) -> None:
        import httpx

        deadline = time.monotonic() + self.give_up_after
        while True:
            path, body, headers = request_for(answer.delivery, int(time.time()))
            try:
                response = await http.post(path, content=body, headers=headers)
            except httpx.TransportError:
                answer.connection_errors += 1
            else:
                if response.status_code != 503:
                    answer.status = response.status_code
                    try:
                        payload = response.json()
                        answer.outcome = payload.get("status") or payload.get("error", "")
                    except ValueError:  # not the receiver's JSON: recorded as it came, a wrong answer
                        answer.outcome = response.text[:200]
                    return
                answer.unavailable += 1
            if time.monotonic() > deadline:
                answer.gave_up = True
                return
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
