"""Spec validation and expansion into a plan of trials."""

import pytest

from raysweep.errors import BadInput
from raysweep.spec import SweepSpec, expand, grid, load_spec, parse_spec

BASE = """
name: t
models: [{name: m, arch: gpt2}]
tasks: [compare, sentiment, word_order]
"""


def test_defaults_are_the_papers():
    spec = parse_spec(BASE)
    ft, fg, rl = spec.phases.finetune, spec.phases.forget, spec.phases.relearn
    assert (ft.lr, ft.optimizer, ft.batch_size, ft.max_epochs, ft.grad_clip, ft.stop_train_acc) == (
        3e-3,
        "sgd",
        3,
        100,
        1.0,
        0.99,
    )
    assert (fg.lr, fg.max_epochs, fg.stop_test_acc) == (1e-4, 100, 0.5)
    assert (rl.lr, rl.enabled) == (3e-5, False)
    assert spec.sizes == [1000] and spec.methods == ["random"] and spec.data.cap == 1000 and spec.data.max_chars == 2048
    assert spec.eval_task_list == ["compare", "sentiment", "word_order"]  # default: all tasks of the spec
    assert spec.forget_task_list == spec.eval_task_list


def test_expansion_is_the_full_grid_with_stable_unique_ids():
    spec = parse_spec(
        BASE + "methods: [random, flipped]\nsizes: [10, 20]\nseeds: [0, 1, 2]\nforget_tasks: [compare, sentiment]\n"
    )
    plans = expand(spec)
    assert len(plans) == 1 * 2 * 2 * 2 * 3
    assert len({p.trial_id for p in plans}) == len(plans)
    again = expand(
        parse_spec(
            BASE + "seeds: [0, 1, 2]\nsizes: [10, 20]\nmethods: [random, flipped]\nforget_tasks: [compare, sentiment]\n"
        )
    )
    # Same parameters, same ids, whatever the key order in the YAML.
    assert {p.trial_id for p in again} == {p.trial_id for p in plans}
    p = plans[0]
    assert p.eval_tasks == ["compare", "sentiment", "word_order"]
    assert p.trial_id.startswith("compare-random-n10-s0-")


def test_trial_id_changes_with_any_result_affecting_parameter():
    a = expand(parse_spec(BASE))[0].trial_id
    b = expand(parse_spec(BASE + "phases: {forget: {lr: 2.0e-4}}\n"))[0].trial_id
    c = expand(parse_spec(BASE + "data: {seed: 7}\n"))[0].trial_id
    d = expand(parse_spec(BASE + "resources: {cpu: 2}\n"))[0].trial_id
    assert a != b and a != c
    assert a == d  # resources change where a trial runs, not what it computes


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ("phases: {finetune: {lr: 0}}", "phases.finetune.lr"),
        ("phases: {forget: {lr: -1}}", "phases.forget.lr"),
        ("sizes: []", "sizes: axis is empty"),
        ("sizes: [0]", "sizes.0"),
        ("seeds: [1, 1]", "duplicate"),
        ("methods: [forgetful]", "methods.0"),
        ("phases: {finetune: {max_epochs: 0}}", "max_epochs"),
        ("forget_tasks: [nope]", "unknown task 'nope'"),
        ("eval_tasks: [capital]", "not listed under 'tasks'"),
        ("bogus_key: 1", "bogus_key: unknown key"),
        ("resources: {gpu: -1}", "resources.gpu"),
        ("train: {engine: deepspeed, precision: fp16}", "deepspeed with precision fp16 needs resources.gpu"),
    ],
)
def test_bad_specs_name_the_field(extra, fragment):
    with pytest.raises(BadInput) as exc:
        parse_spec(BASE + extra + "\n")
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_model_needs_exactly_one_source():
    with pytest.raises(BadInput, match="exactly one of 'arch'"):
        parse_spec("name: t\nmodels: [{name: m}]\ntasks: [compare]\n")
    with pytest.raises(BadInput, match="exactly one of 'arch'"):
        parse_spec("name: t\nmodels: [{name: m, arch: gpt2, path: gpt2}]\ntasks: [compare]\n")


def test_yaml_problems_are_one_line(tmp_path):
    with pytest.raises(BadInput, match="invalid YAML"):
        parse_spec("name: [unclosed\n")
    with pytest.raises(BadInput, match="duplicate key 'name'"):
        parse_spec("name: a\nname: b\n")
    with pytest.raises(BadInput, match="no such file"):
        load_spec(tmp_path / "missing.yaml")


def test_python_tags_never_execute():
    with pytest.raises(BadInput):
        parse_spec("name: !!python/object/apply:os.system ['echo pwned']\n")


def test_shipped_specs_validate():
    from pathlib import Path

    # The grid, not the plan: trial ids hash prepared data, and most shipped specs read hub
    # datasets this machine may not reach.
    for path in sorted((Path(__file__).parents[1] / "specs").glob("*.yaml")):
        spec = load_spec(path)
        assert isinstance(spec, SweepSpec) and grid(spec), path
