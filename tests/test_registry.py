"""Tasks, forgetting methods and analyses are registered the same way, under one duplicate rule,
and the spec accepts exactly the methods that are registered."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raysweep.analysis import registry as analysis_registry
from raysweep.errors import BadInput
from raysweep.methods import METHODS, FlippedLabels, RandomLabels, register_method
from raysweep.registry import Registry
from raysweep.spec import parse_spec
from raysweep.tasks.base import TASKS, register

REPO = Path(__file__).resolve().parents[1]


def test_one_duplicate_rule_same_entry_again_is_harmless_a_different_one_raises():
    reg: Registry[int] = Registry("widget", field="widgets")
    reg.add("a", 1)
    reg.add("a", 1)
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.add("a", 2)
    assert reg.names() == ["a"] and reg.get("a") == 1
    with pytest.raises(BadInput, match=r"^widgets: unknown widget 'b' \(known: \['a'\]\)$"):
        reg.get("b")


def test_a_method_under_a_taken_name_raises_instead_of_replacing_the_first():
    register_method(RandomLabels)  # the same class again: a module imported twice

    class Impostor(FlippedLabels):
        name = "random"

    with pytest.raises(ValueError, match="forgetting method 'random' registered twice"):
        register_method(Impostor)
    assert METHODS.get("random") is RandomLabels


def test_tasks_and_analyses_follow_the_same_rule():
    sentiment = type(TASKS.get("sentiment"))
    with pytest.raises(ValueError, match="task 'sentiment' registered twice"):
        register(sentiment)
    entry = analysis_registry.get("single_task")
    # The same analysis again is harmless; another function under its name is not.
    analysis_registry.register("single_task", title=entry.title, figure=entry.figure)(entry.run)
    with pytest.raises(ValueError, match="analysis 'single_task' registered twice"):
        analysis_registry.register("single_task", title=entry.title, figure=entry.figure)(lambda ctx: None)
    assert analysis_registry.get("single_task") == entry


SPEC = """
name: reg
models:
  - {name: m, arch: gpt2}
tasks: [sentiment]
methods: [random, keep_gold]
"""


def test_spec_refuses_an_unregistered_method_by_name():
    with pytest.raises(BadInput, match=r"methods\.1: unknown forgetting method 'keep_gold' \(known: \["):
        parse_spec(SPEC)


def test_spec_accepts_a_method_once_it_is_registered_one_class_and_nothing_else():
    # In a process of its own, so the registry of this one keeps only the built-in methods.
    code = textwrap.dedent(f"""
        from raysweep.methods import RandomLabels, register_method
        from raysweep.spec import parse_spec

        @register_method
        class KeepGold(RandomLabels):
            name = "keep_gold"

            def targets(self, examples, epoch, rng):
                return [e.gold for e in examples]

        spec = parse_spec({SPEC!r})
        print(sorted({{t.method for t in spec.trials()}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "['keep_gold', 'random']"


def test_every_analysis_registers_its_figure_in_its_own_module():
    # A figure lives with its analysis: the module that registers `run` registers `draw`
    # (the three comparisons share one figure function, each registering it under its name).
    import raysweep.analysis  # noqa: F401 - imports every analysis module

    assert sorted(analysis_registry.FIGURES) == sorted(analysis_registry.names())
    for name in analysis_registry.names():
        run, draw = analysis_registry.get(name).run, analysis_registry.figure_for(name)
        assert run.__module__ == draw.__module__ or draw.__name__ == "draw_compare", (
            name,
            run.__module__,
            draw.__module__,
        )
    with pytest.raises(ValueError, match="figure 'single_task' registered twice"):
        analysis_registry.draws("single_task")(lambda outcome: [])
