"""The fake Stripe server and event factory, exercised through the real stripe SDK (no database)."""

import json
import time

import httpx
import pytest
import stripe

from harness import stripe_events as se
from harness.stripe_server import FakeStripe, serve

T0 = 1_700_000_000
SECRET = "whsec_test_primary"


@pytest.fixture(scope="module")
def server():
    state = FakeStripe()
    with serve(state) as url:
        yield state, url


@pytest.fixture
def fake(server):
    server[0].reset()
    return server[0]


@pytest.fixture
def url(server):
    return server[1]


def client(url, retries=0):
    return stripe.StripeClient("sk_test_fake", base_addresses={"api": url}, max_network_retries=retries)


def test_auto_paging_walks_every_page_newest_first(fake, url):
    for n in range(250):  # every 3 share a second, so insertion order must break ties
        fake.add("charges", se.charge(amount=100 + n, id=f"ch_{n:03d}", created=T0 + n // 3))

    ids = [c.id for c in client(url).v1.charges.list({"limit": 100}).auto_paging_iter()]

    assert ids == [f"ch_{n:03d}" for n in reversed(range(250))]
    assert fake.call_count("/v1/charges", "GET") == 3
    assert [c.params.get("starting_after") for c in fake.calls] == [None, "ch_150", "ch_050"]


def test_ending_before_pages_backwards(fake, url):
    for n in range(5):
        fake.add("payouts", se.payout(amount=1, id=f"po_{n}", created=T0 + n))
    page = client(url).v1.payouts.list({"limit": 2, "ending_before": "po_1"})
    assert [p.id for p in page.data] == ["po_3", "po_2"] and page.has_more
    assert [p.id for p in page.auto_paging_iter()] == ["po_2", "po_3", "po_4"]


def test_created_filters(fake, url):
    for n in range(10):
        fake.add("invoices", se.invoice(id=f"in_{n}", created=T0 + n * 100))
    stripe_client = client(url)

    gte = stripe_client.v1.invoices.list({"created": {"gte": T0 + 700}})
    window = stripe_client.v1.invoices.list({"created": {"gt": T0 + 100, "lte": T0 + 300}})
    exact = stripe_client.v1.invoices.list({"created": T0 + 500})

    assert [i.id for i in gte.data] == ["in_9", "in_8", "in_7"]
    assert [i.id for i in window.data] == ["in_3", "in_2"]
    assert [i.id for i in exact.data] == ["in_5"]
    assert fake.calls[0].params["created"] == {"gte": str(T0 + 700)}


def test_stripe_account_scopes_objects(fake, url):
    fake.add("payouts", se.payout(amount=500, id="po_A"), account="acct_A")
    payouts = client(url).v1.payouts

    assert [p.id for p in payouts.list(options={"stripe_account": "acct_A"}).data] == ["po_A"]
    assert payouts.list().data == []
    assert payouts.list(options={"stripe_account": "acct_B"}).data == []
    with pytest.raises(stripe.InvalidRequestError):
        payouts.retrieve("po_A", options={"stripe_account": "acct_B"})
    assert fake.calls[0].stripe_account == "acct_A"


def test_retrieve_unknown_id_is_resource_missing(fake, url):
    with pytest.raises(stripe.InvalidRequestError) as err:
        client(url).v1.invoices.retrieve("in_missing")
    assert (err.value.http_status, err.value.code, err.value.param) == (404, "resource_missing", "id")


def test_bad_list_params_are_rejected(fake, url):
    charges = client(url).v1.charges
    for params, param in [({"limit": 101}, "limit"), ({"limit": 0}, "limit"),
                          ({"starting_after": "ch_1", "ending_before": "ch_2"}, "ending_before"),
                          ({"expand": ["balance_transaction"]}, "expand")]:
        with pytest.raises(stripe.InvalidRequestError) as err:
            charges.list(params)
        assert err.value.param == param


def test_injected_429_is_not_retried(fake, url):
    fake.add("charges", se.charge(amount=100, id="ch_1"))
    fake.fail_next(429)
    with pytest.raises(stripe.RateLimitError) as err:
        client(url, retries=2).v1.charges.retrieve("ch_1")
    assert err.value.json_body["error"] == {
        "type": "rate_limit_error", "code": "rate_limit", "message": err.value.user_message,
        "doc_url": "https://stripe.com/docs/error-codes/rate-limit"}
    assert fake.call_count() == 1


def test_injected_500_is_retried_by_the_sdk(fake, url):
    fake.add("charges", se.charge(amount=100, id="ch_1"))
    fake.fail_next(500, path_prefix="/v1/charges")
    assert client(url, retries=2).v1.charges.retrieve("ch_1").id == "ch_1"
    assert [c.status for c in fake.calls] == [500, 200]


def test_rate_limit_per_second(fake, url):
    fake.rate_limit_per_s = 5
    with httpx.Client(headers={"Authorization": "Bearer sk"}) as http:  # one connection: requests come fast
        statuses = [http.get(f"{url}/v1/charges").status_code for _ in range(20)]
    assert statuses[:5] == [200] * 5 and 429 in statuses


def test_idempotent_post_replays_and_rejects_changed_params(fake, url):
    fake.add("charges", se.charge(amount=1000, id="ch_1", payment_intent="pi_1"))
    refunds = client(url).v1.refunds
    key = {"idempotency_key": "refund-order-42"}

    first = refunds.create({"charge": "ch_1", "amount": 300}, key)
    again = refunds.create({"charge": "ch_1", "amount": 300}, key)
    with pytest.raises(stripe.IdempotencyError):
        refunds.create({"charge": "ch_1", "amount": 400}, key)

    assert again.id == first.id and len(fake.objects("refunds")) == 1
    assert fake.get("charges", "ch_1")["amount_refunded"] == 300
    assert [c.status for c in fake.calls] == [200, 200, 400]
    with pytest.raises(stripe.InvalidRequestError) as err:
        refunds.create({"payment_intent": "pi_1", "amount": 701})
    assert err.value.code == "amount_too_large"


def test_transfer_and_payout_create(fake, url):
    fake.add("accounts", se.account(id="acct_A"))
    stripe_client = client(url)
    tr = stripe_client.v1.transfers.create(
        {"amount": 700, "currency": "usd", "destination": "acct_A", "transfer_group": "order_1",
         "metadata": {"orderId": "1"}})
    po = stripe_client.v1.payouts.create({"amount": 700, "currency": "usd"}, {"stripe_account": "acct_A"})

    assert (tr.destination, tr.transfer_group, tr.metadata.orderId, tr.reversals.total_count) == (
        "acct_A", "order_1", "1", 0)
    assert [t.id for t in stripe_client.v1.transfers.list({"transfer_group": "order_1"}).data] == [tr.id]
    assert (po.status, po.automatic, po.reconciliation_status) == ("pending", False, "not_applicable")
    assert fake.get("payouts", po.id, account="acct_A") is not None
    with pytest.raises(stripe.InvalidRequestError) as err:  # Stripe only maps BTs to automatic payouts
        stripe_client.v1.balance_transactions.list({"payout": po.id}, {"stripe_account": "acct_A"})
    assert err.value.param == "payout"


def test_missing_api_key_is_401(fake, url):
    response = httpx.get(f"{url}/v1/charges")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert fake.calls[0].status == 401


def test_signed_event_verifies_and_bad_ones_are_refused():
    body, headers = se.webhook(se.event("invoice.paid", se.invoice(status="paid")), SECRET, with_v0=True)
    header = headers["Stripe-Signature"]

    event = stripe.Webhook.construct_event(body, header, SECRET, tolerance=300)
    assert event.type == "invoice.paid" and header.count("v1=") == 1 and "v0=" in header

    stale = se.sign(body, SECRET, timestamp=int(time.time()) - 301)
    other = se.sign(body, "whsec_someone_else")
    for bad in (stale, other):
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(body, bad, SECRET, tolerance=300)

    rolled = se.sign(body, ["whsec_old", SECRET])  # one v1 per active secret while rolling
    assert rolled.count("v1=") == 2
    for secret in ("whsec_old", SECRET):
        assert stripe.Webhook.construct_event(body, rolled, secret, tolerance=300).id == event.id
    assert se.sign(body, SECRET, timestamp=T0) == stripe.WebhookSignature.generate_signature_header(
        body.decode(), SECRET, timestamp=T0)


def test_both_invoice_shapes():
    common = {"id", "object", "status", "amount_due", "amount_paid", "amount_remaining", "total", "currency",
              "customer", "number", "collection_method", "due_date", "created", "livemode", "metadata",
              "status_transitions"}
    legacy = se.invoice(shape="legacy", app_invoice_id="inv-1", status="paid", charge="ch_1", payment_intent="pi_1")
    basil = se.invoice(shape="basil", app_invoice_id="inv-1", status="paid", payment_intent="pi_1")

    assert common <= legacy.keys() and common <= basil.keys()
    assert (legacy["charge"], legacy["payment_intent"], legacy["paid"]) == ("ch_1", "pi_1", True)
    # As Stripe's current Invoice fixture: no charge, payment_intent, paid, nor the includable payments.
    assert not {"charge", "payment_intent", "paid", "payments", "transfer_data", "application_fee_amount"} \
        & basil.keys()
    assert {"parent", "amount_overpaid"} <= basil.keys()
    expanded = se.invoice(shape="basil", app_invoice_id="inv-1", status="paid", payment_intent="pi_1",
                          include_payments=True)  # what a read with expand[]=payments returns
    payment = expanded["payments"]["data"][0]
    assert payment["object"] == "invoice_payment" and payment["invoice"] == expanded["id"]
    assert payment["payment"] == {"type": "payment_intent", "payment_intent": "pi_1"}
    assert basil["metadata"] == {"invoiceId": "inv-1"} and basil["amount_remaining"] == 0
    assert set(basil["status_transitions"]) == {"finalized_at", "paid_at", "voided_at", "marked_uncollectible_at"}
    assert se.event("invoice.paid", legacy)["api_version"] == se.LEGACY_API_VERSION
    assert se.event("invoice.paid", basil)["api_version"] == se.CURRENT_API_VERSION
    assert "invoice" not in se.charge(amount=100, payment_intent="pi_1")  # current charges name no invoice


@pytest.mark.parametrize("shape", se.SHAPES)
def test_lifecycle_snapshots_are_consistent(shape):
    lc = se.invoice_lifecycle("inv-7", 4_000, shape=shape, start=T0, outcome="paid_partial_refund")

    assert [e["created"] for e in lc] == sorted(e["created"] for e in lc)
    assert len({e["id"] for e in lc}) == len(lc)
    invoices = [e["data"]["object"] for e in lc if e["type"].startswith("invoice.")]
    assert all(i["id"] == lc.invoice_id and i["status_transitions"]["finalized_at"] == T0 for i in invoices[1:])
    assert invoices[-1]["status"] == "paid" and invoices[-1]["status_transitions"]["paid_at"] == T0 + se.HOUR
    paid = [e for e in lc if e["type"] in ("invoice.paid", "invoice.payment_succeeded", "invoice.updated")]
    assert len({e["created"] for e in paid}) == 1
    updated = next(e for e in lc if e["type"] == "invoice.updated")
    assert updated["data"]["previous_attributes"]["status"] == "open"
    refunded = [e["data"]["object"]["amount_refunded"] for e in lc if e["type"] == "charge.refunded"]
    assert refunded == [1_000, 2_000]
    assert all(e["data"]["object"]["id"] == lc.charge_id for e in lc if e["type"] == "charge.refunded")
    # The legacy shape names its charge and PaymentIntent; the basil shape neither.
    named = {"charge": lc.charge_id, "payment_intent": lc.payment_intent_id} if shape == "legacy" else {}
    assert {key: invoices[-1][key] for key in ("charge", "payment_intent") if key in invoices[-1]} == named


def test_published_lifecycle_serves_events_and_expansions(fake, url):
    lc = se.invoice_lifecycle("inv-9", 2_500, shape="basil", start=T0)
    se.publish(fake, lc)
    stripe_client = client(url)

    plain = stripe_client.v1.invoices.retrieve(lc.invoice_id)
    expanded = stripe_client.v1.invoices.retrieve(lc.invoice_id, {"expand": ["payments"]})
    listed = stripe_client.v1.invoices.list({"expand": ["data.payments"]}).data[0]
    lookup = stripe_client.v1.invoice_payments.list({"invoice": lc.invoice_id}).data

    assert getattr(plain, "payments", None) is None and plain.status == "paid"
    for inv in (expanded, listed):
        assert inv.payments.data[0].payment.payment_intent == lc.payment_intent_id
    assert [p.id for p in lookup] == [lc.invoice_payment_id]
    events = stripe_client.v1.events
    assert {e.type for e in events.list({"type": "invoice.*"}).data} == {
        "invoice.created", "invoice.finalized", "invoice.paid", "invoice.payment_succeeded", "invoice.updated"}
    assert [e.type for e in events.list({"types": ["charge.succeeded", "invoice.paid"]}).data] == [
        "invoice.paid", "charge.succeeded"]
    assert len(events.list({"delivery_success": False, "limit": 100}).data) == len(lc)


def test_connect_history_reconciles_through_balance_transactions(fake, url):
    history = se.connect_history("acct_A", start=T0, transfer_amounts=(5_000, 2_500), reversal_amount=1_000)
    se.publish(fake, history)
    stripe_client = client(url)

    assert all("account" not in e for e in history if e["type"].startswith("transfer."))
    assert all(e["account"] == "acct_A" for e in history if e["type"].startswith(("payout.", "account.")))
    bts = stripe_client.v1.balance_transactions.list(
        {"payout": history.payout_id, "expand": ["data.source"], "limit": 100}, {"stripe_account": "acct_A"}).data
    by_type = {bt.type: bt for bt in bts}
    assert sorted(bt.type for bt in bts) == ["payment", "payment", "payment_refund", "payout"]
    assert by_type["payout"].amount == -6_500 and by_type["payout"].source.id == history.payout_id
    assert {bt.source.source_transfer for bt in bts if bt.type == "payment"} == set(history.transfer_ids)
    assert stripe_client.v1.balance_transactions.list({"payout": history.payout_id}).data == []  # platform scope
    assert stripe_client.v1.accounts.retrieve("acct_A").payouts_enabled is True
    reversed_transfer = stripe_client.v1.transfers.retrieve(history.transfer_ids[0])
    assert reversed_transfer.amount_reversed == 1_000
    assert [r.id for r in reversed_transfer.reversals.data] == history.reversal_ids


def test_latency_and_seed_loading(fake, url):
    fake.latency_s = 0.05
    fake.load({"acct_A": [se.payout(amount=1, id="po_1")], "events": [se.event("payout.paid", se.payout(
        amount=2, id="po_2"), account="acct_A")]})
    started = time.monotonic()
    ids = [p.id for p in client(url).v1.payouts.list(options={"stripe_account": "acct_A"}).data]
    assert time.monotonic() - started >= 0.05
    assert sorted(ids) == ["po_1", "po_2"]
    assert json.loads(se.encode(fake.objects("events", account="acct_A")[0]))["type"] == "payout.paid"


def test_legacy_module_configuration(fake, url, monkeypatch):
    monkeypatch.setattr(stripe, "api_base", url)
    fake.add("disputes", se.dispute(charge="ch_1", amount=100, id="dp_1"))
    assert [d.id for d in stripe.Dispute.list(api_key="sk_test_fake", charge="ch_1").data] == ["dp_1"]
