#!/usr/bin/env bash
# Equal-budget comparison: DMN, the paper's baselines and the ablations, each trained from scratch
# with config/train_compare.yaml for MINUTES minutes on one CPU thread, then one dmn-eval table
# (same episodes for every row) against the shipped model.
#   [QUERIES=segment] [DATA=...] [RUNS=...] [EVAL_OUT=...] scripts/compare_models.sh [MINUTES] [DATA] [RUNS] [EVAL_OUT]
# QUERIES defaults to random_order (the paper's queries). DATA, RUNS and EVAL_OUT come from the arguments, else
# the environment, else data/maze32 (dmn-world generate), runs/compare and out/eval_compare, relative to
# the directory it is run from (the repository root).
set -euo pipefail
MINUTES=${1:-10}
DATA=${2:-${DATA:-data/maze32}}
RUNS=${3:-${RUNS:-runs/compare}}
OUT=${4:-${EVAL_OUT:-out/eval_compare}}
BIN=${BIN:-.venv/bin}
export OMP_NUM_THREADS=1

declare -A ARGS=(
  [dmn]=""
  [latent_image]="model.kind=latent_image"
  [latent_vector]="model.kind=latent_vector"
  [regression]="model.kind=regression val_metric=loss"
  [no_attention]="model.attention=false"
  [no_egocentric]="model.egocentric=false"
  [neither]="model.attention=false model.egocentric=false"
)
ORDER=(dmn latent_image latent_vector regression no_attention no_egocentric neither)
declare -A LABEL=(
  [dmn]="DMN, same budget" [latent_image]="latent image map + PF" [latent_vector]="latent vector map + PF"
  [regression]="regression" [no_attention]="DMN without attention" [no_egocentric]="DMN without egocentric transform"
  [neither]="DMN without attention and egocentric transform"
)
COMPARE=()
for name in "${ORDER[@]}"; do
  if [[ ! -f "$RUNS/$name/model.pt" ]]; then
    # shellcheck disable=SC2086
    "$BIN/dmn-train" --threads 1 --config config/train_compare.yaml data="$DATA" out="$RUNS/$name" \
      max_minutes="$MINUTES" ${ARGS[$name]}
  fi
  COMPARE+=(--compare "${LABEL[$name]}=$RUNS/$name/model.pt")
done
"$BIN/dmn-eval" --data "$DATA" --out "$OUT" --episodes 24 --T 8 --nc 16 --queries "${QUERIES:-random_order}" --no-health "${COMPARE[@]}"
