"""``[models."NAME"]``: the price table, exact integers of nano-USD per million tokens.

Why a module of its own: a model without a price is not served, and every price is
parsed from a decimal string (floats are inexact) into the integers billing reserves
and settles with; the per-model output cap and provider-storage opt-in live here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flintproxy.config.fields import check_keys, fail, read_bool, read_int, usd_to_nano


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Prices in nano-dollars per million tokens (exact integers)."""

    input_nano_per_mtok: int
    output_nano_per_mtok: int
    cached_input_nano_per_mtok: int
    # The most output tokens one choice may produce: caps the client's max_tokens and
    # the default (None: billing.default_max_tokens alone).
    max_output_tokens: int | None = None
    # The body parameter added when the client sent no limit (see gate.bounds).
    limit_param: str = "max_tokens"
    # Anthropic's prompt-cache writes (cache_creation_input_tokens); cache reads are
    # billed at ``cached_input_nano_per_mtok``. Both default to the input price
    # (None here: the input price).
    cache_write_nano_per_mtok: int | None = None
    # CONTRACT promise 10: the provider is sent ``store: false`` (and stored state such
    # as previous_response_id is refused) unless the operator allows storage here.
    allow_provider_storage: bool = False


def parse_models(raw: Mapping[str, Any]) -> dict[str, ModelPrice]:
    out = {}
    for name, spec in raw.items():
        p = f'models."{name}".'
        if not isinstance(spec, Mapping):
            raise fail(f'models."{name}"', spec, "must be a table")
        check_keys(spec, {"input_usd_per_mtok", "output_usd_per_mtok",
                          "cached_input_usd_per_mtok", "cache_write_usd_per_mtok",
                          "max_output_tokens", "limit_param", "allow_provider_storage"}, p)
        for req in ("input_usd_per_mtok", "output_usd_per_mtok"):
            if req not in spec:
                raise fail(f"{p}{req}", None,
                           "is required (a model without a price is not served)")
        inp = usd_to_nano(spec["input_usd_per_mtok"], f"{p}input_usd_per_mtok")
        out[name] = ModelPrice(
            input_nano_per_mtok=inp,
            output_nano_per_mtok=usd_to_nano(spec["output_usd_per_mtok"],
                                             f"{p}output_usd_per_mtok"),
            cached_input_nano_per_mtok=usd_to_nano(spec["cached_input_usd_per_mtok"],
                                                   f"{p}cached_input_usd_per_mtok")
            if "cached_input_usd_per_mtok" in spec else inp,
            max_output_tokens=read_int(spec, "max_output_tokens", p, 0, 1, 10**7)
            if "max_output_tokens" in spec else None,
            limit_param=_limit_param(spec, p),
            cache_write_nano_per_mtok=usd_to_nano(spec["cache_write_usd_per_mtok"],
                                                  f"{p}cache_write_usd_per_mtok")
            if "cache_write_usd_per_mtok" in spec else None,
            allow_provider_storage=read_bool(spec, "allow_provider_storage", p, False),
        )
    return out


def _limit_param(spec: Mapping[str, Any], p: str) -> str:
    value = spec.get("limit_param", "max_tokens")
    if value not in ("max_tokens", "max_completion_tokens"):
        raise fail(f"{p}limit_param", value,
                   'must be "max_tokens" or "max_completion_tokens"')
    return str(value)
