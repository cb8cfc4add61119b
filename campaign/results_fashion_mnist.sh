#!/bin/bash
# docs/results.md, Fashion-MNIST section, on the retrained ladder, in row groups (each merged with
# --add-rows as it finishes; exact and surrogate attack chunks are cached in campaign/attacks, so a
# stopped group keeps its finished attacks). Run one group: bash campaign/results_fashion_mnist.sh B1
# A: done 2026-12-07, re-run after the noise fix (commit 8ee14de) changed its noise cells
set -e
common="--dataset fashion_mnist --corruptions none gaussian salt_pepper pgd_linf autoattack_l2 adaptive exact --n 200 --n-attack 100 --seeds 10 --no-timing --attack-chunk 25 --attack-cache campaign/attacks --out docs --merge --add-rows"
case ${1:?group: A B1 V B2 B3 C} in
  A)  rows="none dense dense/adaptive-t tt-r4 ttm-r4 tt-r8 median3 adaptive_median" ;;  # again after the noise fix
  B1) rows="authors-r3 tt-r16 gaussian_blur tv" ;;
  V)  rows="dense/vote8" ;;  # 8 purifications per prediction: about 5 h alone
  B2) rows="tt-r1 tt-r2 tt-r3" ;;
  B3) rows="ttm-r1 ttm-r2 ttm-r3" ;;
  C)  rows="nlm bm3d tucker median3+dense/adaptive-t median3+ttm-r4/adaptive-t" ;;
esac
python -m tendiff.evaluate $common --purifiers $rows
