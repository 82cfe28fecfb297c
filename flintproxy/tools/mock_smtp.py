"""``flintproxy mock-smtp``: a development SMTP server (aiosmtpd) that prints what it gets.

With it ``make run`` shows the whole email flow (password reset, email change, notices)
with no mail server, and the tests receive the gateway's mail over a real SMTP session
on loopback: ``MockSmtp.messages`` keeps every message, ``wait_for`` awaits a count.
It runs on the caller's event loop (aiosmtpd's protocol under ``loop.create_server``),
not in aiosmtpd's ``Controller`` thread, so tests need no locks to read it.

It accepts every sender and recipient and any AUTH (``LOGIN``/``PLAIN``, any
password): it is a sink for development, never a relay. aiosmtpd's own ``mail.log``
logs every line of every message at DEBUG; the sink quiets it to WARNING (it prints
what it receives itself, when asked to), so no test run's log holds a message.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import sys
from dataclasses import dataclass
from email.message import EmailMessage
from typing import IO, Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["MockSmtp", "ReceivedMessage", "run_mock_smtp"]

MAX_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    sender: str
    recipients: tuple[str, ...]
    message: EmailMessage
    login: str | None  # the AUTH user name, when the client logged in

    @property
    def subject(self) -> str:
        return str(self.message["Subject"] or "")

    @property
    def text(self) -> str:
        body = self.message.get_body(("plain",))
        return "" if body is None else str(body.get_content())


def _authenticate(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                  auth_data: Any) -> AuthResult:
    login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None
    return AuthResult(success=True, auth_data=login)


class MockSmtp:
    """The sink: ``start`` listens, ``close`` stops; ``echo`` prints each message."""

    def __init__(self, echo: IO[str] | None = None) -> None:
        self.messages: list[ReceivedMessage] = []
        self.echo = echo
        self._server: asyncio.Server | None = None
        self.port = 0
        self._arrived = asyncio.Condition()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        login = session.auth_data if isinstance(session.auth_data, str) else None
        received = ReceivedMessage(str(envelope.mail_from),
                                   tuple(str(r) for r in envelope.rcpt_tos), parsed, login)
        self.messages.append(received)
        if self.echo is not None:
            print(f"--- mail from {received.sender} to {', '.join(received.recipients)}",
                  file=self.echo)
            print(raw.decode("utf-8", "replace").rstrip(), file=self.echo, flush=True)
        async with self._arrived:
            self._arrived.notify_all()
        return "250 OK"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port."""
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="mock-smtp", data_size_limit=MAX_MESSAGE_BYTES,
                         auth_required=False, auth_require_tls=False,
                         authenticator=_authenticate, loop=loop),
            host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[ReceivedMessage]:
        """Wait until ``count`` messages have arrived; returns them all."""
        async with asyncio.timeout(timeout_s), self._arrived:
            await self._arrived.wait_for(lambda: len(self.messages) >= count)
        return list(self.messages)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def run_mock_smtp(host: str, port: int) -> None:
    """Serve until cancelled, printing each message on stdout."""
    sink = MockSmtp(echo=sys.stdout)
    bound = await sink.start(host, port)
    print(f"mock SMTP listening on {host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sink.close()
