"""The selfcheck's own small framework: a `Check` (a name and a function of the `Context`) gives an
`Outcome` or raises `Skip`; run, it becomes a `CheckResult` (with its seconds); the `Summary` holds a
whole selfcheck and is what selfcheck.json says."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.environment import device_name


class SelfcheckError(Exception):
    """Unusable input for the selfcheck (the command line turns it into exit status 2)."""


class Skip(Exception):
    """Raised by a check that does not apply here; the message says why."""


@dataclass
class Outcome:
    """What a check found: status PASS / FAIL / SKIP, a one-line detail and JSON-able data."""

    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckResult:
    """One finished check: its outcome and wall time in seconds."""

    name: str
    status: str
    detail: str
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)

    def line(self, name_width: int = 0) -> str:
        """`STATUS name  detail  seconds`, the name padded to `name_width`."""
        return f"{self.status}  {self.name.ljust(name_width)}  {self.detail}  {self.seconds:.2f}s"

    def as_dict(self) -> dict[str, Any]:
        """The result as selfcheck.json lists it (seconds rounded to 0.1 ms)."""
        return dict(name=self.name, status=self.status, detail=self.detail, seconds=round(self.seconds, 4), data=self.data)


@dataclass
class Context:
    """What every check gets: the device under test, --quick, and a scratch folder of its own."""

    device: torch.device
    quick: bool
    workdir: Path


@dataclass(frozen=True)
class Check:
    """A named check: `run(context)` returns an Outcome or raises Skip (any other exception is a FAIL)."""

    name: str
    run: Callable[[Context], Outcome]


@dataclass
class Summary:
    """One selfcheck: what it planned, the results so far, its wall time in seconds, the environment of
    this machine, and whether every planned check has run (the JSON is rewritten after each one)."""

    device: str
    quick: bool
    planned: list[str]
    started_at: str
    code_version: str
    environment: dict[str, Any]
    results: list[CheckResult] = field(default_factory=list)
    wall_s: float = 0.0
    finished: bool = False
    path: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Results so far per status: {"PASS": n, "FAIL": n, "SKIP": n}."""
        return {status: sum(r.status == status for r in self.results) for status in ("PASS", "FAIL", "SKIP")}

    @property
    def exit_code(self) -> int:
        """1 when any check failed, else 0."""
        return 1 if self.counts["FAIL"] else 0

    def as_dict(self) -> dict[str, Any]:
        """The document selfcheck.json holds: the plan, the results so far, counts, the environment."""
        return dict(  # selfcheck.json's keys
            device=self.device,
            device_name=device_name(self.device),
            quick=self.quick,
            started_at=self.started_at,
            wall_s=round(self.wall_s, 3),
            finished=self.finished,
            ok=self.finished and self.exit_code == 0,
            counts=self.counts,
            planned=self.planned,
            code_version=self.code_version,
            command=list(sys.argv),
            checks=[r.as_dict() for r in self.results],
            environment=self.environment,
        )


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 300 characters."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
