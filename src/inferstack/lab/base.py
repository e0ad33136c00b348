"""A lab: what it teaches, what it needs, and the function that runs it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inferstack.lab.runtime import LabRun


@dataclass
class Table:
    """One results table: column names and rows (numbers are formatted by the report)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class LabResult:
    """What a run found: findings in plain words, tables, plots (PNG files) and raw numbers."""

    findings: list[str]
    tables: list[Table] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)   # this run's setup (sizes, rates, versions), after `needs`


@dataclass(frozen=True)
class Lab:
    name: str
    week: int
    title: str
    question: str                       # the report opens with it
    teaches: str                        # one line for `lab list`
    needs: tuple[str, ...]              # what it starts
    minutes: float                      # a full run, on a laptop
    run: Callable[[LabRun], LabResult]
    unmet: Callable[[], str] | None = None  # why this machine cannot run it ("" when it can): root, a binary

    def missing(self) -> str:
        """What this machine lacks to run the lab ("" when nothing)."""
        return self.unmet() if self.unmet else ""


def debian_binary(name: str) -> Callable[[], str]:
    """A `Lab.unmet` for a lab that starts Debian's NAME (scripts/setup.sh installs it)."""
    return lambda: "" if shutil.which(name) else f"Debian's {name} is not installed (scripts/setup.sh)"
