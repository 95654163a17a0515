"""What can go wrong applying a Stripe fact, and how a failure is written down.

A leaf: every domain module may raise these; it imports nothing else of `domain/`.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError, DBAPIError


class NotYetKnown(Exception):
    """The event refers to something the database does not hold yet (an invoice the app
    has not committed): retried with backoff, then parked, never dropped."""


class InvalidPayload(Exception):
    """The event cannot be applied as it is: parked at once with this message."""


def is_permanent(error: BaseException) -> bool:
    """Failures that no retry can fix: park the event at once with its message.

    A payload whose fields have the wrong shape, or a value the database refuses (a number
    beyond bigint), fails the same way every time.
    """
    return isinstance(error, (InvalidPayload, DataError, KeyError, TypeError, AttributeError))


def describe(error: BaseException) -> str:
    """One line for `last_error`: the kind of failure and its first line, never a payload.

    A database error names the driver's own error and its message, not SQLAlchemy's wrapping
    (whose first line may be a note about autoflush instead of the cause)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    first = (str(cause).strip().splitlines() or [""])[0][:500]
    if cause is not error:
        first = f"({type(cause).__module__}.{type(cause).__name__}) {first}"
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
