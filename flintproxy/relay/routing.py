"""Upstream routing: which upstream serves a model, in what order, and circuit breaking.

Candidates for a model are tried in priority order (lower ``priority`` first);
within one priority, a weighted random order among upstreams whose circuit is
closed. An upstream's circuit opens after ``failure_threshold`` consecutive
failures (connect error, timeout, 429, 5xx) and stays open for ``cooldown_s``;
then one request is let through as a probe (half-open): success closes it,
failure re-opens it. Upstreams whose circuit is open are still tried last, so a
false positive never turns into a total outage.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from flintproxy.config import Config, UpstreamConfig, UpstreamKind
from flintproxy.errors import ModelNotFound
from flintproxy.http.client import Target
from flintproxy.relay.routes import ENDPOINTS

# Why an upstream attempt failed: a closed set, used as a metrics label.
FAILURE_REASONS = ("connect", "timeout", "reset", "http_429", "http_5xx", "too_large", "other")


class Upstream:
    """One configured upstream with its circuit-breaker state."""

    __slots__ = ("anthropic", "bare_head", "cfg", "consecutive_failures", "failures",
                 "forward_names", "forward_prefixes", "head", "kind", "name", "open_until",
                 "probing", "targets")

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.targets = {ep: Target(f"{cfg.base_url}/{ep}") for ep in ENDPOINTS}
        # Header lines sent to this upstream after the client's. identity: usage is
        # scanned in the bytes we relay, so they must be plain.
        head = b"Accept-Encoding: identity\r\n"
        self.kind = cfg.kind
        anthropic = cfg.kind is UpstreamKind.ANTHROPIC
        if cfg.api_key:
            key = cfg.api_key.encode("utf-8", "surrogateescape")
            head += (b"x-api-key: " if anthropic else b"Authorization: Bearer ") + key + b"\r\n"
        # ``bare_head`` when the client sent its own anthropic-version (forwarded).
        self.bare_head = head
        if anthropic:
            head += b"anthropic-version: " + cfg.anthropic_version.encode("ascii") + b"\r\n"
        self.head = head
        # Which of relay.headers' allow-lists the client's headers pass (a plain bool).
        self.anthropic = anthropic
        # The operator's extra request headers for this upstream (``forward_headers``):
        # exact names and "prefix*" globs, lower-cased, as bytes for the relay's filter.
        globs = [h.encode("ascii") for h in cfg.forward_headers]
        self.forward_names = frozenset(g for g in globs if not g.endswith(b"*"))
        self.forward_prefixes = tuple(g[:-1] for g in globs if g.endswith(b"*"))
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.probing = False
        # Failed attempts ever, by reason (FAILURE_REASONS); read by the metrics module.
        self.failures: dict[str, int] = {}

    def available(self, now: float) -> bool:
        """Closed circuit, or open with cooldown elapsed and no probe in flight."""
        if self.consecutive_failures < self.cfg.failure_threshold:
            return True
        return now >= self.open_until and not self.probing

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.cfg.failure_threshold

    def upstream_model(self, model: str) -> str:
        return self.cfg.model_map.get(model, model)


class Router:
    """Maps model names to ordered upstream candidates and tracks their health."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self.upstreams = tuple(Upstream(u) for u in config.upstreams)
        groups: dict[str, dict[int, list[Upstream]]] = {}
        for up in self.upstreams:
            for model in up.cfg.models:
                groups.setdefault(model, {}).setdefault(up.cfg.priority, []).append(up)
        self.by_model: Mapping[str, tuple[tuple[Upstream, ...], ...]] = {
            model: tuple(tuple(g[p]) for p in sorted(g)) for model, g in groups.items()
        }
        self.models = tuple(self.by_model)

    def candidates(self, model: str) -> list[Upstream]:
        """Upstreams to try for ``model``, best first; raises ModelNotFound."""
        tiers = self.by_model.get(model)
        if tiers is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        if len(tiers) == 1 and len(tiers[0]) == 1:  # the common case: one upstream
            return [tiers[0][0]]
        now = self.clock()
        ready: list[Upstream] = []
        last_resort: list[Upstream] = []
        for tier in tiers:
            live = [u for u in tier if u.available(now)]
            last_resort.extend(u for u in tier if u not in live)
            ready.extend(self._weighted_order(live))
        return ready + last_resort

    def _weighted_order(self, ups: list[Upstream]) -> list[Upstream]:
        if len(ups) <= 1:
            return ups
        # Efraimidis-Spirakis: sort by u^(1/w), a weighted random permutation.
        rnd = self.rng.random
        return sorted(ups, key=lambda u: rnd() ** (1.0 / u.cfg.weight), reverse=True)

    def begin(self, up: Upstream) -> None:
        """Called before a request goes to ``up``; claims the half-open probe."""
        if not up.healthy:
            up.probing = True

    def success(self, up: Upstream) -> None:
        up.consecutive_failures = 0
        up.probing = False

    def abandon(self, up: Upstream) -> None:
        """The request went away before the upstream answered: no verdict."""
        up.probing = False

    def failure(self, up: Upstream, reason: str = "other") -> None:
        if reason not in FAILURE_REASONS:
            reason = "other"
        up.failures[reason] = up.failures.get(reason, 0) + 1
        up.consecutive_failures += 1
        up.probing = False
        if up.consecutive_failures >= up.cfg.failure_threshold:
            up.open_until = self.clock() + up.cfg.cooldown_s

    def any_healthy(self) -> bool:
        now = self.clock()
        return any(u.available(now) for u in self.upstreams)
