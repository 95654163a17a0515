"""Event handlers, one module per kind of Stripe object. Importing this package registers
them all: `HANDLERS` is then the one table of handled types (SPEC §2)."""

from domain.handlers import charges, connect, invoices  # noqa: F401
from domain.handlers.registry import HANDLERS, Registered

__all__ = ["HANDLERS", "Registered", "handled_types"]


def handled_types() -> tuple[str, ...]:
    """The event types the worker acts on, read from the registered handlers: the one list,
    which catch-up asks Stripe for. Every other type is stored and ignored."""
    return tuple(sorted(HANDLERS))
