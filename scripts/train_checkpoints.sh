#!/usr/bin/env bash
# Makes every committed checkpoint of one dataset, in order, on this machine:
#   bash scripts/train_checkpoints.sh mnist
# A checkpoint already in checkpoints/ is skipped; an interrupted one resumes from runs/.
# Budgets are wall-clock minutes on a 2-core CPU (the LR schedule spans --steps).
set -euo pipefail
ds=${1:?dataset: mnist, fashion_mnist or cifar10}
cd "$(dirname "$0")/.."
case $ds in
  mnist|fashion_mnist) cls_steps=1800; dense_steps=1800; dense_min=13; ft_steps=700; ft_min=5 ;;
  cifar10)             cls_steps=6000; dense_steps=1500; dense_min=25; ft_steps=500; ft_min=6 ;;
esac
run() {  # run OUT ARGS...: train unless OUT exists
  local out=checkpoints/$1; shift
  if [ -f "$out" ]; then echo "have $out"; return; fi
  python -m tendiff.train "$@" --out "$out" --resume
}
run ${ds}_classifier.safetensors classifier --dataset $ds --steps $cls_steps
run ${ds}_dense.safetensors purifier --dataset $ds --steps $dense_steps --minutes $dense_min
for r in 1 2 3 4; do
  run ${ds}_tt-r$r.safetensors purifier --dataset $ds --conv tt --rank $r \
      --init-from checkpoints/${ds}_dense.safetensors --steps $ft_steps --minutes $ft_min
done
run ${ds}_authors-r3.safetensors purifier --dataset $ds --conv authors --rank 3 \
    --init-from checkpoints/${ds}_dense.safetensors --steps $ft_steps --minutes $ft_min
