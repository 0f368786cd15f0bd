#!/usr/bin/env bash
# GPU checks, for a bare single-GPU Linux machine with CUDA PyTorch and no network.
#
# Whatever the machine lacks travels along as wheels in .whl/ (see scripts/fetch_gpu_wheels.sh:
# ray, deepspeed, duckdb, pydantic, typer, lm-eval and what they need), installed with
# --no-index into /tmp/site. Then, writing everything under $OUT (default ./gpu_check_out):
#   1. the GPU tests (pytest -m gpu): DeepSpeed fp16 with dynamic loss scaling;
#   2. a DeepSpeed fp16 fine-tune + forget sweep of a GPT-2-sized model (specs/gpu_check.yaml)
#      for a few epochs, writing to a store, then `raysweep status`;
#   3. a two-GPU-per-trial request, which must be refused with exit code 2 on one GPU;
#   4. the benchmarks: scoring vs lm-eval (tiny, GPT-2, Llama-2-7B architectures) and
#      training throughput / MFU (GPT-2 and Llama-2-7B architectures, DeepSpeed fp16).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAYSWEEP_MODEL_CACHE=$OUT/models PYTHONUNBUFFERED=1
status=0
step() { echo; echo "=== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" || exit 1

step "GPU tests"
$PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" || status=1

step "DeepSpeed fp16 fine-tune + forget of a GPT-2-sized model"
$PY -m raysweep.cli run specs/gpu_check.yaml --store "$OUT/store" --no-dashboard 2>&1 | tee "$OUT/sweep.log" || status=1
$PY -m raysweep.cli status --store "$OUT/store" 2>&1 | tee -a "$OUT/sweep.log" || status=1

step "two GPUs per trial on a one-GPU machine must be refused (exit 2)"
sed 's/resources: {cpu: 4, gpu: 1}/resources: {cpu: 4, gpu: 2}/; s/^name: gpu_check/name: gpu_check_two/' specs/gpu_check.yaml > "$OUT/two_gpus.yaml"
$PY -m raysweep.cli run "$OUT/two_gpus.yaml" --store "$OUT/store_two" --no-dashboard > "$OUT/two_gpus.log" 2>&1
rc=$?
cat "$OUT/two_gpus.log"
if [ $rc -ne 2 ] || [ -e "$OUT/store_two" ]; then echo "FAIL: expected exit 2 and no store, got $rc"; status=1; else echo "ok: refused with exit 2, nothing written"; fi

step "benchmarks"
$PY scripts/bench_scoring.py --arch tiny --device cuda --out "$OUT/scoring_tiny.json" | tail -1 || status=1
$PY scripts/bench_scoring.py --arch gpt2-124m --device cuda --dtype float16 --long-prompts --batch-size 64 --out "$OUT/scoring_gpt2.json" | tail -1 || status=1
$PY scripts/bench_scoring.py --arch llama-2-7b --device cuda --dtype float16 --long-prompts --batch-size 32 --out "$OUT/scoring_llama7b.json" | tail -1 || status=1
$PY scripts/bench_scoring.py --arch llama-2-7b --device cuda --dtype float16 --tasks paper21 --batch-size 32 --repeats 3 --out "$OUT/scoring_llama7b_paper21.json" | tail -1 || status=1
$PY scripts/bench_training.py --arch gpt2-124m --device cuda --engine deepspeed --precision fp16 --batch-size 8 --out "$OUT/training_gpt2.json" | tail -1 || status=1
$PY scripts/bench_training.py --arch llama-2-7b --device cuda --engine deepspeed --precision fp16 --batch-size 3 --skip-trainer --out "$OUT/training_llama7b.json" | tail -1 || status=1

echo
[ $status -eq 0 ] && echo "GPU CHECK: all passed" || echo "GPU CHECK: some steps failed"
exit $status
