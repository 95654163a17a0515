"""Event handlers, one module per kind of Stripe object; each registers its types with
`domain.dispatch.handles` when imported here."""

from domain.handlers import charges, connect, invoices  # noqa: F401
