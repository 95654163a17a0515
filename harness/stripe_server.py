"""Stateful fake of the slice of the Stripe v1 API the marketplace worker uses, driven by the real stripe SDK.

Point the SDK at it with `stripe.StripeClient(key, base_addresses={"api": url}, max_network_retries=N)` or
`stripe.api_base = url`. Pagination, errors, idempotency and rate limiting follow
/work/shared/stripe-facts.md §7. Run standalone for benchmarks:
`python -m harness.stripe_server --port 12111 [--latency-ms 40] [--rate-limit 25] [--seed seed.json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import fnmatch
import itertools
import json
import operator
import re
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import stripe_events

Scope = str | None  # connected account id, or None for the platform

# object type -> collection (the URL segment)
COLLECTIONS = {
    "invoice": "invoices",
    "invoice_payment": "invoice_payments",
    "charge": "charges",
    "refund": "refunds",
    "dispute": "disputes",
    "transfer": "transfers",
    "transfer_reversal": "transfer_reversals",
    "payout": "payouts",
    "balance_transaction": "balance_transactions",
    "account": "accounts",
    "event": "events",
    "application_fee": "application_fees",
}
_OBJECT_NAMES = {coll: obj.replace("_", " ") for obj, coll in COLLECTIONS.items()}
# list filters per collection, as in stripe/params/_<resource>_list_params.py
LIST_FILTERS: dict[str, set[str]] = {
    "invoices": {"customer", "customer_account", "status", "collection_method", "subscription", "due_date"},
    "invoice_payments": {"invoice", "payment", "status"},
    "charges": {"customer", "payment_intent", "transfer_group"},
    "refunds": {"charge", "payment_intent"},
    "disputes": {"charge", "payment_intent"},
    "transfers": {"destination", "transfer_group"},
    "transfer_reversals": set(),
    "payouts": {"status", "destination", "arrival_date"},
    "balance_transactions": {"payout", "source", "type", "currency"},
    "accounts": set(),
    "events": {"type", "types", "delivery_success"},
    "application_fees": {"charge"},
}
_PAGING = {"limit", "starting_after", "ending_before", "created", "expand"}
_RANGES = {"created", "arrival_date", "due_date"}
_RANGE_OPS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
_SPECIAL_FILTERS = {"payout", "type", "types", "delivery_success"}  # handled by _special_filter
CREATE_PARAMS = {
    "refunds": {"amount", "charge", "currency", "customer", "expand", "instructions_email", "metadata", "origin",
                "payment_intent", "reason", "refund_application_fee", "reverse_transfer"},
    "transfers": {"amount", "currency", "description", "destination", "expand", "metadata", "source_transaction",
                  "source_type", "transfer_group"},
    "payouts": {"amount", "currency", "description", "destination", "expand", "metadata", "method",
                "payout_method", "source_type", "statement_descriptor"},
}
# embedded list field -> the collection its items are stored in (rendered back from the store)
_EMBEDDED = {"invoices": ("payments", "invoice_payments", "invoice"),
             "transfers": ("reversals", "transfer_reversals", "transfer")}
_REVERSALS = re.compile(r"/v1/transfers/([^/]+)/reversals(?:/([^/]+))?")
_RESOURCE = re.compile(r"/v1/([a-z_]+)(?:/([^/]+))?")


class ApiError(Exception):
    def __init__(self, status: int, type: str, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        error = {"code": code, "message": message, "param": param, "type": type}
        if code:
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        self.body = {"error": {k: v for k, v in error.items() if v is not None}}


def _invalid(message: str, param: str | None = None, code: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, "invalid_request_error", message, code, param)


def decode_params(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe's bracket form encoding: `created[gte]=1`, `types[0]=a`, `types[]=a`, `metadata[k]=v`."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        name, _, rest = key.partition("[")
        path = [name, *(rest[:-1].split("][") if rest else [])]
        node = root
        for part in path[:-1]:
            node = node.setdefault(part or str(len(node)), {})
            if not isinstance(node, dict):
                raise _invalid(f"Invalid parameter: {key}", param=name)
        node[path[-1] or str(len(node))] = value
    return _listify(root)


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if node and all(k.isdigit() for k in node):
        return [_listify(node[k]) for k in sorted(node, key=int)]
    return {k: _listify(v) for k, v in node.items()}


def _int(value: Any, param: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _invalid(f"Invalid integer: {value}", param=param) from None


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value in (None, "") else [value]


def _in_range(value: Any, spec: Any, param: str) -> bool:
    if not isinstance(spec, dict):
        return value == _int(spec, param)
    for op in spec.keys() - _RANGE_OPS.keys():
        raise _invalid(f"Received unknown parameter: {param}[{op}]", param=f"{param}[{op}]")
    return value is not None and all(_RANGE_OPS[op](value, _int(v, f"{param}[{op}]")) for op, v in spec.items())


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any]
    stripe_account: str | None
    idempotency_key: str | None
    stripe_version: str | None
    status: int


class FakeStripe:
    """In-memory, thread-safe Stripe: objects per collection and per account scope, plus faults and a call log."""

    COLLECTIONS = COLLECTIONS

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget everything: objects, idempotency keys, faults, the call log, latency and rate limit."""
        with self._lock:
            self._store: dict[tuple[Scope, str], dict[str, tuple[int, dict]]] = defaultdict(dict)
            self._where: dict[tuple[Scope, str], str] = {}  # (scope, id) -> collection, for expand
            self._payout_of: dict[tuple[Scope, str], str] = {}  # (scope, bt id) -> automatic payout id
            self._seq = itertools.count()  # insertion order breaks `created` ties
            self._idempotency: dict[tuple[Scope, str], tuple[tuple, int, dict]] = {}
            self._faults: list[list] = []
            self._calls: list[Call] = []
            self._tokens, self._refilled = float("inf"), time.monotonic()
            self.latency_s = 0.0
            self.rate_limit_per_s: float | None = None

    # --- seeding and inspection ---------------------------------------------------------------

    def add(self, resource: str, obj: dict, account: str | None = None, *, payout: str | None = None) -> None:
        """Store (or replace, keeping its list position) an object. `resource` is a collection ("payouts") or an
        object type ("payout"). `payout` links a balance transaction to an automatic payout for `?payout=`."""
        coll = self._collection(resource)
        if missing := {"id", "object", "created"} - obj.keys():
            raise ValueError(f"object lacks {sorted(missing)}")
        obj = copy.deepcopy(obj)
        scope = None if coll == "accounts" else account  # accounts belong to the platform
        with self._lock:
            if coll in _EMBEDDED:
                field, child, _ = _EMBEDDED[coll]
                for item in (obj.pop(field, None) or {}).get("data", []):
                    self._put(scope, child, item)
            self._put(scope, coll, obj)
            if payout:
                self._payout_of[(scope, obj["id"])] = payout

    def load(self, seed: dict[str, list[dict]]) -> None:
        """Seed from {"platform" | "acct_…": [objects…], "events": [events…]} (events as in `publish`)."""
        for scope, items in seed.items():
            if scope == "events":
                stripe_events.publish(self, items)
            else:
                for obj in items:
                    self.add(obj["object"], obj, account=None if scope == "platform" else scope)

    def get(self, resource: str, id: str, account: str | None = None) -> dict | None:
        coll = self._collection(resource)
        scope = None if coll == "accounts" else account
        with self._lock:
            entry = self._store[(scope, coll)].get(id)
            return self._render(scope, coll, entry[1]) if entry else None

    def objects(self, resource: str, account: str | None = None) -> list[dict]:
        """All stored objects of a collection in one scope, newest first, as the API renders them."""
        coll = self._collection(resource)
        scope = None if coll == "accounts" else account
        with self._lock:
            return [self._render(scope, coll, o) for o in self._sorted(scope, coll)]

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def call_count(self, path_prefix: str | None = None, method: str | None = None) -> int:
        return sum(1 for c in self.calls if (path_prefix is None or c.path.startswith(path_prefix))
                   and (method is None or c.method == method.upper()))

    def fail_next(self, status: int, count: int = 1, path_prefix: str | None = None, code: str | None = None) -> None:
        """Answer the next `count` matching requests with `status` and Stripe's error body, before they run."""
        with self._lock:
            self._faults.append([status, count, path_prefix, code])

    def clear_faults(self) -> None:
        """Forget the faults `fail_next` queued and no request has taken yet."""
        with self._lock:
            self._faults.clear()

    # --- request handling ----------------------------------------------------------------------

    def handle(self, method: str, path: str, pairs: Iterable[tuple[str, str]], *, authorization: str | None = None,
               stripe_account: str | None = None, idempotency_key: str | None = None,
               stripe_version: str | None = None) -> tuple[int, dict, dict[str, str]]:
        """One API request -> (status, JSON body, extra headers). Logged in `calls` whatever the outcome."""
        method = method.upper()
        params: dict[str, Any] = {}
        with self._lock:
            try:
                params = decode_params(pairs)
                status, body, headers = self._handle(method, path, params, authorization, stripe_account,
                                                     idempotency_key)
            except ApiError as e:
                status, body, headers = e.status, e.body, e.headers
            self._calls.append(Call(method, path, params, stripe_account, idempotency_key, stripe_version, status))
            return status, body, headers

    def _handle(self, method, path, params, authorization, scope, idempotency_key):
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "authentication_error",
                           "You did not provide an API key. You need to provide your API key in the Authorization "
                           "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').")
        if not self._take_token():
            raise ApiError(429, "rate_limit_error", "Request rate limit exceeded. You can learn more about rate "
                           "limits here https://stripe.com/docs/rate-limits.", "rate_limit")
        self._inject_fault(path)
        if method != "POST" or not idempotency_key:
            return self._route(method, path, params, scope)
        fingerprint = (path, params)
        saved = self._idempotency.get((scope, idempotency_key))
        if saved:
            if saved[0] != fingerprint:
                raise ApiError(400, "idempotency_error",
                               "Keys for idempotent requests can only be used with the same parameters they were "
                               f"first used with. Try using a key other than '{idempotency_key}' if you meant to "
                               "execute a different request.")
            return saved[1], copy.deepcopy(saved[2]), {"Idempotent-Replayed": "true"}
        status, body, headers = self._route(method, path, params, scope)
        if status < 300:  # Stripe does not save requests that failed validation
            self._idempotency[(scope, idempotency_key)] = (fingerprint, status, copy.deepcopy(body))
        return status, body, {**headers, "Idempotency-Key": idempotency_key}

    def _take_token(self) -> bool:
        rate = self.rate_limit_per_s
        if not rate:
            return True
        now = time.monotonic()
        self._tokens = min(rate, self._tokens + (now - self._refilled) * rate)  # bursts up to one second's worth
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _inject_fault(self, path: str) -> None:
        for fault in self._faults:
            status, count, prefix, code = fault
            if prefix is None or path.startswith(prefix):
                fault[1] -= 1
                if fault[1] <= 0:
                    self._faults.remove(fault)
                if status == 429:
                    raise ApiError(429, "rate_limit_error", "Too many requests hit the API too quickly. We recommend "
                                   "an exponential backoff of your requests.", code or "rate_limit")
                if status >= 500:
                    raise ApiError(status, "api_error", "An unknown error occurred while processing your request.",
                                   code)
                raise ApiError(status, "invalid_request_error", f"Injected failure ({status}).", code)

    def _route(self, method, path, params, scope):
        if m := _REVERSALS.fullmatch(path):
            if method == "GET":
                transfer = self._find(scope, "transfers", m[1], "id")
                if m[2]:
                    reversal = self._find(scope, "transfer_reversals", m[2], "id")
                    if reversal["transfer"] == transfer["id"]:
                        return self._retrieved(scope, "transfer_reversals", reversal, params)
                    raise _invalid(f"No such transfer reversal: '{m[2]}'", "id", "resource_missing", 404)
                return self._list(scope, "transfer_reversals", params, path, {"transfer": transfer["id"]})
        elif (m := _RESOURCE.fullmatch(path)) and m[1] in LIST_FILTERS and m[1] != "transfer_reversals":
            coll, oid = m[1], m[2]
            scope = None if coll == "accounts" else scope
            if method == "GET" and oid:
                return self._retrieved(scope, coll, self._find(scope, coll, oid, "id"), params)
            if method == "GET":
                return self._list(scope, coll, params, path, {})
            if method == "POST" and not oid and coll in CREATE_PARAMS:
                return self._create(scope, coll, params)
        raise _invalid(f"Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs or we can "
                       "help at https://support.stripe.com/.", status=404)

    # --- reads ----------------------------------------------------------------------------------

    def _collection(self, resource: str) -> str:
        coll = resource if resource in LIST_FILTERS else COLLECTIONS.get(resource)
        if coll is None:
            raise ValueError(f"unknown resource {resource!r}")
        return coll

    def _put(self, scope: Scope, coll: str, obj: dict) -> None:
        bucket = self._store[(scope, coll)]
        seq = bucket[obj["id"]][0] if obj["id"] in bucket else next(self._seq)
        bucket[obj["id"]] = (seq, obj)
        self._where[(scope, obj["id"])] = coll

    def _key(self, scope: Scope, coll: str, id: str) -> tuple[int, int]:
        seq, obj = self._store[(scope, coll)][id]
        return obj["created"], seq

    def _sorted(self, scope: Scope, coll: str) -> list[dict]:
        bucket = self._store[(scope, coll)]
        return [o for _, o in sorted(bucket.values(), key=lambda e: (e[1]["created"], e[0]), reverse=True)]

    def _find(self, scope: Scope, coll: str, id: str, param: str) -> dict:
        entry = self._store[(None if coll == "accounts" else scope, coll)].get(id)
        if entry is None:
            status = 404 if param == "id" else 400
            raise _invalid(f"No such {_OBJECT_NAMES[coll]}: '{id}'", param, "resource_missing", status)
        return entry[1]

    def _render(self, scope: Scope, coll: str, obj: dict) -> dict:
        out = copy.deepcopy(obj)
        if coll == "transfers":  # Stripe always includes the first page of reversals
            out["reversals"] = self._embedded(scope, "transfer_reversals", "transfer", out["id"],
                                              f"/v1/transfers/{out['id']}/reversals")
        return out

    def _embedded(self, scope: Scope, coll: str, key: str, value: str, url: str) -> dict:
        items = [self._render(scope, coll, o) for o in self._sorted(scope, coll) if o.get(key) == value]
        return {"object": "list", "data": items[:10], "has_more": len(items) > 10, "total_count": len(items),
                "url": url}

    def _expand(self, scope: Scope, coll: str, obj: dict, paths: list[str]) -> dict:
        for path in paths:
            head, _, rest = path.partition(".")
            if coll == "invoices" and head == "payments":  # includable: only present when asked for
                obj["payments"] = self._embedded(scope, "invoice_payments", "invoice", obj["id"],
                                                 f"/v1/invoice_payments?invoice={obj['id']}")
                continue
            value = obj.get(head)
            owner = scope if (scope, value) in self._where else None
            child = self._where.get((owner, value)) if isinstance(value, str) else None
            if child and (owner == scope or child == "accounts"):  # never leak another scope's objects
                stored = self._store[(owner, child)][value][1]
                obj[head] = self._expand(owner, child, self._render(owner, child, stored), [rest] if rest else [])
        return obj

    def _retrieved(self, scope, coll, obj, params):
        self._check_params(params, {"expand"})
        return 200, self._expand(scope, coll, self._render(scope, coll, obj), _as_list(params.get("expand"))), {}

    def _check_params(self, params: dict, allowed: set[str]) -> None:
        for name in params.keys() - allowed:
            raise _invalid(f"Received unknown parameter: {name}", param=name)

    def _list(self, scope, coll, params, url, fixed):
        self._check_params(params, _PAGING | LIST_FILTERS[coll])
        limit = _int(params.get("limit", 10), "limit")
        if not 1 <= limit <= 100:
            raise _invalid("Invalid limit: must be between 1 and 100", "limit")
        after, before = params.get("starting_after"), params.get("ending_before")
        if after and before:
            raise _invalid("You may only specify one of these parameters: ending_before, starting_after.",
                           "ending_before")
        expand = _as_list(params.get("expand"))
        for path in expand:
            if not path.startswith("data."):
                raise _invalid(f"This property cannot be expanded ({path}). You may want to try expanding "
                               f"'data.{path}' instead.", "expand")
        predicates = [self._predicate(scope, coll, name, value)
                      for name, value in {**params, **fixed}.items() if name not in _PAGING - {"created"}]
        items = [o for o in self._sorted(scope, coll) if all(p(o) for p in predicates)]
        if after or before:
            cursor = self._key(scope, coll, self._find(scope, coll, after or before,
                                                       "starting_after" if after else "ending_before")["id"])
            if after:
                items = [o for o in items if self._key(scope, coll, o["id"]) < cursor]
            else:
                items = [o for o in items if self._key(scope, coll, o["id"]) > cursor]
        page = items[-limit:] if before else items[:limit]  # ending_before: the page just newer than the cursor
        data = [self._expand(scope, coll, self._render(scope, coll, o), [p[5:] for p in expand]) for o in page]
        return 200, {"object": "list", "url": url, "has_more": len(items) > limit, "data": data}, {}

    def _predicate(self, scope, coll, name, value):
        if name in _RANGES:
            _in_range(0, value, name)  # reject a malformed range even when nothing is stored
            return lambda o: _in_range(o.get(name), value, name)
        if name in _SPECIAL_FILTERS and (coll == "events" or name == "payout"):
            return self._special_filter(scope, name, value)
        if isinstance(value, dict):  # e.g. payment[type]=payment_intent&payment[payment_intent]=pi_…
            return lambda o: isinstance(o.get(name), dict) and all(o[name].get(k) == v for k, v in value.items())
        return lambda o: o.get(name) == value

    def _special_filter(self, scope, name, value):
        if name == "payout":
            payout = self._store[(scope, "payouts")].get(value)
            if payout and not payout[1].get("automatic", True):
                raise _invalid("Balance transaction history can only be filtered on automatic transfers, "
                               "not manual.", "payout")
            return lambda bt: (self._payout_of.get((scope, bt["id"])) == value
                               or (bt.get("type") == "payout" and bt.get("source") == value))
        if name == "type":
            return lambda ev: fnmatch.fnmatchcase(ev["type"], value)
        if name == "types":
            types = _as_list(value)
            if len(types) > 20:
                raise _invalid("You can only pass up to 20 types.", "types")
            return lambda ev: ev["type"] in types
        if value not in ("true", "false"):
            raise _invalid(f"Invalid boolean: {value}", name)
        return lambda ev: (ev.get("pending_webhooks", 0) == 0) == (value == "true")

    # --- writes ---------------------------------------------------------------------------------

    def _create(self, scope, coll, params):
        self._check_params(params, CREATE_PARAMS[coll])
        required = {"refunds": [], "transfers": ["amount", "currency", "destination"],
                    "payouts": ["amount", "currency"]}[coll]
        for name in required:
            if not params.get(name):
                raise _invalid(f"Missing required param: {name}.", name, "parameter_missing")
        metadata = params.get("metadata") or {}
        if coll == "refunds":
            obj = self._refund(scope, params, metadata)
        else:
            amount = _int(params["amount"], "amount")
            if amount < 1:
                raise _invalid("This value must be greater than or equal to 1.", "amount")
            currency = params["currency"].lower()
            extra = {k: params[k] for k in ("description", "source_type", "statement_descriptor") if k in params}
            if coll == "transfers":
                self._find(scope, "accounts", params["destination"], "destination")
                obj = stripe_events.transfer(amount=amount, currency=currency, destination=params["destination"],
                                             transfer_group=params.get("transfer_group"), metadata=metadata,
                                             source_transaction=params.get("source_transaction"), **extra)
            else:
                obj = stripe_events.payout(amount=amount, currency=currency, status="pending", automatic=False,
                                           method=params.get("method", "standard"),
                                           destination=params.get("destination"), metadata=metadata, **extra)
        self.add(coll, obj, account=scope)
        return self._retrieved(scope, coll, self._store[(scope, coll)][obj["id"]][1],
                               {k: v for k, v in params.items() if k == "expand"})

    def _refund(self, scope, params, metadata):
        if params.get("charge"):
            charge = self._find(scope, "charges", params["charge"], "charge")
        elif params.get("payment_intent"):
            charge = next((c for c in self._sorted(scope, "charges")
                           if c.get("payment_intent") == params["payment_intent"] and c.get("status") == "succeeded"),
                          None)
            if charge is None:
                raise _invalid(f"No such payment_intent: '{params['payment_intent']}'", "payment_intent",
                               "resource_missing")
        else:
            raise _invalid("One of the following params should be provided for this request: payment_intent or "
                           "charge.", "charge", "parameter_missing")
        remaining = charge["amount"] - charge.get("amount_refunded", 0)
        if remaining <= 0:
            raise _invalid(f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded")
        amount = _int(params.get("amount", remaining), "amount")
        if not 1 <= amount <= remaining:
            raise _invalid(f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
                           "amount", "amount_too_large")
        charge["amount_refunded"] = charge.get("amount_refunded", 0) + amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        return stripe_events.refund(charge=charge["id"], amount=amount, currency=charge["currency"],
                                    payment_intent=charge.get("payment_intent"), reason=params.get("reason"),
                                    metadata=metadata)


def make_app(fake: FakeStripe) -> Starlette:
    async def endpoint(request: Request) -> JSONResponse:
        if fake.latency_s:
            await asyncio.sleep(fake.latency_s)
        pairs = request.query_params.multi_items()
        if request.method == "POST":
            pairs += parse_qsl((await request.body()).decode(), keep_blank_values=True)
        h = request.headers
        status, body, headers = fake.handle(
            request.method, request.url.path, pairs, authorization=h.get("authorization"),
            stripe_account=h.get("stripe-account"), idempotency_key=h.get("idempotency-key"),
            stripe_version=h.get("stripe-version"))
        return JSONResponse(body, status, {"Request-Id": stripe_events.new_id("req", 14), **headers})

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "DELETE"])])


@contextlib.contextmanager
def serve(fake: FakeStripe, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the fake on a background uvicorn thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(make_app(fake), log_level="warning", access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-stripe", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake Stripe server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Stripe API for benchmarks and manual testing.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--rate-limit", type=float, default=None, help="requests/s before answering 429")
    parser.add_argument("--seed", help='JSON: {"platform" | "acct_…": [objects], "events": [events]}')
    args = parser.parse_args(argv)
    fake = FakeStripe()
    fake.latency_s, fake.rate_limit_per_s = args.latency_ms / 1000, args.rate_limit
    if args.seed:
        with open(args.seed) as f:
            fake.load(json.load(f))
    uvicorn.run(make_app(fake), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
