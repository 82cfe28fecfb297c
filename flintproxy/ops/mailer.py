"""Outgoing email over SMTP (aiosmtplib), for the outbox's background sender only.

Nothing on a request path sends mail: an endpoint writes an outbox row and answers;
the composition root's sender hands rows to ``Mailer.send`` and retries failures with
backoff, so a slow or absent mail server never slows the API nor loses a message.

Privacy: a message's body and its recipient never reach a log. A failure is logged
by its exception type and SMTP code alone; aiosmtplib itself logs nothing of them.
"""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

from flintproxy.config import EmailConfig

__all__ = ["MailError", "Mailer", "compose"]

log = logging.getLogger("flintproxy.mail")


class MailError(Exception):
    """One message could not be handed over; ``permanent`` when retrying cannot help
    (a 5xx refusal of the recipient or message)."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def compose(cfg: EmailConfig, to: str, subject: str, body: str) -> EmailMessage:
    """A plain-text message from the configured sender."""
    msg = EmailMessage()
    msg["From"] = cfg.sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain=cfg.sender.rpartition("@")[2] or None)
    msg.set_content(body)
    return msg


class Mailer:
    """Sends one message per call on a fresh SMTP session (the outbox's volume, a few a
    second at most, does not warrant a pooled connection and its timeouts)."""

    def __init__(self, cfg: EmailConfig) -> None:
        if cfg.host is None:
            raise ValueError("email.host is not configured")
        self.cfg = cfg
        self.host = cfg.host

    async def send(self, msg: EmailMessage) -> None:
        cfg = self.cfg
        try:
            await aiosmtplib.send(
                msg, hostname=self.host, port=cfg.port, start_tls=cfg.starttls,
                username=cfg.username, password=cfg.password, timeout=cfg.timeout_s)
        except aiosmtplib.SMTPRecipientsRefused:
            raise MailError("SMTPRecipientsRefused", permanent=True) from None
        except aiosmtplib.SMTPResponseException as exc:
            code = exc.code
            raise MailError(f"{type(exc).__name__} {code}", permanent=500 <= code < 600
                            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise MailError(type(exc).__name__, permanent=False) from None
