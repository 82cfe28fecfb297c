"""No library's log line may carry a client address, a header value or body bytes.

aiohttp logged ``Error handling request from <client IP>`` with a traceback quoting
the raw request (a plaintext API key and body text reached the log). Our own code
logs no request data (by review and by test); other libraries' code is not ours to
review, so their records are scrubbed as they are made:

- the message is the library's format string with every argument that is not a
  number replaced by ``<redacted>`` (arguments are where request data goes);
- the traceback (``exc_info``) and stack are dropped: exception messages quote the
  bytes that caused them. The exception's type name is kept;
- only the message's first line is kept, at most 300 characters (more is a dump of
  context, e.g. asyncio's handler listing exceptions' reprs);
- what remains (messages built with f-strings) has IP addresses, bearer tokens and
  key-like strings replaced.

``install()`` wraps the log-record factory, so every record is scrubbed whichever
handler later sees it (handlers added after start-up too), and adds ``ScrubFilter``
to the root logger's handlers for records made without the factory. Runs per log
record, never per request: the hot path does not log.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["ScrubFilter", "install", "scrub"]

OURS = "flintproxy"
REDACTED = "<redacted>"
MAX_MESSAGE = 300  # characters of a third-party message kept (its first line only)

_IPV4 = r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"
# Any run of hex groups with two or more colons: over-redacts (a clock time too),
# never misses an address.
_IPV6 = r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f.]{0,15}(?:%\w+)?(?![\w:])"
_KEYLIKE = (r"(?i)(?:bearer\s+\S+|sk-[\w-]{6,}|(?:authorization|x-api-key|cookie|"
           r"set-cookie)\s*[:=]\s*\S+)")
_PATTERN = re.compile(f"{_KEYLIKE}|{_IPV4}|{_IPV6}")
_SAFE_ARG = (int, float)  # bool is an int


def _ours(name: str) -> bool:
    return name == OURS or name.startswith(OURS + ".")


def redact(text: str) -> str:
    """``text`` with IP addresses and key-like strings replaced."""
    return _PATTERN.sub(REDACTED, text)


def scrub(record: logging.LogRecord) -> logging.LogRecord:
    """Make a third-party record safe (in place); ours are left as they are."""
    if _ours(record.name) or record.__dict__.get("flint_scrubbed"):
        return record
    args: Any = record.args
    if args:
        if isinstance(args, dict):
            args = {k: v if isinstance(v, _SAFE_ARG) else REDACTED for k, v in args.items()}
        else:
            args = tuple(a if isinstance(a, _SAFE_ARG) else REDACTED for a in args)
        try:
            msg = str(record.msg) % args
        except (TypeError, ValueError, KeyError):
            msg = str(record.msg) + " " + REDACTED
    else:
        msg = str(record.msg)
    first, newline, _ = msg.partition("\n")
    if newline or len(first) > MAX_MESSAGE:
        # A format string is one line; more is a dump (asyncio's handler lists
        # futures and their exceptions' reprs, which quote the bytes).
        msg = first[:MAX_MESSAGE] + " [details withheld]"
    exc = record.exc_info
    if exc and exc[0] is not None:
        msg += f" ({exc[0].__name__}; details withheld)"
    record.msg = redact(msg)
    record.args = None
    record.exc_info = None
    record.exc_text = None
    record.stack_info = None
    record.__dict__["flint_scrubbed"] = True
    return record


class ScrubFilter(logging.Filter):
    """A handler filter applying ``scrub``; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record)
        return True


def install() -> None:
    """Scrub every third-party record from now on (idempotent, process-wide)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
    make = logging.getLogRecordFactory()
    if getattr(make, "flint_scrubbing", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return scrub(make(*args, **kwargs))

    factory.flint_scrubbing = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
