"""Choose t* on held-out images: ``python scripts/sweep_t_star.py --dataset cifar10``.

Purifies clean, Gaussian and salt-and-pepper images (the protocol's strengths) at each t* with
each purifier and prints the classifier's accuracy and its mean over the three. The images are
test images *after* the first 1000 of ``tendiff.evaluate``'s seeded order, so they are disjoint
from the images every reported number is measured on. ``--out docs/t_star.json`` also records
the rows (merged with other datasets' and purifiers' rows there): the app plots accuracy against
t* from it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from tendiff import checkpoints as ckpt
from tendiff.adaptive import AdaptiveTStar, purify_adaptive
from tendiff.classifiers import predict
from tendiff.data import DATASETS, load_dataset
from tendiff.diffusion import GaussianDiffusion, purify_chunks
from tendiff.evaluate import evaluation_order
from tendiff.protocol import STRENGTH, corrupt
from tendiff.runtime import tune_allocator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--t-star", type=int, nargs="+", default=[50, 100, 150, 200])
    p.add_argument("--purifiers", nargs="+", default=["dense", "tt-r2"])
    p.add_argument("--adaptive", type=float, nargs="*", default=[],
                   help="also the input-adaptive t* (tendiff.adaptive) with each of these factors")
    p.add_argument("--noise", nargs="+", choices=("matched", "full"), default=["matched", "full"],
                   help="adaptive rules: the input's noise counted toward t*'s (matched), or the full noise added")
    p.add_argument("--n", type=int, default=500, help="held-out images")
    p.add_argument("--steps", type=int, default=10, help="reverse steps")
    p.add_argument("--method", choices=("ddim", "ddpm"), default="ddim", help="sampler")
    p.add_argument("--seed", type=int, default=0, help="the seed of evaluate's image order")
    p.add_argument("--out", type=Path, help="record the rows in this JSON file (e.g. docs/t_star.json)")
    args = p.parse_args()
    tune_allocator()
    test = load_dataset(args.dataset, "test")
    held_out = evaluation_order(len(test), args.seed)[1000:1000 + args.n]
    x, y = test.float_images(held_out), test.labels[held_out]
    classifier = ckpt.load_model(ckpt.checkpoint_name(args.dataset, "classifier"))
    diffusion = GaussianDiffusion()
    inputs = {kind: corrupt(kind, x, STRENGTH[args.dataset].get(kind), args.seed)
              for kind in ("none", "gaussian", "salt_pepper")}

    def accuracy(images):
        return (predict(classifier, images).argmax(1) == y).float().mean().item()

    rows = []

    def record(purifier, t_star, accs, factor=None, matched=None):
        rows.append({"dataset": args.dataset, "purifier": purifier, "t_star": t_star, "adaptive_factor": factor,
                     "matched": matched,
                     "n": len(y), "steps": args.steps, "method": args.method, "sha256": None if purifier == "none" else ckpt.sha256_file(
                         ckpt.checkpoint_dir() / ckpt.checkpoint_name(args.dataset, purifier)),
                     "accuracy": dict(zip(inputs, accs))})

    print(f"{args.dataset}: {len(y)} held-out test images, {args.steps} {args.method.upper()} steps")
    print("| purifier | t* | none | gaussian | salt_pepper | mean |\n|---|---|---|---|---|---|")
    accs = [accuracy(v) for v in inputs.values()]
    print("| none | - | " + " | ".join(f"{100 * a:.1f}" for a in accs) + f" | {100 * sum(accs) / 3:.1f} |")
    record("none", None, accs)
    for name in args.purifiers:
        model = ckpt.load_model(ckpt.checkpoint_name(args.dataset, name))
        for t_star in args.t_star:
            accs = [accuracy(purify_chunks(model, diffusion, v, t_star, args.seed, num_steps=args.steps,
                                                   method=args.method))
                    for v in inputs.values()]
            print(f"| {name} | {t_star} | " + " | ".join(f"{100 * a:.1f}" for a in accs)
                  + f" | {100 * sum(accs) / 3:.1f} |", flush=True)
            record(name, t_star, accs)
        for factor, noise in ((f, n) for f in args.adaptive for n in args.noise):
            rule = AdaptiveTStar(factor=factor, matched=noise == "matched")
            runs = [purify_adaptive(model, diffusion, v, rule, args.seed, num_steps=args.steps, method=args.method)
                    for v in inputs.values()]
            accs = [accuracy(out) for out, _ in runs]
            print(f"| {name} | adaptive x{factor:g}, {noise} noise (median t* " + "/".join(str(int(t.median())) for _, t in runs)
                  + ") | " + " | ".join(f"{100 * a:.1f}" for a in accs) + f" | {100 * sum(accs) / 3:.1f} |", flush=True)
            record(name, None, accs, factor, rule.matched)
            rows[-1]["median_t_star"] = {kind: int(t.median()) for kind, (_, t) in zip(inputs, runs)}
    if args.out:
        write(args.out, rows, " ".join(["python", *sys.argv]))


def write(path: Path, rows: list[dict], command: str) -> None:
    """Merge ``rows`` into the JSON file: a new row replaces the old one of the same dataset,
    purifier, t*, adaptive factor, rule and sampler; each row keeps the command and date that made it."""
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    # (rows from before the matched rule added the full noise)
    key = lambda r: (r["dataset"], r["purifier"], r["t_star"], r["adaptive_factor"], r.get("matched") or False,  # noqa: E731
                     r.get("method", "ddim"))
    stamp = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    merged = {key(r): r for r in old} | {key(r): {**r, **stamp} for r in rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": sorted(merged.values(), key=lambda r: tuple(map(str, key(r))))}, indent=1))


if __name__ == "__main__":
    main()
