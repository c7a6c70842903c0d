#!/usr/bin/env bash
# Compile the multi-scale deformable attention CUDA op (third_party/MSDeformAttn).
#
#   tools/build_msda.sh             pip install --no-build-isolation third_party/MSDeformAttn
#   tools/build_msda.sh --inplace   build m2fsim_msda*.so next to its sources instead
#
# Needs nvcc (CUDA_HOME if set, else CUDA_PATH, /usr/local/cuda or PATH) and a CUDA build
# of torch. Where either is missing it says so and exits 0: the pure-torch path keeps
# everything working. No GPU is needed to compile.
# Knobs: PYTHON (default $VENV/bin/python, ./.venv/bin/python, else python3), CUDA_HOME,
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default: all cores).
# Example here: CUDA_HOME=/usr/local/cuda tools/build_msda.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/third_party/MSDeformAttn"
say() { printf '[build_msda] %s\n' "$*"; }

mode=install
case "${1:-}" in
  "") ;;
  --inplace) mode=inplace ;;
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) say "unknown argument '$1' (expected --inplace or nothing)"; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -n "${VENV:-}" ] && [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="python3"
fi

# A toolkit root with nvcc and headers (an nvcc on PATH may be a wrapper script elsewhere).
# An explicit CUDA_HOME is the only candidate.
find_cuda_home() {
  local c n
  if [ -n "${CUDA_HOME:-}" ]; then
    [ -x "$CUDA_HOME/bin/nvcc" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ] && echo "$CUDA_HOME"
    return
  fi
  for c in "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then
      echo "$c"; return 0
    fi
  done
  if n="$(command -v nvcc 2>/dev/null)"; then
    c="$(dirname "$(dirname "$(readlink -f "$n")")")"
    if [ -f "$c/include/cuda_runtime.h" ]; then echo "$c"; return 0; fi
  fi
  return 1
}

if ! cuda_home="$(find_cuda_home)"; then
  if [ -n "${CUDA_HOME:-}" ]; then
    say "CUDA_HOME=$CUDA_HOME has no bin/nvcc or include/cuda_runtime.h: skipping the CUDA op."
  else
    say "nvcc not found (looked at CUDA_PATH, /usr/local/cuda, PATH): skipping the CUDA op."
  fi
  say "Nothing is broken: ms_deform_attn uses its pure-torch reference. Set CUDA_HOME to build it."
  exit 0
fi
if ! torch_cuda="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"; then
  say "torch is not importable with $PY: install the environment first (tools/setup_env.sh)." >&2
  exit 1
fi
if [ -z "$torch_cuda" ]; then
  say "$("$PY" -c 'import torch; print("torch", torch.__version__)') is a CPU-only build: skipping the CUDA op."
  say "Nothing is broken: ms_deform_attn uses its pure-torch reference."
  exit 0
fi

export CUDA_HOME="$cuda_home"
export FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
nvcc_version="$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
say "nvcc $nvcc_version at $CUDA_HOME, torch CUDA $torch_cuda, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

t0=$(date +%s)
if [ "$mode" = install ]; then
  say "pip install --no-build-isolation $SRC"
  "$PY" -m pip install --disable-pip-version-check --no-build-isolation "$SRC"
else
  say "building in place in $SRC"
  (cd "$SRC" && "$PY" setup.py build_ext --inplace)
fi
say "compiled in $(( $(date +%s) - t0 )) s"

# Check that the dispatcher finds it (PIP_TARGET: pip installed somewhere off the path).
if (cd "$ROOT" && PYTHONPATH="${PIP_TARGET:+$PIP_TARGET:}$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    'import sys, mask2former_sim.modeling.ops as o; sys.exit(0 if o.cuda_op_available() else 1)'); then
  say "ok: mask2former_sim.modeling.ops.cuda_op_available() is True"
else
  say "built, but mask2former_sim cannot import m2fsim_msda from $PY" >&2
  exit 1
fi
