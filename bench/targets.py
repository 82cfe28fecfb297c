"""What the bench measures: a target (a gateway, nginx, the upstream direct) and the cores.

Shared by ``run.py`` and the scenarios it delegates (``distributed.py``), so neither
imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import procs

# The gateway on core 0; the load generator and the upstream on core 1.
GW_CPU, LOAD_CPU, UP_CPU = "0", "1", "1"
PROMPT = [{"role": "user", "content": "Count from zero to nineteen, one token each."}]


@dataclass
class Target:
    name: str
    label: str
    base: str  # http://127.0.0.1:PORT
    json_path: str
    sse_path: str
    slow_path: str
    json_model: str = "bench-json"
    sse_model: str = "bench-sse"
    slow_model: str = "gpt-4o-mini"
    key: str | None = None
    child: procs.Child | None = None  # the process measured as "the gateway"
    measured_pids: list[int] = field(default_factory=list)
    payload: bytes | None = None  # a fixed body (scenario (e)'s APIs), else a chat one

    def pids(self) -> list[int]:
        return self.child.pids() if self.child is not None else list(self.measured_pids)

    def url(self, kind: str) -> str:
        return self.base + {"json": self.json_path, "sse": self.sse_path,
                            "slow": self.slow_path}[kind]

    def body(self, kind: str) -> bytes:
        if self.payload is not None:
            return self.payload
        model = {"json": self.json_model, "sse": self.sse_model, "slow": self.slow_model}[kind]
        obj: dict[str, Any] = {"model": model, "messages": PROMPT}
        if kind != "json":
            obj["stream"] = True
        return orjson.dumps(obj)
