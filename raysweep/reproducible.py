"""The same floating-point results for the built-in models on any x86 machine.

Float addition is not associative, so a kernel that sums in another order gives other bits,
and a few hundred training steps grow one-ulp differences into different models. On CPU
the order changes with the thread count (reductions and GEMMs split their work per thread),
with the instruction set PyTorch's kernels are dispatched for (AVX2 and AVX-512 kernels
vectorise sums over 8 or 16 lanes) and with the code path MKL picks for the processor
(Intel and AMD, AVX2 and AVX-512 machines each get their own SGEMM kernels). Pinning the
last two is done through environment variables that each library reads once, at its first
use in the process, so `pin_cpu_numerics` must run before any tensor arithmetic; the thread
count is fixed by whoever runs the work (`pretrain_tiny`, and each trial from its spec).

One kernel cannot be pinned that way: PyTorch's CPU square root of float32 tensors is not
correctly rounded (about one result in six is an ulp off), and which results are off depends
on the processor (it starts from the hardware's approximate reciprocal square root, which
Intel and AMD parts compute differently). Adam divides every update by a square root, so
`CorrectlyRoundedAdamW` takes its roots through `exact_sqrt`, which is IEEE-exact everywhere.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

# AVX2 kernels exist on every x86-64 server CPU of the last decade; AVX-512 ones would
# change the bits on the machines without it. MKL honours only COMPATIBLE across vendors:
# its other branches fall back to the processor's own path on AMD.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def pin_cpu_numerics() -> None:
    """Fix the CPU code paths of this process (a variable the user set is left alone)."""
    for key, value in PINNED_ENV.items():
        os.environ.setdefault(key, value)


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root. NumPy's uses the processor's IEEE square-root
    instruction, whose result is fixed by the standard; other devices' torch.sqrt is exact."""
    if values.device.type != "cpu":
        return values.sqrt()
    if values.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sqrt(values.detach().numpy()))
    # NumPy has no bfloat16: the float64 root of a narrower float rounds back exactly.
    return torch.from_numpy(np.sqrt(values.detach().double().numpy())).to(values.dtype)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW for these parameters: the correctly rounded one on CPU, where runs are meant to
    give the same bits on every machine; torch's own on other devices."""
    params = list(params)
    if params and params[0].device.type == "cpu":
        return CorrectlyRoundedAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class CorrectlyRoundedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW's single-tensor update, operation for operation, with the second
    moment's root taken by `exact_sqrt`. Its state is torch's (resume points load either)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 1e-2, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, foreach=False, **kwargs)
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]:
                raise ValueError("CorrectlyRoundedAdamW implements plain AdamW only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, decay, eps = float(group["lr"]), group["weight_decay"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                step = float(state["step"])
                grad, exp_avg, exp_avg_sq = param.grad, state["exp_avg"], state["exp_avg_sq"]
                param.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exact_sqrt(exp_avg_sq) / math.sqrt(1 - beta2**step)).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
        return loss
