"""One Stripe request rate shared by every worker process: a token bucket in Redis.

Each request reserves a token with one atomic script call. The bucket refills at `rate`
tokens per second up to one second's worth (the burst Stripe tolerates); when it is empty
the reservation still succeeds but puts the bucket in debt, and the caller sleeps until its
token would have been minted. Callers are thereby queued in arrival order across processes,
and the aggregate rate never exceeds `rate` plus the initial burst.
"""

from __future__ import annotations

import os
import time

import redis

# KEYS[1]: the bucket. ARGV: rate (tokens/s), capacity. Returns the seconds to wait, as a
# string (Lua numbers returned to Redis are truncated to integers). Redis's own clock is the
# only clock, so workers on hosts with skewed clocks still share one bucket.
_RESERVE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate) - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
local wait = 0
if tokens < 0 then wait = -tokens / rate end
redis.call('PEXPIRE', KEYS[1], math.ceil((wait + capacity / rate) * 1000) + 1000)
return tostring(wait)
"""

DEFAULT_KEY = "marketplace_worker:stripe_rate"

_clients: dict[tuple[int, str], redis.Redis] = {}


def redis_client(url: str) -> redis.Redis:
    """One client per process and URL (a forked child must not reuse its parent's sockets)."""
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return client


class TokenBucket:
    def __init__(self, client: redis.Redis, rate_per_s: float, key: str = DEFAULT_KEY) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s)
        self.key = key
        self._reserve = client.register_script(_RESERVE)

    def reserve(self) -> float:
        """Take a token; the seconds the caller must wait before using it."""
        return float(self._reserve(keys=[self.key], args=[self.rate, self.capacity]))

    def acquire(self) -> float:
        """Block until a token is ours; returns how long that took."""
        wait = self.reserve()
        if wait > 0:
            time.sleep(wait)
        return wait
