#!/usr/bin/env bash
# Collect, on a machine with package-index access, the wheels scripts/gpu_check.sh needs on a
# GPU machine that has CUDA PyTorch (Python 3.12) but no network. Writes them to .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl "$@"; }
# Not in the GPU image: ray and its needs, duckdb, pydantic's core, lm-eval and its needs.
for pkg in "ray==2.60.0" duckdb pydantic pydantic-core annotated-types typing-inspection typer shellingham \
           lm-eval evaluate sqlitedict pytablewriter word2number more-itertools jsonlines dill multiprocess \
           datasets pyarrow xxhash hjson ninja py-cpuinfo; do
  dl "$pkg"
done
# DeepSpeed ships as a source distribution: build a pure-Python wheel (ops compile at run time).
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl "deepspeed==0.19.8"
ls .whl | wc -l
du -sh .whl
