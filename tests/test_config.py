"""config: the shipped file loads; every error names its key and value; exact prices; env."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flintproxy.config import (
    Config,
    ConfigError,
    ModelPrice,
    RedisDown,
    UpstreamKind,
    build_config,
    load_config,
    usd_to_nano,
)
from tests.conftest import raw_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config" / "flintproxy.toml"

Raw = dict[str, Any]


def base(tmp_path: Path) -> Raw:
    return raw_config(tmp_path, {"local": "http://127.0.0.1:9001/v1"})


def errors_of(raw: Raw, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw, env or {})
    return str(info.value)


def test_the_shipped_config_loads() -> None:
    cfg = load_config(SHIPPED, env={})
    assert cfg.source == SHIPPED
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.storage.path == Path("var/flintproxy.db")
    [local] = cfg.upstreams
    assert local.name == "local"
    assert local.base_url == "http://127.0.0.1:9001/v1"
    assert local.api_key_env == "LOCAL_UPSTREAM_KEY" and local.api_key is None
    assert cfg.models["gpt-4o-mini"] == ModelPrice(150_000_000, 600_000_000, 75_000_000,
                                                   max_output_tokens=16384)
    # No cached price: cached input costs what input costs.
    assert cfg.models["text-embedding-3-small"] == ModelPrice(20_000_000, 0, 20_000_000)
    assert set(local.models) <= set(cfg.models)
    assert cfg.accounts.bootstrap_demo is True
    assert cfg.metrics.bearer_token is None


def test_the_test_config_and_defaults(tmp_path: Path) -> None:
    cfg = build_config(base(tmp_path), {})
    assert cfg.server.port == 0
    assert cfg.limits.default_rpm == 600 and cfg.limits.trusted_proxies == ()
    assert cfg.billing.default_max_tokens == 4096
    assert cfg.billing.max_tokens_per_media_part == 40_000
    # Without max_output_tokens only billing.default_max_tokens bounds a request.
    assert cfg.models["gpt-4o"].max_output_tokens is None
    assert cfg.models["gpt-4o"].limit_param == "max_tokens"
    assert cfg.upstreams[0].weight == 1 and cfg.upstreams[0].priority == 0
    assert cfg.upstreams_for("gpt-4o") == cfg.upstreams
    assert cfg.upstreams_for("nope") == ()


def test_a_models_output_limit_and_limit_param_are_read(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["models"]["gpt-4o"] |= {"max_output_tokens": 100, "limit_param": "max_completion_tokens"}
    raw["billing"] = {"max_tokens_per_media_part": 2000}
    cfg = build_config(raw, {})
    assert cfg.models["gpt-4o"].max_output_tokens == 100
    assert cfg.models["gpt-4o"].limit_param == "max_completion_tokens"
    assert cfg.billing.max_tokens_per_media_part == 2000


def test_lease_settings_are_read_exactly(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["billing"] = {"lease_ttl_s": 12, "lease_min_usd": "0.000000001",
                      "lease_max_usd": "1000", "lease_idle_return_s": 5}
    cfg = build_config(raw, {}).billing
    assert (cfg.lease_ttl_s, cfg.lease_min_nano, cfg.lease_max_nano,
            cfg.lease_idle_return_s) == (12.0, 1, 1_000_000_000_000, 5.0)
    defaults = build_config(base(tmp_path), {}).billing
    assert (defaults.lease_min_nano, defaults.lease_max_nano) == (500_000_000, 50_000_000_000)


def test_base_url_trailing_slash_is_dropped(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["upstreams"][0]["base_url"] = "https://api.example.com/v1/"
    assert build_config(raw, {}).upstreams[0].base_url == "https://api.example.com/v1"


def _set(*path: Any) -> Callable[[Raw], None]:
    """A mutator setting raw[path[0]]...[path[-2]] = path[-1]."""
    *keys, last, value = path

    def apply(raw: Raw) -> None:
        target = raw
        for k in keys:
            target = target.setdefault(k, {}) if isinstance(k, str) else target[k]
        target[last] = value

    return apply


def _del_price(raw: Raw) -> None:
    del raw["models"]["gpt-4o"]


def _dup_upstream(raw: Raw) -> None:
    raw["upstreams"].append(copy.deepcopy(raw["upstreams"][0]))


def _no_output_price(raw: Raw) -> None:
    del raw["models"]["gpt-4o"]["output_usd_per_mtok"]


# (mutation, substrings the message must contain: the key, then the value's repr)
ERRORS: dict[str, tuple[Callable[[Raw], None], tuple[str, ...]]] = {
    "port as string": (_set("server", "port", "8080"), ("server.port", "'8080'", "integer")),
    "port out of range": (_set("server", "port", 70000), ("server.port", "70000")),
    "port as bool": (_set("server", "port", True), ("server.port", "True")),
    "weight 0": (_set("upstreams", 0, "weight", 0), ("upstreams[0].weight", "= 0")),
    "negative weight": (_set("upstreams", 0, "weight", -1), ("upstreams[0].weight", "-1")),
    "base_url scheme": (_set("upstreams", 0, "base_url", "ftp://h/v1"),
                        ("upstreams[0].base_url", "'ftp://h/v1'", "http(s) URL")),
    "base_url no host": (_set("upstreams", 0, "base_url", "localhost:9001/v1"),
                         ("upstreams[0].base_url", "'localhost:9001/v1'")),
    "base_url not a string": (_set("upstreams", 0, "base_url", 9001),
                              ("upstreams[0].base_url", "9001")),
    "empty models": (_set("upstreams", 0, "models", []), ("upstreams[0].models", "[]")),
    "models not a list": (_set("upstreams", 0, "models", "gpt-4o"),
                          ("upstreams[0].models", "'gpt-4o'")),
    "model without price": (_del_price, ("upstreams[0].models", "'gpt-4o'", "no price",
                                         '[models."gpt-4o"]')),
    "price missing": (_no_output_price, ('models."gpt-4o".output_usd_per_mtok', "required")),
    "price as float": (_set("models", "gpt-4o", "input_usd_per_mtok", 2.5),
                       ('models."gpt-4o".input_usd_per_mtok', "2.5", '"0.15"',
                        "floats are inexact")),
    "sub-nano price": (_set("models", "gpt-4o", "output_usd_per_mtok", "0.0000000001"),
                       ('models."gpt-4o".output_usd_per_mtok', "'0.0000000001'",
                        "nano-dollar")),
    "negative price": (_set("models", "gpt-4o", "output_usd_per_mtok", "-1"),
                       ('models."gpt-4o".output_usd_per_mtok', "'-1'")),
    "price not a number": (_set("models", "gpt-4o", "input_usd_per_mtok", "cheap"),
                           ('models."gpt-4o".input_usd_per_mtok', "'cheap'")),
    "unknown top-level key": (_set("sever", {"port": 1}), ("sever", "unknown key",
                                                           "server")),
    "unknown server key": (_set("server", "prot", 1), ("server.prot", "unknown key")),
    "unknown upstream key": (_set("upstreams", 0, "api_key", "sk-in-file"),
                             ("upstreams[0].api_key", "unknown key", "api_key_env")),
    "unknown model key": (_set("models", "gpt-4o", "input_usd", "1"),
                          ('models."gpt-4o".input_usd', "unknown key")),
    "zero max_output_tokens": (_set("models", "gpt-4o", "max_output_tokens", 0),
                               ('models."gpt-4o".max_output_tokens', "= 0", "integer")),
    "max_output_tokens as text": (_set("models", "gpt-4o", "max_output_tokens", "16k"),
                                  ('models."gpt-4o".max_output_tokens', "'16k'")),
    "bad limit_param": (_set("models", "gpt-4o", "limit_param", "max_output_tokens"),
                        ('models."gpt-4o".limit_param', "'max_output_tokens'",
                         "max_completion_tokens")),
    "bad media part bound": (_set("billing", "max_tokens_per_media_part", -1),
                             ("billing.max_tokens_per_media_part", "= -1")),
    "lease ttl too short": (_set("billing", "lease_ttl_s", 1),
                            ("billing.lease_ttl_s", "= 1", ">= 2.0")),
    "lease ttl too long": (_set("billing", "lease_ttl_s", 86400),
                           ("billing.lease_ttl_s", "86400", "[2, 3600]")),
    "lease slice as float": (_set("billing", "lease_min_usd", 0.5),
                             ("billing.lease_min_usd", "0.5", "floats are inexact")),
    "zero lease slice": (_set("billing", "lease_min_usd", "0"),
                         ("billing.lease_min_usd", "'0'", "above zero")),
    "lease max below min": (_set("billing", "lease_max_usd", "0.10"),
                            ("billing.lease_max_usd", "'0.10'", "lease_min_usd")),
    "lease idle return 0": (_set("billing", "lease_idle_return_s", 0),
                            ("billing.lease_idle_return_s", "= 0")),
    "unknown storage key": (_set("storage", "file", "x.db"), ("storage.file", "unknown key")),
    "duplicate upstream names": (_dup_upstream, ("upstreams[].name", "'local'", "unique")),
    "bad trusted proxy": (_set("limits", "trusted_proxies", ["10.0.0.0/8", "not-an-ip"]),
                          ("limits.trusted_proxies[1]", "'not-an-ip'")),
    "trusted proxies not a list": (_set("limits", "trusted_proxies", "10.0.0.1"),
                                   ("limits.trusted_proxies", "'10.0.0.1'")),
    "section not a table": (_set("server", 5), ("server", "5", "table")),
    "no upstreams": (_set("upstreams", []), ("upstreams", "[]", "[[upstreams]]")),
    "bad timeout": (_set("upstreams", 0, "read_timeout_s", 0),
                    ("upstreams[0].read_timeout_s", "= 0")),
    "bad bool": (_set("accounts", "secure_cookies", "yes"),
                 ("accounts.secure_cookies", "'yes'", 'true, false or "auto"')),
    "console head deadline 0": (_set("console", "head_timeout_s", 0),
                                ("console.head_timeout_s", "0.0", "(0, 3600]")),
    "console body deadline a string": (_set("console", "body_timeout_s", "5"),
                                       ("console.body_timeout_s", "'5'", "number")),
    "console cap 0": (_set("console", "max_connections", 0),
                      ("console.max_connections", "= 0", "integer")),
    "console per-ip cap above the cap": (
        lambda raw: raw.__setitem__("console", {"max_connections": 10,
                                                "max_connections_per_ip": 11}),
        ("console.max_connections_per_ip", "= 11", "at most")),
    "bad demo credit": (_set("accounts", "demo_credit_usd", 5), ("accounts.demo_credit_usd",
                                                                 "= 5")),
    "head timeout 0": (_set("server", "head_timeout_s", 0), ("server.head_timeout_s", "= 0")),
    "body timeout text": (_set("server", "body_timeout_s", "1s"),
                          ("server.body_timeout_s", "'1s'")),
    "write timeout negative": (_set("server", "write_timeout_s", -1),
                               ("server.write_timeout_s", "-1")),
    "negative connection cap": (_set("server", "max_connections", -1),
                                ("server.max_connections", "-1", "integer")),
    "per-ip cap as float": (_set("server", "max_connections_per_ip", 2.5),
                            ("server.max_connections_per_ip", "2.5")),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_each_error_names_the_key_and_the_value(tmp_path: Path, case: str) -> None:
    mutate, expected = ERRORS[case]
    raw = base(tmp_path)
    mutate(raw)
    message = errors_of(raw)
    assert message.startswith("config error: ")
    for part in expected:
        assert part in message, (part, message)


def test_the_api_key_in_an_error_is_the_files_not_the_envs(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["upstreams"][0]["api_key_env"] = "LOCAL_KEY"
    raw["upstreams"][0]["weight"] = 0
    assert "sk-from-env" not in errors_of(raw, {"LOCAL_KEY": "sk-from-env"})


@pytest.mark.parametrize(("usd", "nano"), [
    ("0.15", 150_000_000), ("10", 10_000_000_000), ("0.000000001", 1), ("0", 0),
    ("0.60", 600_000_000), ("2.50", 2_500_000_000), ("1e-9", 1), ("1000000", 10**15),
    ("0.1000000000", 100_000_000), ("123456789.123456789", 123_456_789_123_456_789),
])
def test_usd_to_nano_is_exact(usd: str, nano: int) -> None:
    assert usd_to_nano(usd, "k") == nano


@pytest.mark.parametrize("bad", [0.15, 1, None, "NaN", "Infinity", "-0.01", "0.0000000005",
                                 "", "1,5"])
def test_usd_to_nano_rejects_inexact_or_invalid(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        usd_to_nano(bad, "models.x.input_usd_per_mtok")
    assert str(info.value).startswith(f"config error: models.x.input_usd_per_mtok = {bad!r}")


def test_usd_to_nano_stays_exact_beyond_28_digits() -> None:
    with pytest.raises(ConfigError):
        usd_to_nano("0.0000000010000000000000000000000000001", "k")  # 1 nano + 1e-37
    assert usd_to_nano("12345678901234567890123456789", "k") == (
        12345678901234567890123456789 * 10**9)


def test_upstream_api_key_comes_only_from_the_named_env_var(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["upstreams"][0]["api_key_env"] = "LOCAL_UPSTREAM_KEY"
    cfg = build_config(raw, {"LOCAL_UPSTREAM_KEY": "sk-up-secret"})
    assert cfg.upstreams[0].api_key == "sk-up-secret"
    assert "sk-up-secret" not in repr(cfg)  # kept out of logs and tracebacks
    assert build_config(raw, {}).upstreams[0].api_key is None  # unset: no key
    raw["upstreams"][0]["api_key"] = "sk-in-file"
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.api_key: unknown key") as info:
        build_config(raw, {"LOCAL_UPSTREAM_KEY": "sk-up-secret"})
    assert "sk-in-file" not in str(info.value)  # a misplaced secret is not echoed


def test_metrics_bearer_token_comes_from_env(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["metrics"] = {"bearer_token_env": "METRICS_TOKEN"}
    cfg = build_config(raw, {"METRICS_TOKEN": "scrape-me"})
    assert cfg.metrics.bearer_token == "scrape-me"
    assert "scrape-me" not in repr(cfg)


def test_env_overrides_host_port_and_db(tmp_path: Path) -> None:
    env = {"FLINTPROXY_HOST": "0.0.0.0", "FLINTPROXY_PORT": "9999",
           "FLINTPROXY_DB": str(tmp_path / "other.db")}
    cfg = build_config(base(tmp_path), env)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 9999)
    assert cfg.storage.path == tmp_path / "other.db"
    # Empty values do not override.
    cfg = build_config(base(tmp_path), dict.fromkeys(env, ""))
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 0)
    assert cfg.storage.path == tmp_path / "flintproxy.db"


def test_process_environment_is_the_default_env(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLINTPROXY_PORT", "8181")
    assert build_config(base(tmp_path)).server.port == 8181


@pytest.mark.parametrize("port", ["abc", "70000", "-1"])
def test_a_bad_port_from_env_is_a_config_error(tmp_path: Path, port: str) -> None:
    with pytest.raises(ConfigError, match="FLINTPROXY_PORT"):
        build_config(base(tmp_path), {"FLINTPROXY_PORT": port})


def test_trusted_proxies_parse_ips_and_networks(tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["limits"] = {"trusted_proxies": ["10.0.0.1", "192.168.0.0/16", "::1", "10.1.2.3/8"]}
    assert build_config(raw, {}).limits.trusted_proxies == (
        ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("192.168.0.0/16"),
        ipaddress.ip_network("::1/128"), ipaddress.ip_network("10.0.0.0/8"))


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = build_config(base(tmp_path), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.upstreams[0].weight = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.storage = cfg.storage  # type: ignore[misc]
    assert isinstance(cfg.upstreams, tuple) and isinstance(cfg.upstreams[0].models, tuple)


def test_build_config_does_not_keep_the_raw_dict(tmp_path: Path) -> None:
    raw = base(tmp_path)
    cfg: Config = build_config(raw, {})
    raw["upstreams"][0]["models"].append("gpt-9")
    raw["upstreams"][0]["name"] = "changed"
    assert cfg.upstreams[0].models == ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
    assert cfg.upstreams[0].name == "local"


def test_load_config_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[server\nport = "8080"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"config error: {path}: invalid TOML")


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"config error: file {str(path)!r} not found"


def test_load_config_validates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(SHIPPED.read_text().replace("weight = 1 ", "weight = 0 "))
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.weight = 0"):
        load_config(path, env={})


def test_load_config_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\u00e9\n".encode("latin-1") + SHIPPED.read_bytes())
    with pytest.raises(ConfigError, match=r"latin1\.toml"):
        load_config(path, env={})


def test_upstream_kinds_cache_prices_and_provider_storage_are_validated(
        tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["upstreams"][0]["kind"] = "gemini"
    assert "upstreams[0].kind = 'gemini'" in errors_of(raw)
    raw = base(tmp_path)
    raw["models"]["gpt-4o"]["allow_provider_storage"] = "yes"
    assert "allow_provider_storage = 'yes'" in errors_of(raw)
    raw = base(tmp_path)
    raw["models"]["gpt-4o"]["cache_write_usd_per_mtok"] = 3.75
    assert "cache_write_usd_per_mtok = 3.75" in errors_of(raw)
    raw = base(tmp_path)
    raw["upstreams"][0]["anthropic_version"] = "2023\r\nx-evil: 1"
    assert "upstreams[0].anthropic_version" in errors_of(raw)
    raw = base(tmp_path)
    raw["upstreams"][0].update(kind="anthropic", anthropic_version="2024-01-01")
    raw["models"]["gpt-4o"].update(cache_write_usd_per_mtok="3.75", allow_provider_storage=True)
    cfg = build_config(raw, {})
    assert (cfg.upstreams[0].kind, cfg.upstreams[0].anthropic_version) == (
        UpstreamKind.ANTHROPIC, "2024-01-01")
    gpt4o = cfg.models["gpt-4o"]
    assert (gpt4o.cache_write_nano_per_mtok, gpt4o.allow_provider_storage) == (
        3_750_000_000, True)
    assert cfg.models["gpt-4o-mini"].cache_write_nano_per_mtok is None  # the input price


# --- [cluster] ----------------------------------------------------------------------


def test_the_cluster_defaults_are_embedded_and_fail_closed(tmp_path: Path) -> None:
    cfg = build_config(base(tmp_path), {})
    assert cfg.cluster.redis_url is None
    assert cfg.cluster.on_redis_down is RedisDown.CLOSED
    assert cfg.cluster.nodes == 1


def test_a_redis_url_from_the_environment_keeps_its_password_out_of_repr(
        tmp_path: Path) -> None:
    raw = base(tmp_path)
    raw["cluster"] = {"redis_url_env": "FP_REDIS", "on_redis_down": "open", "nodes": 4}
    cfg = build_config(raw, {"FP_REDIS": "redis://:pa55w0rd@10.0.0.5:6379/2"})
    assert cfg.cluster.redis_url == "redis://:pa55w0rd@10.0.0.5:6379/2"
    assert cfg.cluster.on_redis_down is RedisDown.OPEN and cfg.cluster.nodes == 4
    assert "pa55w0rd" not in repr(cfg)


@pytest.mark.parametrize(("cluster", "env", "expected"), [
    ({"redis_url": "http://:pa55w0rd@host:6379"}, {},
     "cluster.redis_url = 'http://:***@host:6379': must be a URL"),
    ({"redis_url": "redis://:pa55w0rd@host:99999/0"}, {},
     "cluster.redis_url = 'redis://:***@host:99999/0': bad port"),
    ({"redis_url": "redis://"}, {}, "must be a URL such as redis://"),
    ({"redis_url_env": "FP_REDIS"}, {}, "FP_REDIS (environment, from cluster.redis_url_env): "
     "is not set or empty"),
    ({"redis_url_env": "FP_REDIS", "redis_url": "redis://h"}, {"FP_REDIS": "redis://h"},
     "set one, not both"),
    ({"on_redis_down": "sometimes"}, {}, "cluster.on_redis_down = 'sometimes': must be"),
    ({"nodes": 0}, {}, "cluster.nodes = 0"),
    ({"redis_timeout_s": 0}, {}, "cluster.redis_timeout_s = 0.0"),
    ({"redis_passwd": "x"}, {}, "cluster.redis_passwd: unknown key"),
])
def test_a_bad_cluster_value_is_named_and_a_password_never_shown(
        tmp_path: Path, cluster: Raw, env: dict[str, str], expected: str) -> None:
    raw = base(tmp_path)
    raw["cluster"] = cluster
    message = errors_of(raw, env)
    assert expected in message
    assert "pa55w0rd" not in message
