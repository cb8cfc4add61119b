#!/usr/bin/env bash
# Makes every committed checkpoint of one dataset, in order, on this machine:
#   bash scripts/train_checkpoints.sh mnist
# A checkpoint already in checkpoints/ is skipped; an interrupted one resumes from runs/.
# Budgets are wall-clock minutes on a 2-core CPU; the LR schedule spans --steps, and --minutes
# stops earlier (with the EMA weights saved) when the machine is slower than planned.
set -euo pipefail
ds=${1:?dataset: mnist, fashion_mnist or cifar10}
cd "$(dirname "$0")/.."
case $ds in
  mnist|fashion_mnist) cls="--steps 1800"; dense="--steps 2000 --minutes 16" ;;
  cifar10)             cls="--steps 6000 --minutes 30"; dense="--steps 3000 --minutes 30" ;;
  *) echo "unknown dataset $ds" >&2; exit 2 ;;
esac
run() {  # run NAME ARGS...: train checkpoints/<ds>_NAME.safetensors unless it exists
  local out=checkpoints/${ds}_$1.safetensors; shift
  if [ -f "$out" ]; then echo "have $out"; return; fi
  python -m tendiff.train "$@" --dataset "$ds" --out "$out" --resume
}
from_dense="--init-from checkpoints/${ds}_dense.safetensors"
run classifier classifier $cls
run dense purifier $dense
# TT-SVD of the dense purifier, then fine-tuning; rank 2 (the quality bar) gets the most time.
run tt-r2 purifier --conv tt --rank 2 $from_dense --steps 4000 --minutes 20
for r in 1 3 4; do
  run tt-r$r purifier --conv tt --rank $r $from_dense --steps 400 --minutes 3
done
run authors-r3 purifier --conv authors --rank 3 $from_dense --steps 400 --minutes 3
# Class-conditional copy for the guidance lesson (guided by the true label: leaks it).
run dense-cond purifier --conditional $from_dense --steps 500 --minutes 4
