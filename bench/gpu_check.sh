#!/usr/bin/env bash
# Every GPU claim in docs/benchmarks.md, in one go on a CUDA host (one GPU), writing
# its logs and reports under OUT (default ./gpu-out). Expects torch, triton and
# (optionally) flashinfer importable, plus warmplan's own dependencies.
#   bash bench/gpu_check.sh [OUT]
set -u
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export WARMPLAN_CACHE_ROOT=/tmp/wp-cache TORCHINDUCTOR_CACHE_DIR=/tmp/wp-inductor TRITON_CACHE_DIR=/tmp/wp-triton
rm -rf /tmp/wp-cache /tmp/wp-inductor /tmp/wp-triton
step() { # name seconds command...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" > "$out/$name.txt" 2>&1; local rc=$?
  printf '%-14s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$out/summary.txt"
}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys,torch,triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1; } > "$out/card.txt" 2>&1
step dsv4-cold 120 python3 -m warmplan run plans/dsv4.yaml --report "$out/dsv4-cold.json"
step dsv4-warm 60 python3 -m warmplan run plans/dsv4.yaml --report "$out/dsv4-warm.json"
step verify-chat 70 python3 -m warmplan verify plans/dsv4.yaml --trace traces/chat.jsonl --strict --suggest
step pytest-gpu 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider
step bench 120 python3 bench/first_request.py --plan plans/dsv4.yaml --device cuda --repeat 10 --only sparse-mla --json "$out/bench.json"
cat "$out/summary.txt"
