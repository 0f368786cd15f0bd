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
"""

from __future__ import annotations

import os

# AVX2 kernels exist on every x86-64 server CPU of the last decade; AVX-512 ones would
# change the bits on the machines without it. MKL honours only COMPATIBLE across vendors:
# its other branches fall back to the processor's own path on AMD.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}


def pin_cpu_numerics() -> None:
    """Fix the CPU code paths of this process (a variable the user set is left alone)."""
    for key, value in PINNED_ENV.items():
        os.environ.setdefault(key, value)
