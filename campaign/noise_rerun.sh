#!/bin/bash
# docs/noise re-measured after the corruption noise got its own random stream (commit 8ee14de):
# every row of a dataset, in groups merged with --add-rows as each finishes.
# bash campaign/noise_rerun.sh <dataset> <group>
set -e
common="--corruptions none gaussian salt_pepper --n 1000 --seeds 1 --no-timing --out docs/noise --merge --add-rows"
case ${1:?dataset}/${2:?group: 1 2 3 4} in
  */1) rows="none dense dense/adaptive-t tt-r1 tt-r2 tt-r3 tt-r4 tt-r8 tt-r16" ;;
  */2) rows="ttm-r1 ttm-r2 ttm-r3 ttm-r4 authors-r3 tt-r4/adaptive-t tt-r8/adaptive-t ttm-r4/adaptive-t median3 adaptive_median gaussian_blur tv" ;;
  mnist/3) rows="median3+dense/adaptive-t median3+ttm-r2/adaptive-t adaptive_median+dense/adaptive-t dense/vote8" ;;
  fashion_mnist/3) rows="median3+dense median3+dense/adaptive-t adaptive_median+dense/adaptive-t median3+ttm-r4/adaptive-t" ;;
  fashion_mnist/4) rows="dense/vote8 dense/adaptive-t/vote8 ttm-r4/adaptive-t/vote8 tt-r8/adaptive-t/vote8" ;;  # 8x each
esac
python -m tendiff.evaluate --dataset $1 --purifiers $rows $common
