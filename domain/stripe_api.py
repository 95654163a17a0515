"""The one way the worker talks to Stripe's API: the real SDK, configured from settings.

Every HTTP request, the SDK's own retries included, first takes a token from the Redis
bucket shared by all worker processes (STRIPE_RATE_LIMIT_PER_S), so the worker as a whole
stays under Stripe's rate limit however many processes run.

stripe-python's StripeClient makes no retries unless told to, and never retries a
plain 429: callers wrap calls with `with_rate_limit_retry`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import stripe

from config import ConfigError, Settings, get_settings
from domain.rate_limit import TokenBucket, redis_client

T = TypeVar("T")


# Told of every HTTP request to Stripe: its endpoint kind (`endpoint_kind`) and the answer's
# status, None when none came. The worker's metrics set it (tasks/metrics.py).
request_observer: Callable[[str, int | None], None] | None = None

_KIND = re.compile(r"^/v1/([a-z_]+)")


def endpoint_kind(url: str) -> str:
    """`https://api.stripe.com/v1/invoices/in_1/pay?x=1` -> `invoices`: the resource, never an id."""
    kind = _KIND.match(urlsplit(url).path)
    return kind[1] if kind else "other"


class RateLimitedHTTPClient(stripe.RequestsClient):
    """The SDK's default HTTP client, paced by a shared token bucket."""

    def __init__(self, bucket: TokenBucket, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket

    def request(self, method: str, url: str, *args: Any, **kwargs: Any):
        self.bucket.acquire()
        return _observed(url, super().request, method, url, *args, **kwargs)

    def request_stream(self, method: str, url: str, *args: Any, **kwargs: Any):
        self.bucket.acquire()
        return _observed(url, super().request_stream, method, url, *args, **kwargs)


def _observed(url: str, send: Callable[..., tuple], *args: Any, **kwargs: Any) -> tuple:
    observer = request_observer
    if observer is None:
        return send(*args, **kwargs)
    status = None
    try:
        response = send(*args, **kwargs)
        status = response[1]
        return response
    finally:
        observer(endpoint_kind(url), status)


def shared_bucket(settings: Settings | None = None) -> TokenBucket:
    settings = settings or get_settings()
    return TokenBucket(redis_client(settings.redis_url), settings.stripe_rate_limit_per_s)


def get_client(settings: Settings | None = None, bucket: TokenBucket | None = None) -> stripe.StripeClient:
    settings = settings or get_settings()
    if settings.stripe_api_key is None:
        raise ConfigError("configuration error: STRIPE_API_KEY is not set")
    options: dict = {
        "max_network_retries": settings.stripe_max_network_retries,
        "http_client": RateLimitedHTTPClient(bucket or shared_bucket(settings)),
    }
    if settings.stripe_api_base:
        options["base_addresses"] = {"api": settings.stripe_api_base}
    return stripe.StripeClient(settings.stripe_api_key.get_secret_value(), **options)


def with_rate_limit_retry(call: Callable[[], T], attempts: int = 6, base: float = 0.5, cap: float = 8.0) -> T:
    """Run `call`, backing off exponentially with jitter on Stripe's 429."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except stripe.RateLimitError:
            if attempt == attempts:
                raise
            time.sleep(random.uniform(base, min(cap, base * 2**attempt)))
    raise AssertionError("unreachable")
