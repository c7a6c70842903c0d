#!/usr/bin/env bash
# One-command check on a GPU machine (one H200 with python3 = Python 3.12, torch 2.11 + CUDA 13.0,
# nvcc; no network, no detectron2 / fvcore / pycocotools): install, build, test, benchmark.
#
#   tools/gpu_check.sh             the real run (estimated 5-6 minutes on one H200, 8 at most)
#   tools/gpu_check.sh --dry-run   every step on the CPU at tiny sizes, without the CUDA op (CI)
#
# Steps, each logged to OUTDIR/<step>.log, the run going on when one fails (exit status 1 then):
#   1 install   when `import detectron2, fvcore, pycocotools, omegaconf, ...` fails: pip install
#               --no-index --no-deps --target SITE_DIR WHEEL_DIR/*.whl (made by
#               tools/prepare_gpu_wheels.sh), PYTHONPATH=SITE_DIR:repo
#   2 build     tools/build_msda.sh --inplace, TORCH_CUDA_ARCH_LIST=9.0 (dry run: skipped)
#   3 test      pytest tests/test_msda_cuda.py -m gpu: it compiles the op once more itself, and
#               fails the check unless tests pass (dry run: the same, its tests skip without CUDA)
#   4 msda      tools/benchmark_msda.py: fp32 and bf16, CUDA op vs torch reference, COCO sizes
#               (dry run: --device cpu --small)
#   5 train     tools/benchmark_train_step.py: box-only and SIM R50, LSJ 1024², batch 2, 20 steps,
#               AMP off and bf16 (dry run: --device cpu --tiny: R18, 128 px, 2 steps)
# Then one markdown table (config, AMP, s/iter, peak memory), with the MSDeformAttn table and
# the steps' status, is printed and written to OUTDIR/gpu_check.md.
# Knobs: OUT (OUTDIR is $OUT, else output/gpu_check), PYTHON (default python3; dry run:
# ./.venv/bin/python when present), WHEEL_DIR (default .whl), SITE_DIR (default
# /tmp/m2fsim_site), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default: all cores),
# TRAIN_STEPS (default 20).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  --dry-run) DRY=1 ;;
  "") ;;
  *) printf 'tools/gpu_check.sh: unknown argument %s (--dry-run, --help)\n' "$1" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { printf 'tools/gpu_check.sh: one argument at most (--dry-run, --help)\n' >&2; exit 2; }

cd "$ROOT"
OUTDIR="${OUT:-$ROOT/output/gpu_check}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi
WHEEL_DIR="${WHEEL_DIR:-$ROOT/.whl}"
SITE_DIR="${SITE_DIR:-/tmp/m2fsim_site}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
TRAIN_STEPS="${TRAIN_STEPS:-20}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

say() { printf '[gpu_check] %s\n' "$*"; }
T0=$(date +%s)
STATUS=()   # "step | result | seconds" rows of the summary
FAILED=0
OP_STATE="not checked yet"
DONE=0
# this script's own outputs of an earlier run
rm -f "$OUTDIR/gpu_check.md" "$OUTDIR/train_step.md" "$OUTDIR"/{install,build,test,msda,train}.log

# run_step NAME COMMAND...: output to OUTDIR/NAME.log (its tail on failure), status recorded
run_step() {
  local name="$1" t rc
  shift
  say "step $name: $*"
  t=$(date +%s)
  set +e
  "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  set -e
  t=$(( $(date +%s) - t ))
  if [ "$rc" = 0 ]; then
    STATUS+=("| $name | ok | $t |")
    say "step $name: ok in $t s"
  else
    STATUS+=("| $name | FAILED (exit $rc, see $name.log) | $t |")
    FAILED=1
    say "step $name: FAILED (exit $rc) in $t s; last lines of $OUTDIR/$name.log:"
    tail -n 40 "$OUTDIR/$name.log" | sed 's/^/    /'
  fi
  write_report
  return 0
}
skip_step() {
  STATUS+=("| $1 | skipped: $2 | 0 |")
  say "step $1: skipped ($2)"
  write_report
}

# the report, rewritten after every step (a run cut short still leaves one)
write_report() {
  {
  echo "# tools/gpu_check.sh$([ "$DRY" = 1 ] && echo " --dry-run")"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $ENV_LINE; MSDeformAttn CUDA op: $OP_STATE; $(( $(date +%s) - T0 )) s $([ "$DONE" = 1 ] && echo "in all" || echo "so far (running)")."
  echo
  echo "## Training step"
  echo
  if [ -s "$OUTDIR/train_step.md" ]; then cat "$OUTDIR/train_step.md"; else echo "(no result yet: see train.log)"; fi
  echo
  echo "## MSDeformAttn"
  echo
  if [ -s "$OUTDIR/msda.log" ] && grep -q '^|' "$OUTDIR/msda.log"; then
    grep -v '^|' "$OUTDIR/msda.log" | grep -m1 'MSDeformAttn benchmark' || true
    echo
    grep '^|' "$OUTDIR/msda.log"
  else
    echo "(no result yet: see msda.log)"
  fi
  echo
  echo "## CUDA op tests"
  echo
  tail -n 1 "$OUTDIR/test.log" 2>/dev/null || echo "(no log)"
  echo
  echo "## Steps"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${STATUS[@]}"
  } >"$OUTDIR/gpu_check.md"
}

MODULES="detectron2, fvcore, iopath, yacs, omegaconf, pycocotools.mask, termcolor, timm, scipy, einops, cv2, PIL, yaml, torch, torchvision"
importable() { "$PY" -c "import $MODULES; import mask2former_sim" >/dev/null 2>&1; }

ENV_LINE="$("$PY" -c 'import sys, torch; print("Python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' 2>&1 | tail -n 1)"
say "$ENV_LINE"
say "output in $OUTDIR; dry run: $([ "$DRY" = 1 ] && echo yes || echo no)"

# 1. install -----------------------------------------------------------------------------------
install_wheels() {  # runs with errexit off (run_step): every command is checked
  ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1 || {
    echo "no wheels in $WHEEL_DIR: run tools/prepare_gpu_wheels.sh where PyPI is reachable and carry .whl"
    return 1
  }
  ls -l "$WHEEL_DIR"/*.whl &&
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE_DIR" "$WHEEL_DIR"/*.whl &&
  "$PY" -c "import $MODULES; import mask2former_sim, detectron2; print('importable: detectron2', detectron2.__version__, 'from', detectron2.__file__)"
}
if importable; then
  skip_step install "everything importable with $PY"
else
  export PYTHONPATH="$SITE_DIR:$PYTHONPATH"
  run_step install install_wheels
fi

# 2. build the CUDA op -------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip_step build "dry run: no CUDA op"
else
  run_step build env PYTHON="$PY" bash "$ROOT/tools/build_msda.sh" --inplace
fi
OP_STATE="$("$PY" -c 'import mask2former_sim.modeling.ops as o; print("built" if o.cuda_op_available() else "not built")' 2>/dev/null | tail -n 1)"
OP_STATE="${OP_STATE:-unknown}"
say "MSDeformAttn CUDA op: $OP_STATE"
if [ "$DRY" = 0 ] && [ "$OP_STATE" != built ]; then
  STATUS+=("| build check | FAILED: cuda_op_available() is False | 0 |")
  FAILED=1
fi

# 3. CUDA op tests -----------------------------------------------------------------------------
run_step test "$PY" -m pytest -q -p no:cacheprovider --basetemp=/tmp/m2fsim_gpu_check_pytest \
  tests/test_msda_cuda.py -m gpu
if [ "$DRY" = 0 ] && ! tail -n 1 "$OUTDIR/test.log" 2>/dev/null | grep -q "passed"; then
  STATUS+=("| test check | FAILED: no GPU test passed (all skipped without CUDA?) | 0 |")
  FAILED=1
  write_report
fi

# 4. MSDeformAttn benchmark --------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  run_step msda "$PY" tools/benchmark_msda.py --device cpu --small --iters 1 --warmup 0
else
  run_step msda "$PY" tools/benchmark_msda.py --device cuda --dtypes fp32,bf16
fi

# 5. training steps ----------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  run_step train "$PY" tools/benchmark_train_step.py --device cpu --tiny --markdown "$OUTDIR/train_step.md"
else
  run_step train "$PY" tools/benchmark_train_step.py --device cuda --steps "$TRAIN_STEPS" --warmup-steps 3 \
    --markdown "$OUTDIR/train_step.md"
fi

# 6. report ---------------------------------------------------------------------------------
DONE=1
write_report
rm -f "$OUTDIR/train_step.md"  # it is in gpu_check.md (the device tool returns 8 files at most)
echo
cat "$OUTDIR/gpu_check.md"
echo
say "done in $(( $(date +%s) - T0 )) s: $OUTDIR/gpu_check.md and $(cd "$OUTDIR" && ls ./*.log | tr '\n' ' ')"
exit "$FAILED"
