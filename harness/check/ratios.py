"""The `ratios:` rules of a check: median(numerator) / median(denominator) time within one run,
against the same ratio in the baseline.

A ratio pairs each numerator cell with the one denominator cell that agrees on `match_on`; the
effect is the ratio of medians now over the baseline's, and the evidence the per-repeat ratios
(numerator[i] / denominator[i], samples paired in recorded order), judged by
`harness.check.verdicts.decide` (the noise test with the rule's threshold on top). A wall-time
ratio over a contended cell is inconclusive; CPU-time ratios (meant for shared machines) stand.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd

from harness.analysis.pairing import KEY, samples_of
from harness.analysis.stats import median
from harness.check.rules import RATIO_SAMPLES, RatioRule
from harness.check.verdicts import INCONCLUSIVE, MISSING, NEW, UNTESTED, CheckError, Comparison, contention_note, decide
from harness.expressions import ExpressionError, both, select_rows
from harness.store.schema import STATUS, STATUS_OK


def ratio_pairs(frame: pd.DataFrame, rule: RatioRule, label: Callable[[dict], str]) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(numerator key, denominator key) -> (numerator row, denominator row) of one run."""

    def select(expr: str) -> pd.DataFrame:
        try:
            return select_rows(frame, both(expr, rule.at))
        except ExpressionError as error:
            raise CheckError(f"ratio check: {error}") from None

    numerators, denominators = select(rule.numerator), select(rule.denominator)
    missing = [c for c in rule.match_on if c not in frame.columns]
    if missing:
        raise CheckError(f"ratio check {rule.numerator!r} / {rule.denominator!r}: match_on column(s) {missing} not in the results")
    pairs = {}
    for num in numerators.to_dict("records"):
        same = denominators
        for column in rule.match_on:
            same = same[same[column] == num[column]]
        if len(same) > 1:
            raise CheckError(
                f"ratio check: {len(same)} denominator cells ({rule.denominator!r}) match {label(num)!r} "
                f"on {rule.match_on}; narrow the denominator or add columns to match_on"
            )
        if len(same) == 1:
            den = same.iloc[0].to_dict()
            pairs[(num[KEY], den[KEY])] = (num, den)
    return pairs


def compare_ratios(base: pd.DataFrame, now: pd.DataFrame, rule: RatioRule, label: Callable[[dict], str]) -> list[Comparison]:
    """One comparison per (numerator, denominator) pair present in the baseline and/or the run.

    The per-repeat ratios numerator[i] / denominator[i] (samples paired in recorded order) of the
    run are tested against the baseline's by `decide` (the noise test, the rule's threshold on top).
    """
    base_pairs, now_pairs = ratio_pairs(base, rule, label), ratio_pairs(now, rule, label)
    if not base_pairs and not now_pairs:  # a check that compares nothing must not pass silently
        raise CheckError(
            f"ratio check {rule.name or rule.numerator + ' / ' + rule.denominator!r}: no numerator cell "
            f"({both(rule.numerator, rule.at)!r}) with a matching denominator cell ({rule.denominator!r}) in the run or the "
            "baseline; fix the expressions (`harness run SUITE --dry-run --filter EXPR` lists what one selects)"
        )
    out = []
    metric = f"{rule.metric.replace('_', ' ')} ratio"  # "time ratio" | "cpu time ratio"
    for key in list(base_pairs) + [k for k in now_pairs if k not in base_pairs]:
        pair = now_pairs.get(key) or base_pairs[key]
        name = rule.name or f"{label(pair[0])} / {label(pair[1])}"
        if key not in now_pairs or key not in base_pairs:
            out.append(Comparison(name, metric, None, None, verdict=MISSING if key not in now_pairs else NEW, config_key="/".join(key)))
            continue
        (bn, bd), (nn, nd) = base_pairs[key], now_pairs[key]
        if any(r.get(STATUS) != STATUS_OK for r in (bn, bd, nn, nd)):
            out.append(Comparison(name, metric, None, None, verdict=UNTESTED, note="a cell did not finish ok", config_key="/".join(key)))
            continue
        column = RATIO_SAMPLES[rule.metric]
        vague = contention_note(bn, bd, nn, nd, names=("baseline numerator", "baseline denominator", "numerator", "denominator"))
        if vague and rule.metric != "cpu_time":  # CPU-time ratios are meant for shared machines: they stand
            out.append(Comparison(name, metric, None, None, verdict=INCONCLUSIVE, note=vague, config_key="/".join(key)))
            continue
        nn_s, nd_s, bn_s, bd_s = (samples_of(r, column) for r in (nn, nd, bn, bd))
        if not (nn_s and nd_s and bn_s and bd_s) or min(median(nn_s), median(nd_s), median(bn_s), median(bd_s)) <= 0:
            out.append(Comparison(name, metric, None, None, verdict=UNTESTED, note=f"no {column} in both runs", config_key="/".join(key)))
            continue
        # Per-repeat ratios, samples paired in recorded order: independent draws of the ratio.
        per_now = [a / b for a, b in zip(nn_s, nd_s) if b > 0]
        per_base = [a / b for a, b in zip(bn_s, bd_s) if b > 0]
        ratio_now, ratio_base = median(nn_s) / median(nd_s), median(bn_s) / median(bd_s)
        change = ratio_now / ratio_base  # the effect: ratio of medians; the per-repeat ratios test it
        p, verdict, note = decide(change, per_now, per_base, rule.threshold, rule.p_value)
        out.append(Comparison(name, metric, ratio_base, ratio_now, change, p, verdict, note, "/".join(key)))
    return out
