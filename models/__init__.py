"""SQLAlchemy models: the main app's tables as Prisma made them, and the worker's own
tables in the `marketplace_worker` schema. Importing this package registers all of them."""

from models.app import (
    Invoice,
    Message,
    MessageThread,
    Provider,
    Review,
    ServiceListing,
    Tenant,
    Transaction,
    User,
)
from models.base import WORKER_SCHEMA, Base
from models.inbox import StripeEvent
from models.ledger import StripeCharge, StripeDispute, StripeRefund, TouchedProvider, TransactionRefund
from models.state import ObjectVersion, Watermark

__all__ = [
    "WORKER_SCHEMA",
    "Base",
    "Invoice",
    "Message",
    "MessageThread",
    "ObjectVersion",
    "Provider",
    "Review",
    "ServiceListing",
    "StripeCharge",
    "StripeDispute",
    "StripeEvent",
    "StripeRefund",
    "Tenant",
    "TouchedProvider",
    "Transaction",
    "TransactionRefund",
    "User",
    "Watermark",
]
