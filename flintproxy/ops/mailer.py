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
from flintproxy.store.outbox import Outbox

__all__ = ["MailError", "Mailer", "OutboxSender", "compose"]

MAX_ATTEMPTS = 12  # ~1 h 8 min of backoff in all (1 s doubling, capped at 30 min)
MAX_DELAY_MS = 30 * 60 * 1000
TICK_S = 1.0  # the composition root runs ``OutboxSender.run_once`` this often

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


class OutboxSender:
    """One tick: claim up to ``max_per_second`` due messages and send them one by one.

    A transient failure retries with exponential backoff (1 s, 2 s, 4 s ... capped at
    30 min); a permanent refusal, or ``MAX_ATTEMPTS`` failures, drops the message with
    a warning naming its id and the reason, never its recipient or body.
    """

    def __init__(self, outbox: Outbox, mailer: Mailer) -> None:
        self.outbox = outbox
        self.mailer = mailer
        self.per_tick = max(1, int(mailer.cfg.max_per_second * TICK_S))
        self.sent = 0
        self.dropped = 0

    async def run_once(self) -> int:
        """Returns the messages handed over in this tick."""
        lease_ms = int((self.mailer.cfg.timeout_s * 2 + 5) * 1000) * self.per_tick
        sent = 0
        for mail in await self.outbox.claim(self.per_tick, lease_ms):
            msg = compose(self.mailer.cfg, mail.recipient, mail.subject, mail.body)
            try:
                await self.mailer.send(msg)
            except MailError as exc:
                attempts = mail.attempts + 1
                if exc.permanent or attempts >= MAX_ATTEMPTS:
                    log.warning("email %d dropped after %d attempts: %s", mail.id, attempts,
                                exc.reason)
                    await self.outbox.sent(mail.id)
                    self.dropped += 1
                else:
                    delay = min(1000 * 2 ** (attempts - 1), MAX_DELAY_MS)
                    log.info("email %d not sent (%s); retry in %d s", mail.id, exc.reason,
                             delay // 1000)
                    await self.outbox.retry(mail.id, attempts, delay)
                continue
            await self.outbox.sent(mail.id)
            sent += 1
        self.sent += sent
        return sent
