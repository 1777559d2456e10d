"""The regression gate: `harness check RUN --baseline B`, `harness check RUN --targets`, `harness baseline`.

    rules.py       the `checks:` block of a suite (and of a --checks file): pydantic schema, no pandas
                   or torch (the suite loader validates with it; the analysis of targets reads it)
    verdicts.py    the verdicts, one `Comparison`, and the rule that turns an effect backed by samples
                   into a verdict: the noise test of harness.analysis.pairing with a threshold on top
    regression.py  `run_check`: pair a run with a baseline (harness.analysis.pairing.pair_runs) and
                   judge every pair under the rules; `CheckReport`
    ratios.py      the `ratios:` rules: a time ratio within one run against the same ratio in the baseline
    formats.py     the check as text, Markdown and JSON (documents of harness.report.document)
    targets.py     `--targets`: the suite's absolute targets (harness.analysis.targets) as text
    baseline.py    finding a baseline by name and promoting a run to one

This package imports nothing heavy at its top, so that `harness.check.rules` stays light.
"""
