"""The payment processor's client (Stripe, through the official package) and the
top-ups' store, as one object the control plane holds when ``[payments]`` is set."""

from __future__ import annotations

import stripe
from aiohttp import web

from flintproxy.config import PaymentsConfig
from flintproxy.money import usd_to_nano
from flintproxy.store.topups import Topups

__all__ = ["Payments"]


class Payments:
    """The Stripe client and the top-ups' store; ``close`` at the app's cleanup."""

    def __init__(self, cfg: PaymentsConfig, topups: Topups) -> None:
        self.cfg = cfg
        self.topups = topups
        self.min_nano = usd_to_nano(cfg.min_topup_usd)
        self.max_nano = usd_to_nano(cfg.max_topup_usd)
        self._http = stripe.AIOHTTPClient()
        self.client = stripe.StripeClient(
            cfg.stripe_secret_key or "", base_addresses={"api": cfg.api_base},
            http_client=self._http, max_network_retries=1)

    async def close(self, _app: web.Application | None = None) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]
