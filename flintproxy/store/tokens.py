"""Single-use emailed tokens (password resets, email changes): one home for how they
are made, stored and consumed.

A token is 32 random bytes, URL-safe; only its SHA-256 is stored. ``consume`` takes
it with a DELETE that returns the row, so of two concurrent uses exactly one wins,
and sweeps the table's expired tokens in the same transaction. An unknown, used,
expired or malformed token gets the caller's one refusal, whichever it was.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from flintproxy.errors import BadRequest
from flintproxy.store.db import Queries

__all__ = ["MAX_TOKEN_CHARS", "consume", "new_token", "token_hash"]

MAX_TOKEN_CHARS = 128


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


async def consume(begin: Callable[[], AbstractAsyncContextManager[Queries]], table: str,
                  columns: str, token: object, now_ms: int, refusal: BadRequest) -> Any:
    """Delete the token's row from ``table`` and return its ``columns`` (the last of
    which must be ``expires_at``), in a transaction from ``begin`` (the repository's);
    raise ``refusal`` unless it was there and live."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise refusal
    async with begin() as q:
        row = await q.fetchrow(f"DELETE FROM {table} WHERE token_hash = ? "  # noqa: S608
                               f"RETURNING {columns}", token_hash(token))
        # Expired tokens go too, whoever asks.
        await q.execute(f"DELETE FROM {table} WHERE expires_at <= ?", now_ms)  # noqa: S608
    if row is None or int(row[-1]) <= now_ms:
        raise refusal
    return row
