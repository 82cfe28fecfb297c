"""The deployment examples: they parse, and name files, services and ports that exist.

No network here, so no image is built: what can be checked offline is checked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from flintproxy.app.supervisor import refusal
from flintproxy.config import StorageBackend, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_the_dockerfile_copies_only_files_that_exist_and_runs_serve_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), source
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["flintproxy"]' in text
    assert 'CMD ["serve", "--config", "/etc/flintproxy/flintproxy.toml"]' in text


def test_compose_runs_several_nodes_on_postgresql_and_redis_with_prometheus() -> None:
    services = compose()["services"]
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    assert len(gateways) >= 2
    assert {"postgres", "redis", "prometheus"} <= set(services)
    for name in gateways:
        svc = services[name]
        assert svc["command"][0] == "serve"
        assert "/etc/flintproxy/flintproxy.toml" in svc["command"]
        mounts = [v.split(":")[0] for v in svc["volumes"]]
        for mount in mounts:
            assert (DEPLOY / mount).exists(), mount
        assert "redis" in svc["depends_on"]
    build = services["migrate"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).exists()


def test_prometheus_scrapes_every_nodes_console_port() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    nodes = {name for name in compose()["services"] if name.startswith("gateway-")}
    cfg = tomllib.loads((DEPLOY / "flintproxy.toml").read_text())
    assert targets == {f"{n}:{cfg['console']['port']}" for n in nodes}
    assert job["metrics_path"] == "/metrics"


def test_the_nodes_config_is_the_shared_mode_with_secrets_from_the_environment() -> None:
    cfg = tomllib.loads((DEPLOY / "flintproxy.toml").read_text())
    assert cfg["storage"]["backend"] == "postgresql"
    assert "redis_url" not in cfg["cluster"]
    env = compose()["x-gateway"]["environment"]
    assert cfg["cluster"]["redis_url_env"] in env
    assert cfg["upstreams"][0]["api_key_env"] in env
    workers = int(compose()["x-gateway"]["command"][-1])
    nodes = sum(1 for n in compose()["services"] if n.startswith("gateway-"))
    assert cfg["cluster"]["nodes"] == workers * nodes


def test_the_nodes_config_loads_with_the_environment_compose_gives() -> None:
    env = {k: str(v) for k, v in compose()["x-gateway"]["environment"].items()}
    cfg = load_config(DEPLOY / "flintproxy.toml", env)
    assert cfg.storage.backend is StorageBackend.POSTGRESQL
    assert cfg.cluster.redis_url == env["FLINTPROXY_REDIS_URL"]
    assert cfg.server.host == "0.0.0.0" and cfg.console.host == "0.0.0.0"
    # The supervisor would run these nodes' --workers: the shared mode, fixed ports.
    assert refusal(cfg, int(compose()["x-gateway"]["command"][-1])) is None


def test_the_systemd_unit_is_hardened() -> None:
    lines = (DEPLOY / "flintproxy.service").read_text().splitlines()
    settings: dict[str, list[str]] = {}
    for line in lines:
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "DynamicUser": "yes", "StateDirectory": "flintproxy",
                       "ProtectHome": "yes", "PrivateTmp": "yes",
                       "KillSignal": "SIGTERM"}.items():
        assert settings.get(key) == [value], key
    assert settings["CapabilityBoundingSet"] == [""]
    assert " serve --config " in settings["ExecStart"][0]
