"""Money: integer nano-dollars everywhere, decimal strings only at the edges.

The one home of the unit and of the two conversions users see: a decimal USD string
in (config prices, ``admin credit``, amounts in the API) and a decimal USD string out
(balances, costs). Floats never hold money: 0.1 + 0.2 is not 0.3, and a balance that
drifts by one nano-dollar per request is wrong after a billion of them.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation, localcontext

__all__ = ["NANO_PER_USD", "format_usd", "usd_to_nano"]

NANO_PER_USD = 1_000_000_000


def usd_to_nano(text: str) -> int:
    """Exact conversion of a decimal USD string (``"0.15"``) into nano-dollars.

    Raises ``ValueError`` saying what is wrong (the caller names the field).
    """
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError("is not a decimal number") from None
    if not d.is_finite() or d < 0:
        raise ValueError("must be a finite amount >= 0")
    if d and d.adjusted() > 100:  # no amount has 100 digits; "1e999999999" would
        raise ValueError("is too large")  # overflow the multiplication below
    # Exact whatever the number of digits (the default context rounds at 28).
    with localcontext() as ctx:
        ctx.prec = max(28, len(d.as_tuple().digits) + 10)
        nano = d * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError("has more precision than one nano-dollar")
    return int(nano)


def format_usd(nano: int) -> str:
    """Exact decimal USD for display, at least two decimals: 150 -> "0.00000015",
    5_000_000_000 -> "5.00", -1 -> "-0.000000001"."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    digits = f"{frac:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"
