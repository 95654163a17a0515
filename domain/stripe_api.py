"""The one way the worker talks to Stripe's API: the real SDK, configured from settings.

stripe-python's StripeClient makes no retries unless told to, and never retries a
plain 429: callers that page through lists wrap calls with `with_rate_limit_retry`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import stripe

from config import ConfigError, Settings, get_settings

T = TypeVar("T")


def get_client(settings: Settings | None = None) -> stripe.StripeClient:
    settings = settings or get_settings()
    if settings.stripe_api_key is None:
        raise ConfigError("configuration error: STRIPE_API_KEY is not set")
    options: dict = {"max_network_retries": settings.stripe_max_network_retries}
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
