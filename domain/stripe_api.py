"""The one way the worker talks to Stripe's API: the real SDK, configured from settings.

Every HTTP request, the SDK's own retries included, first takes a token from the Redis
bucket shared by all worker processes (STRIPE_RATE_LIMIT_PER_S), so the worker as a whole
stays under Stripe's rate limit however many processes run.

stripe-python's StripeClient makes no retries unless told to, and never retries a
plain 429: callers wrap calls with `with_rate_limit_retry`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import stripe

from config import ConfigError, Settings, get_settings
from domain.rate_limit import TokenBucket, redis_client

T = TypeVar("T")


class RateLimitedHTTPClient(stripe.RequestsClient):
    """The SDK's default HTTP client, paced by a shared token bucket."""

    def __init__(self, bucket: TokenBucket, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bucket = bucket

    def request(self, *args: Any, **kwargs: Any):
        self.bucket.acquire()
        return super().request(*args, **kwargs)

    def request_stream(self, *args: Any, **kwargs: Any):
        self.bucket.acquire()
        return super().request_stream(*args, **kwargs)


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
