"""The [email], [crypto] and [payments] sections: off by default, validated, secrets
read from the environment and never shown in an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flintproxy.config import ConfigError, build_config
from tests.conftest import raw_config


def _build(tmp_path: Path, env: dict[str, str] | None = None, **sections: Any) -> Any:
    raw = raw_config(tmp_path, {"local": "http://127.0.0.1:9/v1"})
    raw.update(sections)
    return build_config(raw, env or {})


def test_email_crypto_and_payments_are_off_unless_configured(tmp_path: Path) -> None:
    cfg = _build(tmp_path)
    assert not cfg.email.enabled and not cfg.crypto.enabled and not cfg.payments.enabled


def test_the_email_section_reads_its_password_from_the_named_env_var(tmp_path: Path) -> None:
    cfg = _build(tmp_path, {"SMTP_PW": "hunter2"},
                 email={"host": "smtp.test", "port": 2525, "starttls": False,
                        "username": "u", "password_env": "SMTP_PW", "from": "ops@flint.test"})
    assert cfg.email.enabled and cfg.email.port == 2525 and cfg.email.password == "hunter2"
    assert cfg.email.sender == "ops@flint.test" and "hunter2" not in repr(cfg.email)


def test_payments_read_both_secrets_from_the_environment(tmp_path: Path) -> None:
    env = {"SK": "sk_test_1", "WH": "whsec_1"}
    cfg = _build(tmp_path, env, payments={"stripe_secret_key_env": "SK",
                                          "stripe_webhook_secret_env": "WH",
                                          "api_base": "http://127.0.0.1:1234/"})
    p = cfg.payments
    assert p.enabled and p.stripe_secret_key == "sk_test_1" and p.api_base.endswith(":1234")
    assert "sk_test_1" not in repr(p) and "whsec_1" not in repr(p)


@pytest.mark.parametrize(("sections", "env", "needle"), [
    ({"email": {"from": "not an address"}}, {}, "email.from = 'not an address'"),
    ({"email": {"from": "a@b.c\r\nBcc: x@y.z"}}, {}, "email.from"),
    ({"email": {"port": 0}}, {}, "email.port = 0"),
    ({"email": {"password_env": "P"}}, {"P": "x"}, "email.username"),
    ({"email": {"public_url": "ftp://x"}}, {}, "email.public_url = 'ftp://x'"),
    ({"email": {"bogus": 1}}, {}, "email.bogus: unknown key"),
    ({"crypto": {"key_env": "K", "key_file": "k"}}, {}, "not both"),
    ({"payments": {"stripe_secret_key_env": "SK"}}, {},
     "the environment variable SK is not set"),
    ({"payments": {"stripe_secret_key_env": "SK"}}, {"SK": "sk"},
     "payments.stripe_webhook_secret_env"),
    ({"payments": {"stripe_webhook_secret_env": "WH"}}, {"WH": "w"},
     "payments.stripe_secret_key_env"),
    ({"payments": {"stripe_secret_key_env": "SK", "stripe_webhook_secret_env": "WH",
                   "min_topup_usd": "50", "max_topup_usd": "5"}},
     {"SK": "sk", "WH": "w"}, "payments.min_topup_usd = '50'"),
    ({"payments": {"stripe_secret_key_env": "SK", "stripe_webhook_secret_env": "WH",
                   "currency": "eur"}}, {"SK": "sk", "WH": "w"}, "payments.currency = 'eur'"),
])
def test_each_money_and_mail_setting_error_names_the_key(
        tmp_path: Path, sections: dict[str, Any], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _build(tmp_path, env, **sections)
    assert needle in str(caught.value)
    for secret in env.values():
        assert f"'{secret}'" not in str(caught.value)
