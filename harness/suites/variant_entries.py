"""The `variants:` list of a benchmark suite: each entry checked against its registered variant and
expanded into one `VariantExpansion` per combination of its list-valued parameters, with the labels
that name them in rows and figures (`expansion_labels`)."""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass
from typing import Any

from harness.cells import MODEL_ATTENTION_KEYS, jsonable, variant_fields
from harness.safe_io import CONTROL_CHARACTERS
from harness.store.schema import MODEL_VARIANT, SEQ_LEN
from harness.suites.common import KeyPath, Locator, check_cell_count, describe_fields, did_you_mean, values_text


@dataclass
class VariantExpansion:
    """One attention variant of a `variants:` entry: the entry's name with one combination of its
    list-valued parameters (and its own lengths and model variant)."""

    index: int  # position in `variants:`
    name: str
    params: dict[str, Any]
    value_index: dict[str, int]  # param -> index into its list, for list-valued params
    label: str | None
    varying_in_entry: list[str]  # list-valued params with more than one value
    seq_lens: list[int] | None = None  # the entry's own `seq_len:` list, replacing sweep.seq_len
    model_variant: str | None = None  # the entry's `model_variant:` (workload model): which LM to build


def expand_variants(entries: list[dict[str, Any]], locator: Locator, sweep: dict[str, list]) -> list[VariantExpansion]:
    """The expansions of the `variants:` entries (list-valued parameters: one per combination),
    after checking (`check_cell_count`) that with `sweep` they make at most MAX_CELLS cells."""
    import variants

    registered = variants.available("attention")
    if not entries:
        raise locator.error(("variants",), f"empty list: name at least one variant ({', '.join(registered)})")
    planned = []
    for i, entry in enumerate(entries):
        name = entry.get("name")
        if name is None:
            raise locator.error(("variants", i), f"missing 'name'; registered attention variants: {', '.join(registered)}")
        if name not in registered:
            raise locator.error(
                ("variants", i, "name"),
                f"unknown variant {name!r}{did_you_mean(name, registered)}; registered attention variants: {', '.join(registered)}",
            )
        fields = variant_fields(name)
        label = entry.get("label")
        one_line = isinstance(label, str) and label.strip() and not CONTROL_CHARACTERS.search(label) and not {"\t", "\n"} & set(label)
        if label is not None and not one_line:
            raise locator.error(("variants", i, "label"), f"label must be one line of text without control characters, got {label!r}")
        seq_lens = entry.get(SEQ_LEN)
        if seq_lens is not None:
            if not isinstance(seq_lens, list) or not seq_lens:
                raise locator.error(
                    ("variants", i, SEQ_LEN),
                    f"must be a non-empty list of lengths replacing sweep.seq_len for this entry, got {seq_lens!r}",
                )
            check_cell_count(len(seq_lens), locator, ("variants", i, SEQ_LEN), f"{len(seq_lens):,} values of seq_len")
            for j, value in enumerate(seq_lens):
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value in seq_lens[:j]:
                    raise locator.error(("variants", i, SEQ_LEN, j), f"seq_len values must be distinct positive integers, got {value!r}")
        model_variant = check_model_variant(entry.get(MODEL_VARIANT), ("variants", i, MODEL_VARIANT), locator)
        choices: dict[str, list[Any]] = {}
        expanded: set[str] = set()
        for key, value in entry.items():
            if key in ("name", "label", SEQ_LEN, MODEL_VARIANT):
                continue
            where = ("variants", i, key)
            if key in MODEL_ATTENTION_KEYS:
                raise locator.error(where, f"{key!r} comes from `model:` (set model.{key} or sweep it), not from a variant entry")
            if key not in fields:
                allowed = describe_fields({k: v for k, v in fields.items() if k not in MODEL_ATTENTION_KEYS})
                raise locator.error(
                    where, f"variant {name!r} does not take {key!r}{did_you_mean(key, fields)}; its parameters: {allowed}, plus label"
                )
            annotation = fields[key][0]
            takes_sequence = typing.get_origin(annotation) in (list, tuple) or any(
                typing.get_origin(a) in (list, tuple) for a in typing.get_args(annotation)
            )
            # A list expands into one variant per value, except a flat list for a sequence-typed parameter.
            expands = isinstance(value, list) and (not takes_sequence or all(isinstance(v, list) for v in value))
            if expands and not value:
                raise locator.error(where, "empty list: give at least one value")
            choices[key] = value if expands else [value]
            if expands:
                expanded.add(key)
        planned.append((i, name, choices, expanded, label, seq_lens, model_variant))
    other = math.prod(len(values) for key, values in sweep.items() if key != SEQ_LEN)
    count = sum(math.prod(map(len, p[2].values())) * len(p[5] or sweep[SEQ_LEN]) * other for p in planned)
    sizes = " x ".join(f"{len(values)} {key}" for key, values in sweep.items())
    check_cell_count(count, locator, ("variants",), f"{sizes} per variant expansion; list-valued variant parameters multiply")
    out = []
    for i, name, choices, expanded, label, seq_lens, model_variant in planned:
        varying = [k for k in choices if k in expanded and len(choices[k]) > 1]
        for combo in itertools.product(*(enumerate(v) for v in choices.values())):
            params = {k: v for k, (_, v) in zip(choices, combo)}
            value_index = {k: j for k, (j, _) in zip(choices, combo) if k in expanded}
            out.append(VariantExpansion(i, name, params, value_index, label, varying, seq_lens, model_variant))
    return out


def check_model_variant(value: Any, where: KeyPath, locator: Locator) -> str | None:
    """A variant entry's `model_variant`: a registered model-kind variant (the LM a `model` cell
    builds: `reformer_lm`, ours, or a peer such as `hf_reformer_lm`), or None when not given."""
    import variants

    if value is None:
        return None
    models = variants.available("model")
    if value not in models:
        raise locator.error(where, f"unknown model variant {value!r}{did_you_mean(value, models)}; model variants: {', '.join(models)}")
    return str(value)


def expansion_labels(expansions: list[VariantExpansion], locator: Locator) -> list[str]:
    """Entry label (plus what varies within the entry) or auto: name + params that vary across
    all expansions of that variant name."""
    effective = []
    for e in expansions:
        defaults = {k: d for k, (_, d) in variant_fields(e.name).items() if k not in MODEL_ATTENTION_KEYS}
        effective.append(jsonable(defaults | e.params))
    labels = []
    for e, eff in zip(expansions, effective):
        if e.label is not None:
            labels.append(" ".join([e.label] + [f"{k}={values_text(e.params[k])}" for k in e.varying_in_entry]))
            continue
        same = [f for x, f in zip(expansions, effective) if x.name == e.name]
        shown = [k for k in eff if len({values_text(f.get(k)) for f in same}) > 1]
        name = e.name if e.model_variant is None else f"{e.model_variant} {e.name}"
        labels.append(" ".join([name] + [f"{k}={values_text(eff[k])}" for k in shown]))
    first: dict[str, tuple[int, dict]] = {}
    for e, label in zip(expansions, labels):
        identity = e.params | {"name": e.name, MODEL_VARIANT: e.model_variant}
        if label in first and first[label][1] != identity:
            raise locator.error(
                ("variants", e.index), f"label {label!r} is also used by variants[{first[label][0]}]; give one a distinct `label:`"
            )
        first.setdefault(label, (e.index, identity))
    return labels
