#!/bin/bash
# docs/results.md on the retrained ladders, one dataset and row group at a time. Group A starts the
# dataset's section anew; the others add their rows to it (--add-rows). Exact and surrogate attack
# chunks are cached in campaign/attacks (keyed by the weights, settings and attacks.ATTACK_VERSION),
# so a stopped group keeps its finished attacks. The chunk names do not depend on --corruptions or --out:
# a group's attacks can be crafted ahead with the same settings, --corruptions exact adaptive, --out /tmp/x.
#   OMP_NUM_THREADS=1 nice -n 5 nohup bash campaign/results.sh mnist A >> campaign/results_mnist.out 2>&1 &
# Groups done so far, and running two side by side: campaign/README.md.
set -e
ds=${1:?dataset: mnist fashion_mnist}
common="--dataset $ds --corruptions none gaussian salt_pepper pgd_linf autoattack_l2 adaptive exact --n 200 --n-attack 100 --seeds 10 --no-timing --attack-chunk 25 --attack-cache campaign/attacks --out docs --merge"
case ${2:?group: A B1 V B2 B3 C} in
  A)  rows="none dense dense/adaptive-t tt-r4 ttm-r4 tt-r8 median3 adaptive_median" ;;
  B1) rows="authors-r3 tt-r16 gaussian_blur tv" ;;
  V)  rows="dense/vote8" ;;  # 8 purifications per prediction: about 5 h alone
  B2) rows="tt-r1 tt-r2 tt-r3" ;;
  B3) rows="ttm-r1 ttm-r2 ttm-r3" ;;
  C)  rows="nlm bm3d tucker median3+dense/adaptive-t median3+ttm-r4/adaptive-t" ;;
  *)  echo "unknown group $2" >&2; exit 2 ;;
esac
[ "$2" = A ] || common="$common --add-rows"
python -m tendiff.evaluate $common --purifiers $rows
