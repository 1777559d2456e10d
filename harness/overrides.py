"""Command-line overrides of suite keys: `--set PATH=VALUE` (repeatable) on `harness run` and `profile`.

    overrides = parse_overrides(["model.d_model=512", "sweep.seq_len=[1024, 2048]", "variants.1.n_hashes=4"])
    apply_overrides(data, overrides)          # in place, on the suite's data (harness.suites)

PATH is the key path of the suite file, dot-separated; an integer part indexes a list
(`variants.1.n_hashes`, also written `variants[1].n_hashes`). VALUE is parsed as YAML with the
bounds of suite files (harness.safe_yaml: no anchors or aliases, bounded size and depth), so
`4` is an int, `[1024, 2048]` a list, `{name: lsh}` a mapping and `true` a bool. The merged suite
then goes through the suite's own validator: an unknown key or a wrong type is reported there,
naming the `--set` argument (harness.suites.common.Locator).

Order (harness.suites.load_suite): overrides of `cpu.*`, `cuda.*`, `device` and `kind` edit the
file's data before its `cpu:` / `cuda:` block is merged (so `--set device=cuda` picks the `cuda:`
block); every other override applies after that merge, so a `--set` wins over the device block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from harness.safe_yaml import YAMLInputError, load_yaml

EARLY_KEYS = ("cpu", "cuda", "device", "kind")  # not a column: suite keys; overrides applied before the cpu:/cuda: merge
MAX_OVERRIDES = 256
_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*|\d+")


class OverrideError(ValueError):
    """An unusable `--set` argument; str names the argument, the key and what is allowed."""

    def __init__(self, argument: str, problem: str):
        self.argument, self.problem = argument, problem
        super().__init__(f"--set {argument}: {problem}")


@dataclass(frozen=True)
class Override:
    """One `--set PATH=VALUE`: the argument as typed, its key path and its parsed value."""

    text: str
    path: tuple[str | int, ...]
    value: Any

    @property
    def early(self) -> bool:
        """Applied before the `cpu:` / `cuda:` merge (module docstring)."""
        return self.path[0] in EARLY_KEYS

    def as_record(self) -> dict[str, Any]:
        """{"set": text, "path": "a.b.0", "value": value}: what run.json records."""
        return {"set": self.text, "path": ".".join(str(p) for p in self.path), "value": self.value}


def parse_path(text: str, argument: str) -> tuple[str | int, ...]:
    """ "variants.1.n_hashes" or "variants[1].n_hashes" -> ("variants", 1, "n_hashes")."""
    parts: list[str | int] = []
    for piece in re.sub(r"\[(\d+)\]", r".\1", text).split("."):
        if not _PART.fullmatch(piece):
            raise OverrideError(
                argument, f"bad key path {text!r}: use keys and list indices separated by dots, e.g. model.d_model or variants.1.n_hashes"
            )
        parts.append(int(piece) if piece.isdigit() else piece)
    if isinstance(parts[0], int):
        raise OverrideError(argument, f"bad key path {text!r}: it must start with a top-level key of the suite (e.g. model, sweep)")
    return tuple(parts)


def parse_override(argument: str) -> Override:
    """One `PATH=VALUE` argument; OverrideError when it is not one or its value is unusable YAML."""
    path_text, equals, value_text = argument.partition("=")
    if not equals or not path_text.strip():
        raise OverrideError(argument, "expected PATH=VALUE, e.g. --set model.d_model=512")
    path = parse_path(path_text.strip(), argument)
    if not value_text.strip():
        raise OverrideError(argument, f"no value for {path_text.strip()}; to give an empty text write {path_text.strip()}=''")
    try:
        value = load_yaml(value_text, f"--set {argument}")
    except YAMLInputError as error:
        line = f" (line {error.line})" if error.line is not None else ""
        raise OverrideError(argument, f"value of {path_text.strip()}{line}: {error.problem}") from None
    return Override(argument, path, value)


def parse_overrides(arguments: list[str] | None) -> list[Override]:
    """Every `--set` argument, in order (a later one on the same path wins)."""
    arguments = list(arguments or [])
    if len(arguments) > MAX_OVERRIDES:
        raise OverrideError(arguments[MAX_OVERRIDES], f"more than {MAX_OVERRIDES} --set arguments")
    return [parse_override(a) for a in arguments]


def _describe(container: Any) -> str:
    return "a list" if isinstance(container, list) else "a mapping" if isinstance(container, dict) else f"the value {container!r}"


def apply_override(data: dict[str, Any], override: Override) -> None:
    """Set `override.value` at its path in `data` (in place). Missing mapping keys are created
    (the validator then says whether they are allowed); a list index must exist."""
    node: Any = data
    for depth, part in enumerate(override.path):
        last = depth == len(override.path) - 1
        where = ".".join(str(p) for p in override.path[: depth + 1])
        if isinstance(node, list):
            if not isinstance(part, int):
                raise OverrideError(
                    override.text, f"{where}: {where.rpartition('.')[0]} is a list; index it with a number (0 to {len(node) - 1})"
                )
            if not 0 <= part < len(node):
                raise OverrideError(
                    override.text,
                    f"{where}: index {part} is out of range; {where.rpartition('.')[0]} has {len(node)} entries (0 to {len(node) - 1})",
                )
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise OverrideError(override.text, f"{where}: {where.rpartition('.')[0]} is a mapping, not a list; name a key")
            if not last and node.get(part) is None:
                node[part] = [] if isinstance(override.path[depth + 1], int) else {}
        else:
            parent = where.rpartition(".")[0]
            raise OverrideError(override.text, f"{where}: {parent} is {_describe(node)}, which has no key {part!r}")
        if last:
            node[part] = override.value
        else:
            node = node[part]


def apply_overrides(data: Any, overrides: list[Override]) -> None:
    """Apply every override in order (in place); OverrideError when `data` is not a mapping."""
    if overrides and not isinstance(data, dict):
        raise OverrideError(overrides[0].text, "the suite file is not a mapping of keys; nothing to set")
    for override in overrides:
        apply_override(data, override)


def overrides_text(records: list[dict[str, Any]] | None) -> str:
    """run.json's `overrides` as the command line gave them: "--set a=1 --set b=[2, 3]", or ""."""
    import shlex

    return " ".join(f"--set {shlex.quote(str(r.get('set', '')))}" for r in records or [] if isinstance(r, dict))
