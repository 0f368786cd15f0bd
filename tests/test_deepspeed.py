"""The DeepSpeed training engine against plain PyTorch.

On CPU DeepSpeed runs in fp32/bf16 (fp16 needs a GPU), with a one-process gloo group; the
same SGD steps with clipping must give the same weights as the plain loop. The fp16 path with
dynamic loss scaling runs only where CUDA is present.
"""

import random

import pytest
import torch

from raysweep.methods import nll_loss
from raysweep.spec import FinetuneConfig, ModelSpec, TrainEngine
from raysweep.tasks import prepare_task
from raysweep.train import (
    DeepSpeedStepper,
    Stepper,
    build_batches,
    deepspeed_config,
    make_optimizer,
    resume_safe_globals,
    train_epoch,
)

deepspeed = pytest.importorskip("deepspeed")


def _micro(seed=0):
    from raysweep.models import build_tiny, train_tokenizer

    tok = train_tokenizer(400, add_bos=False)
    torch.manual_seed(seed)
    model = build_tiny(
        ModelSpec(name="x", arch="gpt2", tiny={"layers": 5, "hidden": 32, "heads": 2, "vocab": 400}), tok
    )
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model, tok


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_config_maps_the_spec():
    cfg = FinetuneConfig(lr=3e-3, batch_size=3, grad_clip=1.0)
    conf = deepspeed_config(cfg, TrainEngine(engine="deepspeed", precision="fp16", zero_stage=2))
    assert conf["fp16"]["enabled"] and conf["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert conf["zero_optimization"]["stage"] == 2 and conf["gradient_clipping"] == 1.0
    assert conf["train_micro_batch_size_per_gpu"] == 3 and conf["zero_allow_untested_optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_deepspeed_fp32_sgd_matches_plain_torch(zero_stage):
    exs = prepare_task("sentiment", seed=1, cap=12, max_chars=2048).split("train")
    cfg = FinetuneConfig(lr=5e-2, batch_size=4, grad_clip=0.5)
    results = []
    for engine in (None, TrainEngine(engine="deepspeed", precision="fp32", zero_stage=zero_stage)):
        model, tok = _micro()
        stepper = make_optimizer(model, cfg, engine)
        assert isinstance(stepper, DeepSpeedStepper if engine else Stepper)
        losses = [
            train_epoch(
                model, stepper, build_batches(tok, model, exs, [e.gold for e in exs], 4, random.Random(e)), nll_loss
            )
            for e in range(2)
        ]
        results.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        # A second phase on the same model must work, and the first engine must let go.
        stepper.close()
        if engine is not None:
            nxt = make_optimizer(model, cfg, engine)
            train_epoch(
                model, nxt, build_batches(tok, model, exs, [e.gold for e in exs], 4, random.Random(9)), nll_loss
            )
            # A resume point must load back under weights_only (no code from a store), and
            # into a fresh engine of the next attempt.
            with torch.serialization.safe_globals(resume_safe_globals()):
                state = torch.load(__import__("io").BytesIO(_saved(nxt.state_dict())), weights_only=True)
            nxt.close()
            again = make_optimizer(model, cfg, engine)
            again.load_state_dict(state)
            again.close()
    (l_t, w_t), (l_d, w_d) = results
    assert l_t == pytest.approx(l_d, abs=1e-5)
    for k in w_t:
        torch.testing.assert_close(w_t[k], w_d[k], atol=1e-5, rtol=1e-5)
    assert l_t[1] < l_t[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with loss scaling needs a CUDA GPU")
def test_deepspeed_fp16_trains_on_gpu():
    model, tok = _micro()
    model.cuda()
    exs = prepare_task("sentiment", seed=1, cap=24, max_chars=2048).split("train")
    stepper = make_optimizer(
        model, FinetuneConfig(lr=1e-2, batch_size=8), TrainEngine(engine="deepspeed", precision="fp16")
    )
    losses = [
        train_epoch(
            model, stepper, build_batches(tok, model, exs, [e.gold for e in exs], 8, random.Random(e)), nll_loss
        )
        for e in range(4)
    ]
    assert next(model.parameters()).dtype == torch.float16
    assert stepper.loss_scale is not None and losses[-1] < losses[0]
