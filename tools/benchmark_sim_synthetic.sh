#!/usr/bin/env bash
# SIM against the box-only baseline on the synthetic data, per seed, with the ablations.
#
#   tools/benchmark_sim_synthetic.sh OUT_DIR [SEED ...]          (default seeds: 0 1)
#
# Before MODEL.SIM.WARMUP_ITERS the pseudo-mask loss is 0 and the teacher and prototypes do
# not touch the student, so SIM and box-only share their first WARMUP_ITERS iterations. Per
# seed: one SIM run to the warm-up (checkpoint with teacher and prototypes), then every row
# continues from a copy of it with --resume: box-only (MODEL.SIM.ENABLED False), SIM, SIM +
# copy-paste (MODEL.SIM.COPY_PASTE.ENABLED True), SIM with the paper's semantic map alone
# (MODEL.SIM.APPEARANCE.WEIGHT 0, OUTSIDE_BOX_NEGATIVES False: the synthetic config's two additions
# off; PSEUDO_WEIGHT 0.2, the lambda_1 these maps were measured best at), and for the first seed
# the ablations beta 0, beta 1, gamma 0. Runs one at a time (time them on a quiet machine);
# then tools/compare_runs.py writes OUT_DIR/seed<S>/cmp/comparison.md.
# Knobs: CONFIG (default configs/synthetic/sim_R18_synth.yaml), PYTHON (default .venv/bin/python),
# EXTRA_OPTS (KEY VALUE pairs added to every run, e.g. "SOLVER.MAX_ITER 800 MODEL.SIM.WARMUP_ITERS 400").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  ""|-h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; [ -n "${1:-}" ] && exit 0 || exit 2 ;;
esac
OUT="$1"; shift
SEEDS=("$@"); [ ${#SEEDS[@]} -gt 0 ] || SEEDS=(0 1)
PY="${PYTHON:-$ROOT/.venv/bin/python}"
CONFIG="${CONFIG:-configs/synthetic/sim_R18_synth.yaml}"
read -r -a EXTRA <<< "${EXTRA_OPTS:-}"
cd "$ROOT"
WARMUP=$("$PY" -c "import sys; sys.path.insert(0, '.'); import mask2former_sim
from mask2former_sim.engine.setup import build_cfg; print(build_cfg(sys.argv[1], sys.argv[2:]).MODEL.SIM.WARMUP_ITERS)" \
  "$CONFIG" ${EXTRA[@]+"${EXTRA[@]}"})

train() {  # dir, then KEY VALUE ...
  local dir="$1"; shift
  local start; start=$(date +%s)
  "$PY" train_net.py --config-file "$CONFIG" MODEL.DEVICE cpu OUTPUT_DIR "$dir" ${EXTRA[@]+"${EXTRA[@]}"} "$@" > "$dir.log" 2>&1 \
    || { echo "[bench] $dir failed, see $dir.log"; exit 1; }
  echo "[bench] $dir done in $(( $(date +%s) - start )) s"
}

continue_from() {  # warm-up dir, row dir, then KEY VALUE ...
  local src="$1" dir="$2"; shift 2
  rm -rf "$dir"; mkdir -p "$dir"
  # a hard link, not a copy (no second copy of the warm-up checkpoint while the row trains; the row's
  # own saves then replace the name): the trainer never writes into an existing checkpoint, it writes
  # a temporary file and renames it over the name, so the warm-up's file stays as it was
  ln "$src/model_final.pth" "$dir/model_final.pth" 2>/dev/null || cp "$src/model_final.pth" "$dir/"
  printf model_final.pth > "$dir/last_checkpoint"
  local start; start=$(date +%s)
  "$PY" train_net.py --config-file "$CONFIG" --resume MODEL.DEVICE cpu OUTPUT_DIR "$dir" ${EXTRA[@]+"${EXTRA[@]}"} "$@" \
    > "$dir.log" 2>&1 \
    || { echo "[bench] $dir failed, see $dir.log"; exit 1; }
  echo "[bench] $dir done in $(( $(date +%s) - start )) s"
}

first=1
for s in "${SEEDS[@]}"; do
  d="$OUT/seed$s"; mkdir -p "$d"
  train "$d/warmup" SEED "$s" SOLVER.MAX_ITER "$WARMUP" SOLVER.CHECKPOINT_PERIOD "$WARMUP"
  continue_from "$d/warmup" "$d/boxonly" SEED "$s" MODEL.SIM.ENABLED False
  continue_from "$d/warmup" "$d/sim" SEED "$s"
  continue_from "$d/warmup" "$d/sim_cp" SEED "$s" MODEL.SIM.COPY_PASTE.ENABLED True \
    MODEL.SIM.COPY_PASTE.BANK_IN_CHECKPOINT True
  continue_from "$d/warmup" "$d/sim_paper_maps" SEED "$s" MODEL.SIM.APPEARANCE.WEIGHT 0.0 \
    MODEL.SIM.OUTSIDE_BOX_NEGATIVES False MODEL.SIM.PSEUDO_WEIGHT 0.2
  rows=("$d/sim" "$d/sim_cp" "$d/sim_paper_maps")
  if [ $first = 1 ]; then
    continue_from "$d/warmup" "$d/sim_beta0" SEED "$s" MODEL.SIM.MODULATION 0.0
    continue_from "$d/warmup" "$d/sim_beta1" SEED "$s" MODEL.SIM.MODULATION 1.0
    continue_from "$d/warmup" "$d/sim_gamma0" SEED "$s" MODEL.SIM.IOU_GAMMA 0.0
    rows+=("$d/sim_beta0" "$d/sim_beta1" "$d/sim_gamma0")
    first=0
  fi
  "$PY" tools/compare_runs.py "${rows[@]}" --baseline "$d/boxonly" --out "$d/cmp" > /dev/null
  echo "[bench] seed $s: $d/cmp/comparison.md"
done
