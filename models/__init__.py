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
from models.backfill import BackfillCursor
from models.base import WORKER_SCHEMA, Base
from models.connect import (
    ConnectAccount,
    ConnectPayout,
    ConnectPayoutItem,
    ConnectTransfer,
    DiscrepancyChange,
    DiscrepancyState,
    ReconcileDiscrepancy,
    ReconcileDiscrepancyEvent,
)
from models.catchup import CatchupWindow, ConnectAccountState
from models.fanout import FanoutItem
from models.inbox import Endpoint, EventStatus, StripeEvent
from models.jobs import JobOutcome, JobRun
from models.ledger import (
    InvoiceTransaction,
    StripeCharge,
    StripeDispute,
    StripeInvoicePayment,
    StripeRefund,
    TouchedProvider,
    TransactionRefund,
)
from models.state import ObjectVersion, StripeInvoiceRead, Watermark
from models.stats import ProviderStatsRecomputed, ProviderStatsStaged

__all__ = [
    "WORKER_SCHEMA",
    "BackfillCursor",
    "Base",
    "CatchupWindow",
    "ConnectAccount",
    "ConnectAccountState",
    "ConnectPayout",
    "ConnectPayoutItem",
    "ConnectTransfer",
    "DiscrepancyChange",
    "DiscrepancyState",
    "Endpoint",
    "EventStatus",
    "FanoutItem",
    "Invoice",
    "InvoiceTransaction",
    "JobOutcome",
    "JobRun",
    "Message",
    "MessageThread",
    "ObjectVersion",
    "Provider",
    "ProviderStatsRecomputed",
    "ProviderStatsStaged",
    "ReconcileDiscrepancy",
    "ReconcileDiscrepancyEvent",
    "Review",
    "ServiceListing",
    "StripeCharge",
    "StripeDispute",
    "StripeEvent",
    "StripeInvoicePayment",
    "StripeInvoiceRead",
    "StripeRefund",
    "Tenant",
    "TouchedProvider",
    "Transaction",
    "TransactionRefund",
    "User",
    "Watermark",
]
