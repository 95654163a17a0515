"""Engine and sessions. One engine per process: Celery's prefork children must not
share the parent's connections, so the engine is created lazily after the fork."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import orjson

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from config import get_settings

_engines: dict[tuple[int, str], Engine] = {}

# What work that commits as it goes is given: `session_scope`, or a test's own factory (a
# least-privilege role, a second database). Each call is one transaction.
SessionFactory = Callable[[], AbstractContextManager[Session]]


# A digit run this long may be an integer past 64 bits, which orjson reads as a float. Found
# by mapping every digit to "0" and anything else to a space, then searching: several times
# faster than a regular expression over a 9 KB payload.
_DIGITS = bytes.maketrans(bytes(range(256)), bytes(ord("0") if chr(c).isdigit() and c < 128 else ord(" ")
                                                    for c in range(256)))
_LONG_NUMBER = b"0" * 19


def _json_loads(text: str | bytes) -> Any:
    """jsonb values as the standard parser reads them, several times faster: orjson, except for
    a document with a number orjson could read inexactly (Stripe sends none)."""
    data = text.encode() if isinstance(text, str) else text
    if _LONG_NUMBER not in data.translate(_DIGITS):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:  # what orjson refuses (deep nesting, 1e400): the standard parser's answer
            pass
    return json.loads(data)


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().database_url
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=5,
            # Fail fast when Postgres is down, and never hang on a lock forever.
            connect_args={"connect_timeout": 5, "options": "-c lock_timeout=10000"},
            json_deserializer=_json_loads,
        )
        _engines[key] = engine
    return engine


def dispose_engines() -> None:
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


def make_session(url: str | None = None) -> Session:
    return sessionmaker(get_engine(url), expire_on_commit=False)()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One database transaction: committed on success, rolled back on error."""
    session = make_session(url)
    try:
        with session.begin():
            yield session
    finally:
        session.close()
