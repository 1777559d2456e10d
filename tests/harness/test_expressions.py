"""harness.expressions: the safe selection language, checked against plain-Python evaluation of the
same conditions row by row (an independent reference), and every payload that used to run code."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from harness.expressions import ExpressionError, parse_expression, select_rows

ROWS = [
    {"variant": "lsh", "seq_len": 1024, "n_hashes": 8, "causal": True, "time_ms_median": 12.5},
    {"variant": "full", "seq_len": 2048, "n_hashes": None, "causal": False, "time_ms_median": 40.0},
    {"variant": "hf_lsh", "seq_len": 4096, "n_hashes": 8, "causal": True, "time_ms_median": 90.0},
    {"variant": "lsh", "seq_len": 16384, "n_hashes": 2, "causal": False, "time_ms_median": 300.0},
]

# expression -> the same condition written as a Python function of one row (the reference)
VALID = {
    "variant == 'lsh' and seq_len <= 4096": lambda r: r["variant"] == "lsh" and r["seq_len"] <= 4096,
    "variant in ['hf_lsh', 'full']": lambda r: r["variant"] in ("hf_lsh", "full"),
    "variant not in ('lsh',)": lambda r: r["variant"] != "lsh",
    "n_hashes == 8": lambda r: r["n_hashes"] == 8,
    "n_hashes > 1": lambda r: r["n_hashes"] is not None and r["n_hashes"] > 1,
    "1024 < seq_len <= 4096": lambda r: 1024 < r["seq_len"] <= 4096,
    "seq_len > 10**6": lambda r: r["seq_len"] > 10**6,
    "not causal": lambda r: not r["causal"],
    "causal or seq_len == 16384": lambda r: r["causal"] or r["seq_len"] == 16384,
    "log2(seq_len) >= 12": lambda r: math.log2(r["seq_len"]) >= 12,
    "time_ms_median / seq_len * 1000 < 20": lambda r: r["time_ms_median"] / r["seq_len"] * 1000 < 20,
    "seq_len % 2048 == 0 and -seq_len < -3000": lambda r: r["seq_len"] % 2048 == 0 and -r["seq_len"] < -3000,
    "max(seq_len, 4096) == 4096": lambda r: max(r["seq_len"], 4096) == 4096,
    "abs(time_ms_median - 40) < 1 or round(sqrt(seq_len)) == 128": lambda r: (
        abs(r["time_ms_median"] - 40) < 1 or round(math.sqrt(r["seq_len"])) == 128
    ),
    "True": lambda r: True,
}


@pytest.mark.parametrize("text", sorted(VALID))
def test_selects_what_plain_python_selects(text):
    frame = pd.DataFrame(ROWS)
    expected = [i for i, row in enumerate(ROWS) if VALID[text](row)]
    assert list(select_rows(frame, text).index) == expected


PAYLOADS = {
    "@pd.io.common.os.system('touch pwned') == 0 or seq_len > 0": "'@'",
    "__import__('os').system('touch pwned') == 0": "calling anything but the listed functions",
    "seq_len.__class__.__mro__ == 1": "attribute access",
    "open('pwned', 'w') == 1": "calling anything but the listed functions",
    "(lambda: 1)() == 1": "lambda",
    "[c for c in variant] == 1": "comprehensions",
    "f'{seq_len}' == '1'": "f-strings",
    "variant[0] == 'l'": "subscripts",
    "(seq_len := 3) == 3": "assignment",
    "seq_len is None": "'is'",
    "~causal": "'~'",
    "variant in variant": "`in` with anything but a [list] of literals",
    "seq_len in [len]": "a list item that is not a literal",
    "seq_len & 1 == 1": "operator BitAnd",
    "`seq_len` > 1": "backticks",
    "{'a': 1} == 1": "dicts",
    "round(seq_len, ndigits=2) == 1": "round() with these arguments",
    "seq_len >>> 3": "not valid syntax",
    "1": "not a condition",
    "seq_len + 1": "not a condition",
    "'text'": "not a condition",
    "": "empty expression",
    "x" * 3000: "longer than",
}


@pytest.mark.parametrize("text", sorted(PAYLOADS))
def test_rejects_everything_outside_the_language_when_parsed(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExpressionError) as error:
        parse_expression(text)
    assert PAYLOADS[text] in str(error.value)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("no_such_column == 1", "unknown column 'no_such_column'; available columns: variant, seq_len"),
        ("variant < 3", "cannot be evaluated on these rows"),
        ("'a' * 10**9 == variant", "arithmetic needs numbers"),
        ("10**10**10 > seq_len", "exponent"),
        ("seq_len", "is not a condition"),
        ("2 ** seq_len > 0", "'2 ** seq_len' at column 1 overflows 64-bit integers"),  # int64 would wrap to 0
        ("seq_len * seq_len * seq_len * seq_len * seq_len > 0", "overflows 64-bit integers"),
    ],
)
def test_evaluation_errors_are_clean_and_bounded(text, problem):
    with pytest.raises(ExpressionError) as error:
        select_rows(pd.DataFrame(ROWS), text)
    assert problem in str(error.value)


def test_columns_are_reported():
    assert parse_expression("variant == 'lsh' and log2(seq_len) > n_hashes").columns == {"variant", "seq_len", "n_hashes"}


def test_integer_arithmetic_in_range_is_exact_and_floats_do_not_overflow():
    frame = pd.DataFrame({"seq_len": [10, 62]})
    assert select_rows(frame, "2 ** seq_len == 4611686018427387904")["seq_len"].tolist() == [62]  # 2**62 exactly
    frame = pd.DataFrame({"seq_len": [10, 64]})
    assert select_rows(frame, "2.0 ** seq_len > 2.0 ** 63")["seq_len"].tolist() == [64]
