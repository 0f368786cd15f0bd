"""Analyses of a sweep's store: the figures of Zhang, Choshen and Andreas (2024).

Each analysis is a module with one entry point registered by name with
`@registry.register`; `ANALYSIS_MODULES` below is the one place that lists them (order =
the order they run and print in). Run them with `run_analyses`, print an outcome with
`outcome_table`, and see `raysweep.report.write_report` for the HTML report.
"""

from __future__ import annotations

import importlib

from raysweep.analysis.context import AnalysisParams
from raysweep.analysis.engine import ENGINES, choose_engine
from raysweep.analysis.registry import AnalysisResult, Skip, register
from raysweep.analysis.render import outcome_table
from raysweep.analysis.runner import AnalysisOutcome, load_outcomes, outputs_dir, run_analyses, store_fingerprint

render_outcome = outcome_table  # the name the CLI uses

ANALYSIS_MODULES = (
    "single_task",
    "cross_task",
    "dataset_size",
    "flipped",
    "cross_model",
    "predictors",
    "order",
    "probes",
    # Beyond the paper: Jin & Ren's association matrix and its predictors, methods.
    "association",
    "prediction",
    "by_method",
    "forgetting_events",
    "membership",
    "relearning",
)

for _m in ANALYSIS_MODULES:
    importlib.import_module(f"raysweep.analysis.{_m}")


def registered_analyses() -> list[str]:
    from raysweep.analysis import registry

    return registry.names()


__all__ = [
    "ANALYSIS_MODULES",
    "ENGINES",
    "AnalysisOutcome",
    "AnalysisParams",
    "AnalysisResult",
    "Skip",
    "choose_engine",
    "load_outcomes",
    "outcome_table",
    "outputs_dir",
    "register",
    "registered_analyses",
    "render_outcome",
    "run_analyses",
    "store_fingerprint",
]
