"""Amounts written with their currency's decimals (domain/money.py); no database."""

import json

import pytest

from domain import money


@pytest.mark.parametrize(
    ("cents", "currency", "written"),
    [
        (1234, "eur", "12.34 EUR"),
        (1234, "EUR", "12.34 EUR"),
        (5, "usd", "0.05 USD"),
        (0, "usd", "0.00 USD"),
        (-1234, "usd", "-12.34 USD"),
        (-5, "gbp", "-0.05 GBP"),
        (1234, "jpy", "1234 JPY"),
        (-1234, "krw", "-1234 KRW"),
        (0, "xof", "0 XOF"),
        (1234, "kwd", "1.234 KWD"),
        (-50, "bhd", "-0.050 BHD"),
        (1_000_000, "tnd", "1000.000 TND"),
        (1234, "isk", "12.34 ISK"),  # two decimals in Stripe's amounts
        (1234, "xyz", "12.34 XYZ"),  # unknown: two decimals
        (1234, None, "12.34"),
        (10**18 + 1, "usd", "10000000000000000.01 USD"),  # exact beyond a float's precision
    ],
)
def test_format_amount(cents, currency, written):
    assert money.format_amount(cents, currency) == written


def test_no_amount():
    assert money.format_amount(None, "eur") == "-"
    assert money.json_amount(None, "eur") is None


def test_every_zero_and_three_decimal_currency_stripe_lists():
    assert sorted(money.ZERO_DECIMAL) == ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf",
                                          "ugx", "vnd", "vuv", "xaf", "xof", "xpf"]
    assert sorted(money.THREE_DECIMAL) == ["bhd", "jod", "kwd", "omr", "tnd"]
    assert {money.decimals(c) for c in money.ZERO_DECIMAL} == {0}
    assert {money.decimals(c) for c in money.THREE_DECIMAL} == {3}
    assert money.decimals("usd") == money.decimals(None) == 2


def test_json_amount_keeps_the_exact_integer_and_a_decimal_string():
    assert money.json_amount(-1234, "KWD") == {"minor_units": -1234, "currency": "kwd", "amount": "-1.234"}
    assert money.json_amount(1234, "jpy") == {"minor_units": 1234, "currency": "jpy", "amount": "1234"}
    assert money.json_amount(7, None) == {"minor_units": 7, "currency": None, "amount": "0.07"}
    assert json.loads(json.dumps(money.json_amount(1234, "eur"))) == money.json_amount(1234, "eur")
