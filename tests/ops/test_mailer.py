"""The SMTP sender, against the mock SMTP server (aiosmtpd) on loopback."""

from __future__ import annotations

import logging

import pytest

from flintproxy.config import EmailConfig
from flintproxy.ops.mailer import Mailer, MailError, compose
from flintproxy.tools.mock_smtp import MockSmtp


async def test_a_message_reaches_the_smtp_server_with_login_and_nothing_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = MockSmtp()
    port = await sink.start()
    try:
        cfg = EmailConfig(host="127.0.0.1", port=port, starttls=False, username="flint",
                          password="pw", sender="noreply@flint.test")
        await Mailer(cfg).send(compose(cfg, "alice@example.com", "Reset", "secret link"))
        (got,) = await sink.wait_for(1)
    finally:
        await sink.close()
    assert got.recipients == ("alice@example.com",) and got.sender == "noreply@flint.test"
    assert got.subject == "Reset" and got.text.strip() == "secret link"
    assert got.login == "flint"
    assert "secret link" not in caplog.text and "alice@example.com" not in caplog.text


async def test_an_absent_server_is_a_transient_failure_that_names_no_recipient() -> None:
    sink = MockSmtp()
    port = await sink.start()
    await sink.close()
    cfg = EmailConfig(host="127.0.0.1", port=port, starttls=False, timeout_s=2.0)
    with pytest.raises(MailError) as caught:
        await Mailer(cfg).send(compose(cfg, "alice@example.com", "s", "b"))
    assert not caught.value.permanent
    assert "alice" not in str(caught.value)


async def test_starttls_required_against_a_server_without_it_fails_rather_than_send_clear(
        ) -> None:
    sink = MockSmtp()
    port = await sink.start()
    try:
        cfg = EmailConfig(host="127.0.0.1", port=port, starttls=True, timeout_s=2.0)
        with pytest.raises(MailError):
            await Mailer(cfg).send(compose(cfg, "alice@example.com", "s", "b"))
        assert sink.messages == []
    finally:
        await sink.close()
