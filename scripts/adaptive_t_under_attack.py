"""Why the input-adaptive t* fails under attack: the noise it estimates, the t* it picks and the
noise it adds, on clean, noisy and attacked inputs (the attacks of `tendiff.evaluate`'s exact
column, kept in --attack-cache so a rerun is quick).

    python scripts/adaptive_t_under_attack.py --dataset fashion_mnist --n 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tendiff.adaptive import purify_adaptive  # noqa: E402
from tendiff.classical import estimate_noise  # noqa: E402
from tendiff.classifiers import predict  # noqa: E402
from tendiff.evaluate import EvalConfig, Evaluation  # noqa: E402
from tendiff.protocol import ADAPTIVE_T_STAR  # noqa: E402


def added_noise(diffusion, t_stars: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise std (pixel units) the matched rule adds at each image's t*."""
    return torch.tensor([diffusion.added_noise_std(int(t), float(s)) for t, s in zip(t_stars, sigma)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--attack-cache", default="campaign/attacks")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = EvalConfig(dataset=args.dataset, n=args.n, n_attack=args.n, purifiers=("dense", "dense/adaptive-t"),
                     attack_cache=args.attack_cache)
    ev = Evaluation(cfg)
    fixed, adaptive = ev.defenses
    x, y = ev.images[:args.n], ev.labels[:args.n]
    inputs = {"clean": x, "gaussian": ev.corrupt("gaussian"), "salt_pepper": ev.corrupt("salt_pepper"),
              "exact attack on fixed t*": ev.per_defense_attack("exact", fixed)[0],
              "exact attack on adaptive t*": ev.per_defense_attack("exact", adaptive)[0]}
    print(f"{args.dataset}, first {args.n} test images; eps {ev.strength['pgd_linf']}, "
          f"{cfg.exact_steps} steps x EOT {cfg.exact_eot}; fixed t* {fixed.t_star}; one purification run each\n")
    print("| input | estimated noise | adaptive t* (median, range) | noise added | accuracy, adaptive t* "
          "| accuracy, fixed t* |")
    print("|---|---|---|---|---|---|")
    for name, v in inputs.items():
        sigma = estimate_noise(v).float()
        with torch.inference_mode():
            purified, t_stars = purify_adaptive(adaptive.model, ev.diffusion, v, ADAPTIVE_T_STAR, seed=0)
            acc_adaptive = (predict(ev.classifier, purified).argmax(1) == y).float().mean().item()
            acc_fixed = (fixed.predict(ev.classifier, v, 0) == y).float().mean().item()
        print(f"| {name} | {sigma.mean():.3f} | {int(t_stars.median())} ({int(t_stars.min())}-{int(t_stars.max())}) "
              f"| {added_noise(ev.diffusion, t_stars, sigma).mean():.3f} | {100 * acc_adaptive:.1f} "
              f"| {100 * acc_fixed:.1f} |")


if __name__ == "__main__":
    main()
