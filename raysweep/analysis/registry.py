"""The analysis registry: name -> entry point, filled by the `@register` decorator when the
modules listed in `raysweep.analysis.ANALYSIS_MODULES` are imported, and name -> the report
figure drawn from its tables, filled by `@draws` next to it in the same module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import pyarrow as pa

from raysweep.registry import Registry

if TYPE_CHECKING:
    from raysweep.analysis.context import AnalysisContext


class Skip(Exception):
    """Raised by an analysis whose inputs the sweep lacks; the message is the one-line reason."""


@dataclass
class AnalysisResult:
    # The first table is the main one: the one the CLI prints and the report shows first.
    tables: dict[str, pa.Table]
    message: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Analysis:
    name: str
    title: str
    figure: str
    run: Callable[["AnalysisContext"], AnalysisResult]
    # What it reads of the evaluation tasks other than the forget task: their milestones
    # (always scored), or every epoch of every phase (what `scoring.schedule: every_epoch`
    # scores). The forget task is scored on all its splits every epoch whatever the schedule.
    reads: Literal["milestones", "every_epoch"] = "milestones"


ANALYSES: Registry[Analysis] = Registry("analysis", field="analysis")


def register(
    name: str, *, title: str, figure: str, reads: Literal["milestones", "every_epoch"] = "milestones"
) -> Callable[[Callable[["AnalysisContext"], AnalysisResult]], Callable[["AnalysisContext"], AnalysisResult]]:
    if not name.isidentifier():
        raise ValueError(f"analysis name {name!r} must be an identifier (it names a folder next to others)")

    def deco(fn: Callable[["AnalysisContext"], AnalysisResult]) -> Callable[["AnalysisContext"], AnalysisResult]:
        ANALYSES.add(name, Analysis(name=name, title=title, figure=figure, run=fn, reads=reads))
        return fn

    return deco


FIGURES: Registry[Callable] = Registry("figure", field="analysis")


def draws(name: str) -> Callable[[Callable], Callable]:
    """Register `fn(outcome) -> [(alt text, matplotlib Figure)]` as analysis `name`'s figure."""

    def deco(fn: Callable) -> Callable:
        FIGURES.add(name, fn)
        return fn

    return deco


def figure_for(name: str) -> Callable | None:
    return FIGURES.get(name) if name in FIGURES else None


def get(name: str) -> Analysis:
    return ANALYSES.get(name)


def names() -> list[str]:
    return ANALYSES.names()
