#!/usr/bin/env bash
# The training campaign for one dataset, resumable across sessions:
#   bash scripts/train_checkpoints.sh fashion_mnist
# Order: classifier, dense purifier (until its held-out loss stops improving), the rank ladder
# (every TT purifier from that dense one by one recipe: same steps, same schedule), the
# class-conditional copy. Each finished step leaves campaign/<dataset>/<name>.done; an interrupted
# step resumes from its state in campaign/<dataset>/<name>/ (commit campaign/ before a session
# ends: the next session's work tree is fresh). Logs: campaign/<dataset>/<name>.log.
# TRAIN_THREADS=1 while other work shares the 2 cores: two OpenMP threads stall whenever another
# process takes a core (measured: 2.7 steps/s alone, 0.7 with tests running beside it).
# The body is one function, read whole before it runs: editing this file mid-campaign is safe.
set -euo pipefail
main() {
ds=${1:?dataset: mnist, fashion_mnist or cifar10}
cd "$(dirname "$0")/.."
case $ds in
  mnist|fashion_mnist) cls="--steps 1800" ;;
  cifar10)             cls="--steps 6000 --minutes 30" ;;
  *) echo "unknown dataset $ds" >&2; exit 2 ;;
esac
LADDER_STEPS=${LADDER_STEPS:-2000}  # one budget for every rung (docs/training.md)
dir=campaign/$ds
mkdir -p "$dir"
run() {  # run NAME ARGS...: train checkpoints/<ds>_NAME.safetensors unless campaign says it is done
  local name=$1; shift
  if [ -f "$dir/$name.done" ]; then echo "done: $ds $name"; return; fi
  python -m tendiff.train "$@" --dataset "$ds" --out "checkpoints/${ds}_$name.safetensors" \
    --run-dir "$dir/$name" --resume ${TRAIN_THREADS:+--threads "$TRAIN_THREADS"} 2>&1 | stdbuf -oL tr '\r' '\n' | grep --line-buffered -v '^\s*$' >> "$dir/$name.log"
  rm -rf "${dir:?}/$name"  # the finished run's optimizer state is not needed any more
  date -u +%FT%TZ > "$dir/$name.done"
}
[ -f "checkpoints/${ds}_classifier.safetensors" ] || run classifier classifier $cls
run dense purifier --until-converged --steps 20000 --compile  # 1.24x on CPU (docs/performance.md)
# The app's "unlike the dataset" warning is measured with these dense weights (tendiff.familiar).
if [ ! -f "$dir/familiar.done" ]; then
  python scripts/familiar_reference.py --dataset "$ds" >> "$dir/familiar.log" 2>&1 && date -u +%FT%TZ > "$dir/familiar.done"
fi
from_dense="--init-from checkpoints/${ds}_dense.safetensors --steps $LADDER_STEPS"
for label in tt-r1 tt-r2 tt-r3 tt-r4 tt-r8 tt-r16 ttm-r1 ttm-r2 ttm-r3 ttm-r4 authors-r3; do
  run "$label" purifier --conv "${label%-r*}" --rank "${label##*-r}" $from_dense
done
# Class-conditional copy for the guidance lesson (guided by the true label: leaks it).
run dense-cond purifier --conditional --init-from "checkpoints/${ds}_dense.safetensors" --steps 500
}
main "$@"; exit
