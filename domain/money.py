"""Amounts as Stripe keeps them: integers in the currency's minor unit, written out with the
currency's decimals. A leaf: it imports nothing of the project.

Stripe's amounts are "cents" for most currencies, but not all of them: a zero-decimal
currency's amount is in whole units (`500` JPY is ¥500) and a three-decimal currency's in
thousandths (`1234` KWD is 1.234 KWD). Stripe lists both groups in its supported-currencies
page (https://docs.stripe.com/currencies). ISK, HUF and TWD, which Stripe treats as
zero-decimal for some purposes, keep two decimals in API amounts, so they are not listed here.
"""

from __future__ import annotations

from typing import TypedDict

ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
)
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})


class JsonAmount(TypedDict):
    """An amount for exports: the exact integer Stripe uses, its currency, and the same amount
    as a decimal string (never a float, which could not hold every amount exactly)."""

    minor_units: int
    currency: str | None
    amount: str


def decimals(currency: str | None) -> int:
    """How many decimals the currency's minor unit has in Stripe's amounts; 2 for a currency
    not known to differ (or none)."""
    code = (currency or "").lower()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    return 2


def decimal_string(minor_units: int, currency: str | None) -> str:
    """The amount in the currency's major unit, as a plain decimal string: `-12.34`, `1234`, `1.234`."""
    places = decimals(currency)
    sign, magnitude = ("-" if minor_units < 0 else ""), abs(minor_units)
    if places == 0:
        return f"{sign}{magnitude}"
    whole, fraction = divmod(magnitude, 10**places)
    return f"{sign}{whole}.{fraction:0{places}d}"


def format_amount(cents: int | None, currency: str | None) -> str:
    """An amount for people: `12.34 EUR`, `1234 JPY`, `1.234 KWD`, `-0.05 USD`; `-` for no
    amount, and the bare number when the currency is unknown."""
    if cents is None:
        return "-"
    number = decimal_string(cents, currency)
    return f"{number} {currency.upper()}" if currency else number


def json_amount(cents: int | None, currency: str | None) -> JsonAmount | None:
    """The JSON-safe form of an amount for exports (None for no amount)."""
    if cents is None:
        return None
    return {"minor_units": cents, "currency": currency.lower() if currency else None,
            "amount": decimal_string(cents, currency)}
