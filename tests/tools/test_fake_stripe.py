"""The local Stripe fake: the official ``stripe`` package talks to it as to Stripe, and
its webhooks carry signatures the package verifies (the documented v1 scheme)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import stripe

from flintproxy.tools.fake_stripe import FakeStripe, sign, signature_header

SECRET, HOOK = "sk_test_fake", "whsec_fake"


@pytest.fixture
async def fake() -> AsyncIterator[FakeStripe]:
    server = FakeStripe(secret_key=SECRET, webhook_secret=HOOK)
    await server.start()
    yield server
    await server.close()


async def test_the_stripe_package_creates_and_reads_a_checkout_session_on_the_fake(
        fake: FakeStripe) -> None:
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(SECRET, base_addresses={"api": fake.url}, http_client=http,
                                 max_network_retries=0)
    try:
        session = await client.v1.checkout.sessions.create_async({
            "mode": "payment", "client_reference_id": "42",
            "metadata": {"account_id": "42"},
            "success_url": "http://x/ok", "cancel_url": "http://x/no",
            "line_items": [{"quantity": 1, "price_data": {
                "currency": "usd", "unit_amount": 500,
                "product_data": {"name": "flintproxy credit"}}}],
        })
        assert session.amount_total == 500 and session.url.startswith(fake.url + "/pay/")
        again = await client.v1.checkout.sessions.retrieve_async(session.id)
        assert again.client_reference_id == "42" and again.metadata["account_id"] == "42"
        bad = stripe.StripeClient("sk_wrong", base_addresses={"api": fake.url},
                                  http_client=http, max_network_retries=0)
        with pytest.raises(stripe.AuthenticationError):
            await bad.v1.checkout.sessions.retrieve_async(session.id)
    finally:
        await http.close_async()


def test_the_fakes_signature_is_the_one_the_stripe_package_verifies() -> None:
    payload = b'{"id": "evt_1", "type": "checkout.session.completed"}'
    header = signature_header(HOOK, payload)
    stripe.WebhookSignature.verify_header(payload, header, HOOK, tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload + b" ", header, HOOK, tolerance=300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(payload, header, "whsec_other", tolerance=300)
    stale = f"t=1000,v1={sign(HOOK, 1000, payload)}"
    with pytest.raises(stripe.SignatureVerificationError, match="tolerance"):
        stripe.WebhookSignature.verify_header(payload, stale, HOOK, tolerance=300)
