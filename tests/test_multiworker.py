"""Trials that hold several devices: data-parallel ranks (Ray Train workers inside the Tune
trial). On this CPU machine the ranks are gloo processes; the GPU path differs only in the
backend (NCCL) and the device each rank drives.

What must hold: two ranks train exactly what one process trains (each rank's loss is its
share of the global batch's loss, uneven shards included), rank 0 alone writes, every example
is scored once per epoch, and concurrent trials rendezvous on different ports.
"""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch

from raysweep.spec import FinetuneConfig, TrainEngine, parse_spec
from tests.spec_helpers import tiny_spec_text

deepspeed = pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_epochs(rank: int, world: int, engine: str, method: str, out: str, device: str = "cpu") -> None:
    """Two epochs of one phase on a micro GPT-2; rank 0 saves the weights and losses."""
    from raysweep.distributed import Group
    from raysweep.methods import get_method, nll_loss
    from raysweep.tasks import prepare_task
    from raysweep.train import build_batches, make_optimizer, train_epoch
    from tests.test_deepspeed import _micro

    torch.set_num_threads(1)
    group = Group.from_torch()
    assert (group.rank, group.world) == (rank, world)
    # 11 examples in batches of 5: shards of 3 and 2 rows, and a last batch of one row that
    # leaves rank 1 empty (it joins the step with a zero-weighted row).
    exs = prepare_task("sentiment", seed=1, cap=11, max_chars=2048).split("train")[:11]
    assert len(exs) == 11
    model, tok = _micro()
    model.to(device)
    cfg = FinetuneConfig(optimizer="adamw", lr=5e-3, batch_size=5, grad_clip=0.5)
    eng = TrainEngine(engine="deepspeed", precision="fp32", zero_stage=2) if engine == "deepspeed" else None
    gold = [e.gold for e in exs]
    if method == "npo":
        m = get_method("npo", {"beta": 0.5})
        m.prepare(model, build_batches(tok, model, exs, gold, 5, random.Random(7)))
        loss_fn = m.loss
    else:
        loss_fn = nll_loss
    stepper = make_optimizer(model, cfg, eng, group)
    losses = [
        train_epoch(model, stepper, build_batches(tok, model, exs, gold, 5, random.Random(e)), loss_fn, group)
        for e in range(2)
    ]
    stepper.close()
    if rank == 0:
        torch.save(
            {"losses": losses, "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}, out
        )


def _rank_main(rank: int, world: int, port: int, engine: str, method: str, out: str, backend: str = "gloo") -> None:
    import torch.distributed as dist

    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        # TF32 matmuls would differ between 1 and 2 ranks by more than summation order.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        _train_two_epochs(rank, world, engine, method, out, device)
    finally:
        dist.destroy_process_group()


TWO_GPUS = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL ranks need two CUDA GPUs")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "method", "backend"),
    [
        ("torch", "nll", "gloo"),
        ("torch", "npo", "gloo"),
        ("deepspeed", "nll", "gloo"),
        pytest.param("torch", "nll", "nccl", marks=TWO_GPUS),
        pytest.param("deepspeed", "nll", "nccl", marks=TWO_GPUS),
    ],
)
def test_two_ranks_train_what_one_process_trains(tmp_path, engine, method, backend):
    import torch.multiprocessing as mp

    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    mp.spawn(_rank_main, args=(1, _free_port(), engine, method, str(single), backend), nprocs=1, join=True)
    mp.spawn(_rank_main, args=(2, _free_port(), engine, method, str(double), backend), nprocs=2, join=True)
    one, two = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert one["losses"] == pytest.approx(two["losses"], abs=1e-5)
    assert one["losses"][1] < one["losses"][0]
    moved = 0
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, atol=2e-5, rtol=1e-4)
        moved += 1
    assert moved > 10


def test_spec_rules_for_workers():
    def spec(resources: str, batch: int = 8):
        text = (
            tiny_spec_text()
            .replace("resources: {cpu: 1, gpu: 0}", f"resources: {resources}")
            .replace("batch_size: 8", f"batch_size: {batch}")
        )
        return parse_spec(text)

    assert spec("{cpu: 2, workers: 2}").resources.n_workers == 2
    assert spec("{cpu: 8, gpu: 4}").resources.per_worker == (2.0, 1.0)
    assert spec("{cpu: 1, gpu: 0.5}").resources.n_workers == 1
    # Batches smaller than the worker count are allowed: a 7B model is spread over GPUs for
    # memory (ZeRO), and a rank without rows joins each step with a zero-weighted row.
    assert spec("{cpu: 4, workers: 4}", batch=2).resources.n_workers == 4
    for resources, batch, fragment in [
        ("{gpu: 2.5}", 8, "whole GPUs"),
        ("{gpu: 2, workers: 3}", 8, "workers must equal gpu"),
        ("{gpu: 1, workers: 2}", 8, "workers must equal gpu"),
    ]:
        with pytest.raises(Exception, match=fragment):
            spec(resources, batch)


@pytest.mark.slow
def test_concurrent_two_worker_trials_score_everything_once_on_their_own_ports(tmp_path, ray_cluster):
    from raysweep.models import ensure_builtin
    from raysweep.store import Store
    from raysweep.sweep import models_dir_for, run_sweep
    from raysweep.trial import TrialRunner

    # Two trials at once, two gloo workers each, on a 2-CPU cluster: half a CPU per worker.
    text = tiny_spec_text(name="mw", forget_tasks=("sentiment", "word_order"), ft_epochs=2, fg_epochs=1).replace(
        "resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpu: 0, workers: 2}"
    )
    spec = parse_spec(text)
    store = Store(tmp_path / "store")
    outcome = run_sweep(spec, text, store, dashboard=False)
    assert outcome.failed == {} and outcome.done == 2

    ports = []
    for plan in spec.trials():
        ckpt = store.path("checkpoints", spec.name, plan.trial_id)
        info = [json.loads(line) for line in (ckpt / "workers.jsonl").read_text().splitlines()]
        assert info[-1]["world"] == 2
        ports.append(info[-1]["master"])
        # Only rank 0 writes: no error files, no per-rank resume points besides the optimizer parts.
        assert not list(ckpt.glob("error-*"))
    assert len(set(ports)) == 2, ports

    scores = store.read("scores", sweep=spec.name)
    for plan in spec.trials():
        mine = scores.filter(pc.equal(scores["trial_id"], plan.trial_id))
        keys = list(
            zip(
                mine["phase"].to_pylist(),
                mine["epoch"].to_pylist(),
                mine["eval_task"].to_pylist(),
                mine["split"].to_pylist(),
                mine["example_idx"].to_pylist(),
            )
        )
        assert len(keys) == len(set(keys)), "an example was scored twice in one epoch"
        epochs = {(ph, e) for ph, e, *_ in keys}
        assert {("pretrained", 0), ("finetune", 1)} <= epochs
        per_epoch = {pe: sum(1 for k in keys if k[:2] == pe) for pe in epochs}
        assert len(set(per_epoch.values())) == 1, per_epoch  # every epoch scored every example

    # The same trial in one process, outside Ray: the same examples; before training, the
    # same scores (the ranks only scored other batches). After an epoch they differ by
    # dropout noise alone (each rank draws masks for its own shard), far less than training
    # moved them; exact training equivalence is the dropout-free test above.
    plan = spec.trials()[0]
    models_dir = models_dir_for(store)
    ensure_builtin(plan.model, models_dir)
    solo = Store(tmp_path / "solo")
    solo.ensure()
    TrialRunner(plan, solo, Path(models_dir)).run()
    both = []
    for st in (store, solo):
        t = st.read("scores", sweep=spec.name)
        t = t.filter(
            pc.and_(
                pc.equal(t["trial_id"], plan.trial_id),
                pc.is_in(t["phase"], value_set=__import__("pyarrow").array(["pretrained", "finetune"])),
            )
        )
        t = t.filter(pc.less_equal(t["epoch"], 1)).sort_by(
            [
                ("phase", "ascending"),
                ("epoch", "ascending"),
                ("eval_task", "ascending"),
                ("split", "ascending"),
                ("example_idx", "ascending"),
            ]
        )
        both.append(t)
    multi, one = both
    assert multi.num_rows == one.num_rows > 0
    assert multi["example_idx"].to_pylist() == one["example_idx"].to_pylist()
    pre = pc.equal(multi["phase"], "pretrained").to_numpy(zero_copy_only=False)
    for col in ("ll_sum_correct", "ll_sum_distractor"):
        a, b = multi[col].to_numpy(), one[col].to_numpy()
        assert abs(a - b)[pre].max() < 1e-4, col
        moved = abs(a[~pre] - a[pre]).mean()
        assert abs(a - b)[~pre].mean() < 0.25 * moved, (col, abs(a - b)[~pre].mean(), moved)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_killed_rank_fails_the_trial_and_the_retry_resumes_every_rank(tmp_path, ray_cluster, monkeypatch, engine):
    """SIGKILL rank 1 (not the writer) after its first fine-tuning resume point: Ray Train
    must take down rank 0, which is blocked in a collective, Tune must retry the trial, and
    both ranks must pick up from that resume point, optimizer parts included (under ZeRO-2
    each rank holds a different half of the optimizer state). The rows then equal those of
    an uninterrupted run."""
    from raysweep.store import Store
    from raysweep.sweep import run_sweep

    text = tiny_spec_text(name="mwkill", ft_epochs=3, fg_epochs=1).replace(
        "resources: {cpu: 1, gpu: 0}", "resources: {cpu: 2, gpu: 0, workers: 2}"
    )
    text = text.replace(
        "max_epochs: 3}", "max_epochs: 3, stop_train_acc: 1.0}"
    )  # three epochs, so one runs after the resume
    if engine == "deepspeed":
        text += "train: {engine: deepspeed, precision: fp32, zero_stage: 2}\n"
    spec = parse_spec(text)
    store = Store(tmp_path / "store")
    monkeypatch.setenv("RAYSWEEP_FAULT", "action=kill,phase=finetune,epoch=1,point=resume,rank=1")
    outcome = run_sweep(spec, text, store, dashboard=False)
    assert outcome.failed == {} and outcome.done == 1
    monkeypatch.delenv("RAYSWEEP_FAULT")
    reference = Store(tmp_path / "reference")
    assert run_sweep(spec, text, reference, dashboard=False).done == 1

    (plan,) = spec.trials()
    ckpt = store.path("checkpoints", spec.name, plan.trial_id)
    fired = [json.loads(line) for line in (ckpt / "faults.log").read_text().splitlines()]
    assert [(f["rank"], f["attempt"], f["action"]) for f in fired] == [(1, 1, "kill")]
    row = next(r for r in store.trials(spec.name).to_pylist() if r["trial_id"] == plan.trial_id)
    assert row["status"] == "done" and row["attempts"] == 2
    assert not (ckpt / "restarts.log").exists(), "the retry started over instead of resuming"
    assert {p.name for p in ckpt.glob("optimizer-rank*.pt")} == {"optimizer-rank0.pt", "optimizer-rank1.pt"}
    attempts = [json.loads(line)["attempt"] for line in (ckpt / "workers.jsonl").read_text().splitlines()]
    assert attempts == [1, 2]

    scores = store.read("scores", sweep=spec.name)
    keys = list(
        zip(
            scores["phase"].to_pylist(),
            scores["epoch"].to_pylist(),
            scores["eval_task"].to_pylist(),
            scores["split"].to_pylist(),
            scores["example_idx"].to_pylist(),
        )
    )
    assert len(keys) == len(set(keys))
    assert {("finetune", 1), ("finetune", 2), ("finetune", 3)} <= {k[:2] for k in keys}

    def ordered(st):
        t = st.read("scores", sweep=spec.name)
        return t.sort_by([(c, "ascending") for c in ("phase", "epoch", "eval_task", "split", "example_idx")])

    resumed, straight = ordered(store), ordered(reference)
    assert resumed.num_rows == straight.num_rows
    for col in ("ll_sum_correct", "ll_sum_distractor"):
        diff = abs(resumed[col].to_numpy() - straight[col].to_numpy()).max()
        assert diff < 1e-5, (col, diff)
