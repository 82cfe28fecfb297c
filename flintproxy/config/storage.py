"""``[storage]``: the embedded SQLite file, or a shared PostgreSQL server by DSN.

Why a module of its own: the DSN may hold a password, so it is read from the env by
preference, never echoed in an error, and masked (``mask_dsn``) wherever it is shown.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flintproxy.config.fields import check_keys, fail, read_int, read_str


class StorageBackend(enum.StrEnum):
    """Where accounts, keys and the ledger live: the embedded file or a shared server."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: Path = Path("var/flintproxy.db")
    backend: StorageBackend = StorageBackend.SQLITE
    # The PostgreSQL DSN (``dsn``, or read from the env var ``dsn_env``). It may hold a
    # password: never logged or shown; ``safe_dsn`` is what messages print.
    dsn: str | None = field(default=None, repr=False)
    dsn_env: str | None = None
    pool_size: int = 10

    @property
    def safe_dsn(self) -> str:
        """The DSN with its password masked, for messages and logs."""
        return mask_dsn(self.dsn or "")


def mask_dsn(dsn: str) -> str:
    """``postgresql://u:secret@h/db`` -> ``postgresql://u:***@h/db`` (also ``password=``)."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", dsn)


def parse_storage(raw: Mapping[str, Any], env: Mapping[str, str]) -> StorageConfig:
    p = "storage."
    check_keys(raw, {"path", "backend", "dsn", "dsn_env", "pool_size"}, p)
    path = env.get("FLINTPROXY_DB") or read_str(raw, "path", p, "var/flintproxy.db")
    backend_raw = raw.get("backend", "sqlite")
    try:
        backend = StorageBackend(backend_raw)
    except ValueError:
        raise fail(f"{p}backend", backend_raw, 'must be "sqlite" or "postgresql"') from None
    dsn_inline = raw.get("dsn")
    if dsn_inline is not None and (not isinstance(dsn_inline, str) or not dsn_inline):
        # Never echo the value: it may hold a password.
        raise fail(f"{p}dsn", "<hidden>", "must be a non-empty string")
    dsn_env = read_str(raw, "dsn_env", p, None)
    if dsn_inline is not None and dsn_env is not None:
        raise fail(f"{p}dsn_env", dsn_env, "give either storage.dsn or storage.dsn_env")
    dsn = env.get("FLINTPROXY_DSN") or (env.get(dsn_env) if dsn_env else dsn_inline)
    if backend is StorageBackend.POSTGRESQL:
        if not dsn:
            where = (f"the environment variable {dsn_env} is not set" if dsn_env
                     else "set storage.dsn_env (preferred: a DSN may hold a password) "
                          "or storage.dsn")
            raise fail(f"{p}dsn", None, f'backend = "postgresql" needs a DSN: {where}')
        if not re.match(r"postgres(ql)?://", dsn):
            raise fail(f"{p}dsn", mask_dsn(dsn), "must be a postgresql:// URL")
    return StorageConfig(path=Path(path or "var/flintproxy.db"), backend=backend, dsn=dsn,
                         dsn_env=dsn_env, pool_size=read_int(raw, "pool_size", p, 10, 1, 1000))
