"""Reading Stripe for reconciliation: read-only, every list at `limit=100`, through the
platform's client (its rate limiter, the SDK's network retries) with 429s backed off here.

`reader_for` builds the reader the settings call for, wherever reconciliation runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import stripe

from config import Settings
from domain.connect import mirror
from domain.stripe_api import get_client, with_rate_limit_retry
from domain.versions import API_READ_ID

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


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


def reader_for(settings: Settings, client: stripe.StripeClient | None = None) -> StripeReader:
    """A reader on `client` (by default the settings' own) with the settings' 429 backoff and
    concurrency."""
    return StripeReader(client or get_client(settings), settings.stripe_rate_limit_backoff_seconds,
                        settings.reconcile_stripe_concurrency)


# The source charge (and its application fee) ride along with each transfer: the fund flow and
# the fee collected back cost no request of their own.
TRANSFER_EXPAND = ["data.source_transaction.application_fee"]


def list_transfers_and_payouts(reader: StripeReader, account: str, since: int, payouts_since: int,
                               now: int) -> mirror.Listing:
    """The platform's transfers to the account created at or after `since`, and the account's
    payouts created at or after `payouts_since`, as snapshots of `now`."""
    transfers, payouts = reader.map(lambda spec: reader.list_all(*spec), [
        ("transfers", {"destination": account, "created": {"gte": since}, "expand": TRANSFER_EXPAND}, None),
        ("payouts", {"created": {"gte": payouts_since}}, account),
    ])
    return mirror.Listing(
        transfers=[mirror.transfer_row(obj, now, API_READ_ID) for obj in transfers],
        payouts=[mirror.payout_row(account, obj, now, API_READ_ID) for obj in payouts],
    )


def read_after_store(reader: StripeReader, account: str, payout_ids: list[str], payments_since: int | None,
                     fees: list[tuple[str, str, int]]) -> mirror.Listing:
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
    listing = mirror.Listing(itemized=payout_ids)
    for payout_id, bts in zip(payout_ids, done):
        listing.items += [mirror.payout_item_row(account, payout_id, bt) for bt in bts]
    rest = done[len(payout_ids):]
    if payments_since is not None:
        listing.payments = [row for bt in rest.pop(0) if (row := mirror.payment_row(account, bt)) is not None]
    listing.fees = [{"transfer_id": transfer_id, "fee": fee, "reversed_then": reversed_then}
                    for (transfer_id, _, reversed_then), fee in zip(fees, rest)]
    return listing
