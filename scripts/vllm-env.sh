#!/usr/bin/env bash
# Builds the venv CI's vLLM tier runs in: the real vLLM 0.34.0 on a CPU machine.
#
#   scripts/vllm-env.sh             # .venv-vllm (or $VLLM_VENV); reused when it already holds vLLM 0.34.0
#   scripts/vllm-env.sh --resolve   # re-resolve scripts/vllm-0.34-metadata.txt instead of the pins
#
# torch==2.13.0 (the CPU build), vLLM 0.34.0's other requirements pinned in
# scripts/vllm-0.34-requirements.txt, then vLLM itself with --no-deps (its wheel asks
# for a CUDA torch 2.14 and CUDA-only kernels). `vllm._C` is missing, so CUDA ops do
# not run; vllm.v1.worker.gpu_worker and vllm.model_executor.warmup.* import, which
# is what the contract and equivalence tests need. pip's cache is reused (about 2
# minutes and 4.8 GB on a fresh machine; seconds when the venv is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_VERSION=0.34.0
TORCH_VERSION=2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK=1

have() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$VLLM_VERSION" "$TORCH_VERSION" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
ok = md.version("vllm") == sys.argv[1] and md.version("torch").split("+")[0] == sys.argv[2]
sys.exit(0 if ok else 1)
PY
}

if [ "${1:-}" != "--resolve" ] && have; then
  echo "vllm-env: $VENV already has vLLM $VLLM_VERSION on torch $TORCH_VERSION"
else
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$TORCH_VERSION" > "$constraints"
  if [ "${1:-}" = "--resolve" ]; then
    "$VENV/bin/pip" install -q -r scripts/vllm-0.34-metadata.txt -c "$constraints"
  else
    "$VENV/bin/pip" install -q -r scripts/vllm-0.34-requirements.txt -c "$constraints"
  fi
  "$VENV/bin/pip" install -q --no-deps "vllm==$VLLM_VERSION"
fi
# warmplan itself and the test runner (its own dependencies are vLLM's already).
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q "pytest>=8" "hypothesis>=6.100" structlog rich
"$VENV/bin/python" -c "import vllm, vllm.v1.worker.gpu_worker, vllm.model_executor.warmup.kernel_warmup; print('vllm-env: vLLM', vllm.__version__, 'in $VENV')"
