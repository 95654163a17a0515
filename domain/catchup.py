"""Catch-up from Stripe's events API: events an endpoint never received (the receiver was
down, a secret was wrong, Stripe gave up retrying) are stored through the same inbox path
as a webhook.

Scopes. The platform's events and each connected account's live apart in Stripe: `GET
/v1/events` with the platform's key lists the platform's own events only, a connected
account's need `Stripe-Account: acct_...` (Stripe's Connect webhooks and "Making API calls
for connected accounts" pages; the list's filters, stripe 16's EventListParams, are
`created`, `type`, `types` (at most 20) and `delivery_success`, none of which selects
accounts). So there is no single platform-level call that covers connected accounts, and
listing every account every run costs one call (or more) per account: ~2,000 calls per run at
2,000 accounts, past ~9k accounts more than a run's time at the shared rate.

What a run lists:
- the platform, every run: one call per 20 handled types (plus pages);
- a connected account only while its window is flagged (`catchup_windows.pending_at`):
  * when the Connect endpoint shows a gap, every account is flagged once: a delivery that
    arrived late (Stripe retrying after the endpoint failed; its `created` is when the gap
    began), the endpoint silent for CONNECT_SILENCE_SECONDS while the platform endpoint was
    not, or the very first run;
  * an account whose listing failed stays flagged and is retried with backoff;
  * an operator flags accounts with `marketplace-worker catch-up [--account] [--since]`.
  One Connect endpoint serves every account, so a gap in its deliveries is a gap for all of
  them, and a healthy endpoint delivers every account's events: the steady state costs the
  platform's calls only, whatever the number of accounts.

Windows. Each scope has its own window, so webhooks on one endpoint never hide a gap on the
other: it starts a few minutes before the end of the scope's last complete listing, or, for a
scope never listed, an hour before the scope's newest event received by webhook (events stored
by catch-up itself do not count), and reaches back further when a gap or an operator says so;
never beyond Stripe's 30 days. Events listed twice are deduplicated by id.

The newest webhook alone would not do once a scope has been listed: after an outage, the first
fresh delivery would move the window past the events the outage lost. The end of the last
complete listing never does.

Failures. One scope's error (403 of a deauthorized account, any StripeError) is logged,
counted and recorded on its window; the run carries on with the others. Accounts whose
newest snapshot is `account.application.deauthorized` are not listed at all. Only a 401 (the
platform's own key) stops the run, since no listing can succeed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import stripe
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from config import get_settings
from domain.connect.accounts import AccountReads, read_accounts
from domain.handlers import HANDLERS, handled_types
from domain.inbox import INSERT_EVENTS_SQL, IncomingEvent, event_from_dict, insert_params
from domain.stripe_api import with_rate_limit_retry
from models import ConnectAccountState, EventStatus, Provider
from models.db import SessionFactory

log = logging.getLogger(__name__)

PLATFORM = "platform"
STRIPE_RETENTION_SECONDS = 30 * 24 * 3600
# Before a scope's newest webhook: deliveries around an outage arrive out of order.
OVERLAP_SECONDS = 3600
# Before the end of a complete listing: only for events that reach the list a little late.
LISTED_OVERLAP_SECONDS = 300
TYPES_PER_CALL = 20  # Stripe's limit for the `types` filter
# A Connect delivery received this long after its event was created was a retry: the
# endpoint failed from then on.
LATE_DELIVERY_SECONDS = 600
# No Connect delivery for this long while the platform endpoint got some: the Connect
# endpoint is presumed broken (a wrong secret, say) and every account is listed.
CONNECT_SILENCE_SECONDS = 2 * 3600
# Connected accounts listed per run; flagged ones left over keep their flag for the next run.
ACCOUNTS_PER_RUN = 3000
# A scope whose listing failed is retried after this, doubling per failure, at most 6 h.
RETRY_BASE_SECONDS = 600
RETRY_MAX_SECONDS = 6 * 3600
# Deliveries committed this recently may still be invisible: the examined range stops short.
COMMIT_LAG_SECONDS = 30

DELIVERIES_WATERMARK = "catchup:connect_deliveries"
SILENCE_WATERMARK = "catchup:connect_silence"


@dataclass
class CatchUpResult:
    listed: int = 0
    stored: list[str] = field(default_factory=list)
    calls: int = 0  # Stripe requests made by the listings
    scopes: list[str] = field(default_factory=list)  # scopes listed successfully
    failed: dict[str, str] = field(default_factory=dict)  # scope -> error
    gap: str | None = None  # why every connected account was flagged this run
    reads: AccountReads = field(default_factory=AccountReads)

    def counts(self) -> dict[str, int]:
        return {"listed": self.listed, "stored": len(self.stored), "calls": self.calls,
                "scopes": len(self.scopes), "failed": len(self.failed),
                "accounts_read": self.reads.read, "account_reads_failed": len(self.reads.failed)}


# --- which scopes ----------------------------------------------------------------------------


def connect_accounts(session: Session) -> list[str]:
    """Accounts of stripe_connect providers, except the deauthorized ones."""
    return list(
        session.execute(
            select(Provider.stripeConnectAccountId)
            .outerjoin(ConnectAccountState, ConnectAccountState.account == Provider.stripeConnectAccountId)
            .where(Provider.paymentMode == "stripe_connect", Provider.stripeConnectAccountId.is_not(None),
                   ConnectAccountState.deauthorized.is_not(True))
            .order_by(Provider.stripeConnectAccountId)
        ).scalars()
    )


def is_deauthorized(session: Session, account: str) -> bool:
    return session.execute(
        select(ConnectAccountState.deauthorized).where(ConnectAccountState.account == account)
    ).scalar() is True


_FLAG = text(
    """
    INSERT INTO marketplace_worker.catchup_windows AS w (scope, pending_at, pending_reason, list_from)
    SELECT scope, now(), :reason, :list_from FROM unnest(CAST(:scopes AS text[])) AS scope
    ON CONFLICT (scope) DO UPDATE SET
        pending_at = coalesce(w.pending_at, excluded.pending_at),
        pending_reason = excluded.pending_reason,
        list_from = CASE WHEN :force THEN excluded.list_from
                         ELSE least(coalesce(w.list_from, excluded.list_from), excluded.list_from) END,
        retry_at = CASE WHEN :force THEN NULL ELSE w.retry_at END,
        updated_at = now()
    """
)


def flag(session: Session, scopes: list[str], reason: str, *, list_from: int | None = None,
         force: bool = False) -> None:
    """Mark scopes to be listed, reaching back at least to `list_from`; `force` (an operator)
    lists them on the next run even while a failure's backoff lasts, from exactly `list_from`."""
    if scopes:
        session.execute(_FLAG, {"scopes": scopes, "reason": reason, "list_from": list_from, "force": force})


_DELIVERIES = text(
    """
    SELECT max(received_at) AS newest,
           min(created) FILTER (WHERE received_at > to_timestamp(created) + make_interval(secs => :late)) AS late_from
    FROM marketplace_worker.stripe_events
    WHERE status = ANY(CAST(:statuses AS text[])) AND endpoint = :endpoint
      AND received_at > :after AND received_at <= :upto
    """
)
_WATERMARK = text("SELECT position_at AT TIME ZONE 'UTC' FROM marketplace_worker.watermarks WHERE name = :name")
_SAVE_WATERMARK = text(
    """
    INSERT INTO marketplace_worker.watermarks (name, position_at, updated_at)
    VALUES (:name, CAST(:at AS timestamptz) AT TIME ZONE 'UTC', now())
    ON CONFLICT (name) DO UPDATE SET position_at = excluded.position_at, updated_at = now()
    """
)


def _deliveries(session: Session, endpoint: str, after, upto):
    # (status, received_at) is the inbox's index: one range per status.
    return session.execute(_DELIVERIES, {"statuses": list(EventStatus), "endpoint": endpoint,
                                         "late": LATE_DELIVERY_SECONDS, "after": after, "upto": upto}).one()


def detect_connect_gap(session: Session, now: int) -> tuple[str, int | None] | None:
    """Whether the Connect endpoint's deliveries since the last run show a gap: (why, where the
    gap may begin) or None. A few index range reads; no Stripe call."""
    upto = datetime.fromtimestamp(now - COMMIT_LAG_SECONDS, UTC)
    checked = session.execute(_WATERMARK, {"name": DELIVERIES_WATERMARK}).scalar()
    session.execute(_SAVE_WATERMARK, {"name": DELIVERIES_WATERMARK, "at": upto})
    if checked is None:
        return "first catch-up run", None
    if checked < upto:
        late = _deliveries(session, "connect", checked, upto)
        if late.late_from is not None:
            return "a Connect delivery arrived late (the endpoint failed)", late.late_from
    silence = timedelta(seconds=CONNECT_SILENCE_SECONDS)
    if _deliveries(session, "connect", upto - silence, upto).newest is not None:
        return None
    if _deliveries(session, "platform", upto - silence, upto).newest is None:
        return None  # both quiet: nothing says the Connect endpoint missed anything
    swept = session.execute(_WATERMARK, {"name": SILENCE_WATERMARK}).scalar()
    if swept is not None and swept > upto - silence:
        return None  # listed every account less than a silence ago
    session.execute(_SAVE_WATERMARK, {"name": SILENCE_WATERMARK, "at": upto})
    return f"no Connect delivery for {CONNECT_SILENCE_SECONDS // 3600} h while the platform endpoint got some", None


# --- windows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    scope: str
    since: int


_WINDOWS = text(
    """
    SELECT scope, listed_until, list_from FROM marketplace_worker.catchup_windows
    WHERE scope = ANY(CAST(:scopes AS text[])) AND pending_at IS NOT NULL
      AND (retry_at IS NULL OR retry_at <= now())
    ORDER BY pending_at, scope
    LIMIT :limit
    """
)
_PLATFORM_WINDOW = text(
    "SELECT listed_until, list_from FROM marketplace_worker.catchup_windows WHERE scope = :scope"
)
# Webhook-delivered events only: what catch-up stored itself says nothing of the endpoint.
_NEWEST_PLATFORM = text(
    "SELECT max(created) FROM marketplace_worker.stripe_events WHERE account IS NULL AND endpoint <> 'catchup'"
)
_NEWEST_ACCOUNTS = text(
    """
    SELECT account, max(created) FROM marketplace_worker.stripe_events
    WHERE account = ANY(CAST(:accounts AS text[])) AND endpoint <> 'catchup' AND created >= :floor
    GROUP BY account
    """
)


def window_start(listed_until: int | None, newest_webhook: int | None, list_from: int | None, now: int) -> int:
    """Where a scope's listing starts: an overlap before what was listed completely, else before
    the scope's newest webhook; earlier when a gap or an operator says so; never before the
    30 days Stripe keeps."""
    oldest_allowed = now - STRIPE_RETENTION_SECONDS + 60
    if listed_until is not None:
        start = listed_until - LISTED_OVERLAP_SECONDS
    elif newest_webhook is not None:
        start = newest_webhook - OVERLAP_SECONDS
    else:
        start = oldest_allowed
    if list_from is not None:
        start = min(start, list_from)
    return max(oldest_allowed, start)


def platform_window(session: Session, now: int) -> Window:
    row = session.execute(_PLATFORM_WINDOW, {"scope": PLATFORM}).first()
    listed_until, list_from = (row.listed_until, row.list_from) if row else (None, None)
    newest = session.execute(_NEWEST_PLATFORM).scalar() if listed_until is None else None
    return Window(PLATFORM, window_start(listed_until, newest, list_from, now))


def account_windows(session: Session, accounts: list[str], now: int, limit: int = ACCOUNTS_PER_RUN) -> list[Window]:
    """The flagged accounts among `accounts` that are due, oldest flag first."""
    rows = session.execute(_WINDOWS, {"scopes": accounts, "limit": limit}).all()
    never_listed = [r.scope for r in rows if r.listed_until is None]
    newest: dict[str, int] = {}
    if never_listed:
        oldest_allowed = now - STRIPE_RETENTION_SECONDS
        newest = dict(session.execute(_NEWEST_ACCOUNTS, {"accounts": never_listed, "floor": oldest_allowed}).all())
    return [Window(r.scope, window_start(r.listed_until, newest.get(r.scope), r.list_from, now)) for r in rows]


_LISTED = text(
    """
    INSERT INTO marketplace_worker.catchup_windows AS w (scope, listed_until)
    VALUES (:scope, CAST(:started AS bigint))
    ON CONFLICT (scope) DO UPDATE SET
        listed_until = greatest(w.listed_until, excluded.listed_until),
        -- a flag raised while this listing ran is for a later one
        list_from = CASE WHEN w.pending_at <= to_timestamp(:started_at) THEN NULL ELSE w.list_from END,
        pending_reason = CASE WHEN w.pending_at <= to_timestamp(:started_at) THEN NULL ELSE w.pending_reason END,
        pending_at = CASE WHEN w.pending_at <= to_timestamp(:started_at) THEN NULL ELSE w.pending_at END,
        failures = 0, last_error = NULL, retry_at = NULL, updated_at = now()
    """
)
_FAILED = text(
    """
    INSERT INTO marketplace_worker.catchup_windows AS w (scope, pending_at, pending_reason, failures, last_error,
                                                        retry_at)
    VALUES (:scope, now(), 'listing failed', 1, :error, now() + make_interval(secs => :base))
    ON CONFLICT (scope) DO UPDATE SET
        pending_at = coalesce(w.pending_at, now()),
        failures = w.failures + 1, last_error = :error, updated_at = now(),
        retry_at = now() + make_interval(secs => least(:cap, :base * power(2, least(w.failures, 20))))
    """
)


# --- listing and storing ---------------------------------------------------------------------


def platform_types() -> list[str]:
    """Handled types the platform's own event can be applied for: the registry's, less the
    connect-only ones (the platform's own payouts are not reconciled)."""
    return [t for t in handled_types() if not HANDLERS[t].connect_only]


def account_types() -> list[str]:
    """Handled types a connected account's event can be applied for: the registry's, less the
    platform-only ones (a connected account's invoices, charges... change no platform record)."""
    return [t for t in handled_types() if not HANDLERS[t].platform_only]


def list_missed_events(client: stripe.StripeClient, since: int, account: str | None,
                       types: list[str] | None = None) -> tuple[list[dict], int]:
    """Every event of `types` (default: all handled) created since `since`; and the calls made."""
    types = list(handled_types()) if types is None else types
    options = {"stripe_account": account} if account else {}
    events: list[dict] = []
    calls = 0
    for start in range(0, len(types), TYPES_PER_CALL):
        params = {"types": types[start:start + TYPES_PER_CALL], "created": {"gte": since}, "limit": 100}
        page = with_rate_limit_retry(lambda: client.v1.events.list(params, options))
        calls += 1
        while True:
            events.extend(item.to_dict() for item in page.data)
            if not page.has_more:
                break
            last = page.data[-1].id
            page = with_rate_limit_retry(
                lambda: client.v1.events.list({**params, "starting_after": last}, options)
            )
            calls += 1
    return events, calls


def store_missed(session: Session, events: list[dict], account: str | None) -> list[str]:
    """Store events not yet in the inbox; returns the ids stored now."""
    livemode = get_settings().stripe_livemode
    incoming: list[IncomingEvent] = []
    for data in events:
        if account and not data.get("account"):
            data["account"] = account
        try:
            incoming.append(event_from_dict(data, json.dumps(data), "catchup", livemode=livemode))
        except ValueError as error:
            log.error("catch-up skipped a malformed event %s: %s", data.get("id"), error)
    if not incoming:
        return []
    rows = session.connection().exec_driver_sql(INSERT_EVENTS_SQL, insert_params(incoming))
    stored = {row[0] for row in rows}
    return [e.id for e in incoming if e.id in stored and not e.ignored_reason]


def _catch_up_scope(session_factory: SessionFactory, client: stripe.StripeClient, window: Window,
                    types: list[str], result: CatchUpResult, clock: Callable[[], float]) -> None:
    account = None if window.scope == PLATFORM else window.scope
    started_at = clock()  # before the first request: what it lists was created before this
    try:
        events, calls = list_missed_events(client, window.since, account, types)
    except stripe.AuthenticationError:
        raise
    except stripe.StripeError as error:
        message = f"{type(error).__name__}: {error.user_message or error}"
        log.warning("catch-up of %s failed, the others go on: %s", window.scope, message,
                    extra={"account": account})
        result.failed[window.scope] = message
        result.calls += 1
        with session_factory() as session:
            session.execute(_FAILED, {"scope": window.scope, "error": message[:500],
                                      "base": RETRY_BASE_SECONDS, "cap": RETRY_MAX_SECONDS})
        return
    result.calls += calls
    result.listed += len(events)
    with session_factory() as session:
        result.stored.extend(store_missed(session, events, account))
        session.execute(_LISTED, {"scope": window.scope, "started": int(started_at), "started_at": started_at})
    result.scopes.append(window.scope)


def catch_up(session_factory: SessionFactory, client: stripe.StripeClient, *, accounts: list[str] | None = None,
             since: int | None = None, clock: Callable[[], float] = time.time,
             progress: Callable[[int, int], None] | None = None) -> CatchUpResult:
    """One catch-up run: the platform and the flagged accounts (or, for an operator, the named
    `accounts`, from `since` when given), then the API reads of accounts whose snapshots tied.
    `progress(done, total)` after each scope listed."""
    result = CatchUpResult()
    now = int(clock())
    with session_factory() as session:
        active = connect_accounts(session)
        if accounts is None:
            gap = detect_connect_gap(session, now)
            if gap is not None:
                result.gap, gap_from = gap
                log.warning("catch-up lists every connected account: %s", result.gap)
                flag(session, active, result.gap,
                     list_from=None if gap_from is None else gap_from - OVERLAP_SECONDS)
            if since is not None:
                flag(session, [PLATFORM, *active], "operator", list_from=since, force=True)
            scopes = active
        else:
            flag(session, accounts, "operator", list_from=since, force=True)
            scopes = accounts
    with session_factory() as session:
        windows = [] if accounts is not None else [platform_window(session, now)]
        windows += account_windows(session, scopes, now)
    types = {PLATFORM: platform_types()}
    for done, window in enumerate(windows, 1):
        scope_types = types[PLATFORM] if window.scope == PLATFORM else types.setdefault("account", account_types())
        _catch_up_scope(session_factory, client, window, scope_types, result, clock)
        if progress is not None:
            progress(done, len(windows))
    result.reads = read_accounts(session_factory, client, clock=clock)
    if result.stored:
        log.warning("catch-up stored %d events the endpoints never received", len(result.stored))
    if result.failed:
        log.error("catch-up could not list %d scope(s): %s", len(result.failed),
                  ", ".join(sorted(result.failed)))
    return result
