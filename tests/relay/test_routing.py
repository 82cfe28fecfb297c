"""routing: priority, weighted order, circuit breaker with half-open probe, model lookup."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flintproxy.config import build_config
from flintproxy.errors import ModelNotFound
from flintproxy.relay.routing import Router, Upstream
from tests.conftest import raw_config

MODEL = "gpt-4o-mini"


class Clock:
    """An injectable monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_router(tmp_path: Path, *upstreams: dict[str, Any], clock: Clock | None = None,
                seed: int = 1, env: dict[str, str] | None = None) -> Router:
    raw = raw_config(tmp_path, {})
    raw["upstreams"] = [{"base_url": f"http://127.0.0.1:{9000 + i}/v1", "models": [MODEL],
                         **spec} for i, spec in enumerate(upstreams)]
    return Router(build_config(raw, env or {}), clock=clock or Clock(),
                  rng=random.Random(seed))


def names(ups: list[Upstream]) -> list[str]:
    return [u.name for u in ups]


def by_name(router: Router, name: str) -> Upstream:
    return next(u for u in router.upstreams if u.name == name)


def test_candidates_follow_priority_lower_first(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "backup", "priority": 5},
                         {"name": "main", "priority": -1}, {"name": "middle", "priority": 0})
    for _ in range(20):
        assert names(router.candidates(MODEL)) == ["main", "middle", "backup"]


def test_only_upstreams_serving_the_model_are_candidates(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "chat", "models": ["gpt-4o", MODEL]},
                         {"name": "embed", "models": ["text-embedding-3-small"]})
    assert names(router.candidates("gpt-4o")) == ["chat"]
    assert names(router.candidates("text-embedding-3-small")) == ["embed"]
    assert set(router.models) == {"gpt-4o", MODEL, "text-embedding-3-small"}


def test_unknown_model_raises_model_not_found(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "a"})
    with pytest.raises(ModelNotFound) as info:
        router.candidates("gpt-5-imaginary")
    assert "gpt-5-imaginary" in info.value.message
    assert info.value.status == 404


def test_weighted_order_is_roughly_proportional(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "w1", "weight": 1}, {"name": "w2", "weight": 2},
                         {"name": "w7", "weight": 7}, {"name": "fallback", "priority": 1,
                                                       "weight": 1000},
                         seed=20240601)
    draws = 10_000
    first: Counter[str] = Counter()
    for _ in range(draws):
        order = names(router.candidates(MODEL))
        assert sorted(order[:3]) == ["w1", "w2", "w7"]  # a permutation of the first tier
        assert order[3] == "fallback"  # weight never lifts a lower priority
        first[order[0]] += 1
    for name, share in (("w1", 0.10), ("w2", 0.20), ("w7", 0.70)):
        assert abs(first[name] / draws - share) < 0.05, (name, first)


def test_weighted_order_is_reproducible_with_a_seeded_rng(tmp_path: Path) -> None:
    specs = ({"name": "a", "weight": 3}, {"name": "b", "weight": 1}, {"name": "c"})
    one, two = make_router(tmp_path, *specs, seed=7), make_router(tmp_path, *specs, seed=7)
    assert ([names(one.candidates(MODEL)) for _ in range(50)]
            == [names(two.candidates(MODEL)) for _ in range(50)])


def test_the_circuit_opens_at_the_threshold_and_the_upstream_goes_last(tmp_path: Path) -> None:
    clock = Clock()
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 2, "cooldown_s": 10.0},
                         {"name": "b", "priority": 1}, clock=clock)
    a = by_name(router, "a")
    router.failure(a, "timeout")
    assert a.healthy
    assert names(router.candidates(MODEL)) == ["a", "b"]
    router.failure(a, "http_5xx")
    assert not a.healthy
    assert a.open_until == clock.now + 10.0
    assert names(router.candidates(MODEL)) == ["b", "a"]  # last resort, not removed
    clock.now += 9.999
    assert names(router.candidates(MODEL)) == ["b", "a"]
    assert a.failures == {"timeout": 1, "http_5xx": 1}


def test_a_success_resets_the_consecutive_failure_count(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 2},
                         {"name": "b", "priority": 1})
    a = by_name(router, "a")
    router.failure(a)
    router.success(a)
    router.failure(a)
    assert a.healthy
    assert names(router.candidates(MODEL)) == ["a", "b"]


def test_an_open_upstream_leaves_the_weighted_tier(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 1, "weight": 1000},
                         {"name": "b"}, {"name": "c"}, {"name": "d", "priority": 1})
    router.failure(router.upstreams[0], "connect")
    for _ in range(100):
        order = names(router.candidates(MODEL))
        assert sorted(order[:2]) == ["b", "c"]
        assert order[2:] == ["d", "a"]


def test_after_cooldown_exactly_one_probe_is_offered(tmp_path: Path) -> None:
    clock = Clock()
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 2, "cooldown_s": 10.0},
                         {"name": "b", "priority": 1}, clock=clock)
    a = by_name(router, "a")
    router.failure(a)
    router.failure(a)
    clock.now += 10.0
    assert names(router.candidates(MODEL)) == ["a", "b"]  # half-open: offered again
    router.begin(a)
    assert a.probing
    # While the probe is in flight, other requests do not get `a` as available.
    assert names(router.candidates(MODEL)) == ["b", "a"]
    assert names(router.candidates(MODEL)) == ["b", "a"]
    assert not a.available(clock.now)


def test_abandon_clears_the_probe(tmp_path: Path) -> None:
    clock = Clock()
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 1, "cooldown_s": 5.0},
                         {"name": "b", "priority": 1}, clock=clock)
    a = by_name(router, "a")
    router.failure(a)
    clock.now += 5.0
    router.begin(a)
    router.abandon(a)
    assert not a.probing
    assert not a.healthy  # no verdict: still open, but probe-able again
    assert names(router.candidates(MODEL)) == ["a", "b"]


def test_a_failed_probe_reopens_the_circuit(tmp_path: Path) -> None:
    clock = Clock()
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 2, "cooldown_s": 10.0},
                         {"name": "b", "priority": 1}, clock=clock)
    a = by_name(router, "a")
    router.failure(a)
    router.failure(a)
    clock.now += 15.0
    router.begin(a)
    router.failure(a, "http_429")
    assert not a.probing
    assert a.open_until == clock.now + 10.0  # a full cooldown from the probe's failure
    assert names(router.candidates(MODEL)) == ["b", "a"]
    clock.now += 10.0
    assert names(router.candidates(MODEL)) == ["a", "b"]


def test_a_successful_probe_closes_the_circuit(tmp_path: Path) -> None:
    clock = Clock()
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 2, "cooldown_s": 10.0},
                         {"name": "b", "priority": 1}, clock=clock)
    a = by_name(router, "a")
    router.failure(a)
    router.failure(a)
    clock.now += 10.0
    router.begin(a)
    router.success(a)
    assert a.healthy and not a.probing and a.consecutive_failures == 0
    router.begin(a)  # a closed circuit has no probe to claim
    assert not a.probing
    assert names(router.candidates(MODEL)) == ["a", "b"]
    assert names(router.candidates(MODEL)) == ["a", "b"]


def test_unknown_failure_reasons_are_counted_as_other(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 100})
    a = router.upstreams[0]
    router.failure(a, "exploded")
    router.failure(a)
    router.failure(a, "reset")
    assert a.failures == {"other": 2, "reset": 1}


def test_a_single_upstream_is_always_the_candidate(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "only", "failure_threshold": 1})
    router.failure(router.upstreams[0])
    assert names(router.candidates(MODEL)) == ["only"]  # open, but the only way out


def test_any_healthy_follows_availability(tmp_path: Path) -> None:
    clock = Clock()
    router = make_router(tmp_path, {"name": "a", "failure_threshold": 1, "cooldown_s": 3.0},
                         {"name": "b", "failure_threshold": 1, "cooldown_s": 3.0}, clock=clock)
    a, b = router.upstreams
    assert router.any_healthy()
    router.failure(a)
    assert router.any_healthy()
    router.failure(b)
    assert not router.any_healthy()
    clock.now += 3.0
    assert router.any_healthy()  # probes are possible again
    router.begin(a)
    router.begin(b)
    assert not router.any_healthy()
    router.success(b)
    assert router.any_healthy()


def test_model_map_renames_the_model_for_the_upstream(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "a", "models": [MODEL, "gpt-4o"],
                                    "model_map": {MODEL: "llama-3.1-8b-instruct"}})
    a = router.upstreams[0]
    assert a.upstream_model(MODEL) == "llama-3.1-8b-instruct"
    assert a.upstream_model("gpt-4o") == "gpt-4o"


def test_upstream_headers_carry_the_key_from_the_environment(tmp_path: Path) -> None:
    router = make_router(tmp_path, {"name": "keyed", "api_key_env": "KEYED_UPSTREAM_KEY"},
                         {"name": "open"}, env={"KEYED_UPSTREAM_KEY": "sk-up-123"})
    keyed, open_ = router.upstreams
    assert keyed.head == b"Accept-Encoding: identity\r\nAuthorization: Bearer sk-up-123\r\n"
    assert open_.head == b"Accept-Encoding: identity\r\n"
