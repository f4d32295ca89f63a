#!/usr/bin/env bash
# benchmarks/gpu_check.sh - every GPU check and figure the project needs, in one go (about 8 minutes on
# an H200), each step under a time limit so that one stuck step cannot eat the rest; outputs in $OUT.
#
# usage: OUT=gpu_out bash benchmarks/gpu_check.sh      (from the repository root, on a machine with a GPU)
#
#   env.txt           the GPU, the driver, torch and timm versions
#   pytest_gpu.txt    tests/test_gpu.py and tests/test_precision.py (each stage on cuda in every precision,
#                     SparseSGDM on CUDA against torch.optim.SGD, --deterministic at 224 px: reruns and a
#                     resume bit-identical)
#   bench_step.txt    a client step at 224 px, batch 64, under every kernel setting (default, cuDNN
#                     attention off, math attention, --deterministic, a strict alternative, --compile)
#   bench_round.txt   a FedAvg round at 224 px, batch 64: floor, fedavg.py's path dense and sparse, SparseSGDM
#                     vs torch.optim.SGD(foreach), with the profiler's top operators of 2 rounds of each
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}

step() {  # step SECONDS FILE COMMAND...: run it under a time limit, its output (and exit status) in $OUT/FILE
  local limit=$1 file=$2
  shift 2
  echo "== $file: $*" >&2
  timeout "$limit" "$@" > "$OUT/$file" 2>&1
  echo "exit status $?" >> "$OUT/$file"
  tail -n 3 "$OUT/$file" >&2
}

{ nvidia-smi; "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"; } \
  > "$OUT/env.txt" 2>&1
step 170 pytest_gpu.txt "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_precision.py
step 130 bench_step.txt "$PY" benchmarks/bench_step.py --device cuda --img-size 224 --batch 64
step 240 bench_round.txt "$PY" benchmarks/bench_round.py --device cuda --img-size 224 --batch 64 --reps 3 --profile 2
