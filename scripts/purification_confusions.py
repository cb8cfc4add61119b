"""Which classes purification trades: ``python scripts/purification_confusions.py --dataset fashion_mnist``.

Purifies the clean first ``--n`` test images of evaluate's seeded order (the images every
reported number uses) with one purifier at the dataset's t* (10 DDIM steps, seed 0) and counts,
among the images the bare classifier gets right, which (true class -> predicted class) pairs the
purified image falls into.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from tendiff import checkpoints as ckpt  # noqa: E402
from tendiff.classifiers import predict  # noqa: E402
from tendiff.data import CLASS_NAMES, DATASETS, load_dataset  # noqa: E402
from tendiff.diffusion import GaussianDiffusion, purify_chunks  # noqa: E402
from tendiff.evaluate import evaluation_order  # noqa: E402
from tendiff.protocol import T_STAR  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--purifier", default="dense")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    test = load_dataset(args.dataset, "test")
    order = evaluation_order(len(test))[:args.n]
    x, y = test.float_images(order), test.labels[order]
    classifier = ckpt.load_model(ckpt.checkpoint_name(args.dataset, "classifier"))
    model = ckpt.load_model(ckpt.checkpoint_name(args.dataset, args.purifier))
    t_star = T_STAR[args.dataset]
    before = predict(classifier, x).argmax(1)
    after = predict(classifier, purify_chunks(model, GaussianDiffusion(), x, t_star, 0, num_steps=10)).argmax(1)
    lost = (before == y) & (after != y)
    names = CLASS_NAMES[args.dataset]
    print(f"{args.dataset}, {args.purifier} at t* = {t_star}: {int(lost.sum())} of {int((before == y).sum())} clean "
          f"images the classifier got right are wrong after purification ({int(((before != y) & (after == y)).sum())} "
          "the other way).\n\n| true class | read after purification as | images |\n|---|---|---|")
    for (true, pred), k in collections.Counter((names[int(a)], names[int(b)]) for a, b in
                                               zip(y[lost], after[lost])).most_common(args.top):
        print(f"| {true} | {pred} | {k} |")


if __name__ == "__main__":
    main()
