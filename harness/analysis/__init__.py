"""Analyses of stored runs: what the report, compare and check compute before anything is rendered.

    series.py   which columns vary (the sweep axes), the series (line) of every row
    tables.py   pivot tables of a metric, contended cells, the rows of a run by kind, quality tables
    pairing.py  `pair_runs(a, b)`: the one way to pair two runs' cells and judge each pair's noise
    stats.py    Mann-Whitney U (scipy's conventions, no scipy), median, NOISE_ALPHA
    fits.py     scaling fits (exponents or slopes along a sweep axis)
    paper.py    published numbers (the Reformer paper, Long Range Arena) and a run beside them
    targets.py  a suite's absolute targets evaluated within one run

Nothing here imports the report or the check layer (only the `checks:` schema, harness.check.rules,
which the suites read too).
"""
