"""Experiment: does a classifier fine-tuned on purified images close the purification gap?

``python scripts/purified_classifier.py --dataset fashion_mnist``

Purifies ``--images`` training images with the dense purifier (a quarter each: clean, clean,
Gaussian, salt-and-pepper at the protocol's strengths; t* drawn per chunk of 250 from 60..300,
10 DDIM steps), fine-tunes a copy of the committed classifier on half clean, half purified
batches (``--steps`` AdamW steps, cosine learning rate), and prints both classifiers' accuracy on
held-out test images (after evaluate's first 1000): bare, after purification at the dataset's
fixed t*, and with the adaptive t*. Nothing is saved: the committed classifier stays the
protocol's. The fine-tuned classifier also sees noisy images through the purified ones, so its
*bare* accuracy under noise is part of the answer.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from tendiff import checkpoints as ckpt  # noqa: E402
from tendiff.adaptive import purify_adaptive  # noqa: E402
from tendiff.classifiers import predict  # noqa: E402
from tendiff.data import DATASETS, load_dataset  # noqa: E402
from tendiff.diffusion import GaussianDiffusion, purify_chunks  # noqa: E402
from tendiff.evaluate import evaluation_order  # noqa: E402
from tendiff.protocol import ADAPTIVE_T_STAR, STRENGTH, T_STAR, corrupt  # noqa: E402
from tendiff.train import augment  # noqa: E402

KINDS = ("none", "gaussian", "salt_pepper")


def purified_training_set(dataset: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    train = load_dataset(dataset, "train")
    idx = torch.randperm(len(train.labels), generator=g)[:n]
    x, y = train.images[idx].float() / 255, train.labels[idx]
    dense, diffusion = ckpt.load_model(ckpt.checkpoint_name(dataset, "dense")), GaussianDiffusion()
    out = []
    for i in range(0, n, 250):
        kind = ("none", "none", "gaussian", "salt_pepper")[(i // 250) % 4]
        t = int(torch.randint(6, 31, (1,), generator=g)) * 10
        out.append(purify_chunks(dense, diffusion, corrupt(kind, x[i:i + 250], STRENGTH[dataset].get(kind), i), t,
                                 seed=i, num_steps=10))
    return torch.cat(out), y


def fine_tune(dataset: str, purified: torch.Tensor, labels: torch.Tensor, steps: int, g: torch.Generator):
    train = load_dataset(dataset, "train")
    model = ckpt.load_model(ckpt.checkpoint_name(dataset, "classifier")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 5e-4 * 0.5 * (1 + math.cos(math.pi * step / steps))
        a = torch.randint(0, len(train.labels), (64,), generator=g)
        b = torch.randint(0, len(labels), (64,), generator=g)
        x = torch.cat([augment(train.images[a].float() / 255, dataset, g), augment(purified[b], dataset, g)])
        loss = F.cross_entropy(model(x), torch.cat([train.labels[a], labels[b]]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--images", type=int, default=8000, help="purified training images")
    p.add_argument("--steps", type=int, default=800, help="fine-tuning steps (batch 64 clean + 64 purified)")
    p.add_argument("--n", type=int, default=500, help="held-out test images")
    args = p.parse_args()
    start, g = time.time(), torch.Generator().manual_seed(0)
    purified, labels = purified_training_set(args.dataset, args.images, g)
    tuned = fine_tune(args.dataset, purified, labels, args.steps, g)
    print(f"{args.images} purified training images and {args.steps} fine-tuning steps: {time.time() - start:.0f} s")
    test = load_dataset(args.dataset, "test")
    held_out = evaluation_order(len(test))[1000:1000 + args.n]
    x, y = test.float_images(held_out), test.labels[held_out]
    inputs = [corrupt(k, x, STRENGTH[args.dataset].get(k), 0) for k in KINDS]
    dense, diffusion = ckpt.load_model(ckpt.checkpoint_name(args.dataset, "dense")), GaussianDiffusion()
    fixed = [purify_chunks(dense, diffusion, v, T_STAR[args.dataset], 0, num_steps=10) for v in inputs]
    adaptive = [purify_adaptive(dense, diffusion, v, ADAPTIVE_T_STAR, 0, num_steps=10)[0] for v in inputs]
    print(f"{args.n} held-out images; accuracy % clean / Gaussian / salt-and-pepper\n")
    print(f"| classifier | bare | dense, t* = {T_STAR[args.dataset]} | dense, adaptive t* |\n|---|---|---|---|")
    for name, model in (("committed", ckpt.load_model(ckpt.checkpoint_name(args.dataset, "classifier"))),
                        ("fine-tuned on purified images", tuned)):
        def acc(images):
            return " / ".join(f"{100 * (predict(model, v).argmax(1) == y).float().mean().item():.1f}" for v in images)
        print(f"| {name} | {acc(inputs)} | {acc(fixed)} | {acc(adaptive)} |")


if __name__ == "__main__":
    main()
