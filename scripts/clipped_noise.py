"""Gaussian noise clipped to [0, 1] is not zero-mean: how much of a purifier's loss comes from that.

``python scripts/clipped_noise.py --dataset mnist --purifiers ttm-r3 tt-r4 dense --t-star 80 200``
(classical purifiers by name too, ``--purifiers median3 tv``: their input must be in [0, 1], so
they get only the clipped input, and the last column takes the shift out of their output instead)

On a dark background, clipping the protocol's Gaussian noise to [0, 1] keeps only its positive
half, so the noisy image is brighter on average than the clean one; the diffusion model was
trained on zero-mean Gaussian noise. Each held-out image (after evaluate's first 1000) is purified
at each fixed t* from three versions of one noise draw: clipped (the protocol's input), unclipped,
and clipped with the batch's mean shift taken out; the table gives the classifier's accuracy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

import torch  # noqa: E402

from tendiff import checkpoints as ckpt  # noqa: E402
from tendiff import classical  # noqa: E402
from tendiff.attacks import corruption_generator, gaussian_noise  # noqa: E402
from tendiff.classifiers import predict  # noqa: E402
from tendiff.data import DATASETS, load_dataset  # noqa: E402
from tendiff.diffusion import GaussianDiffusion, purify_chunks  # noqa: E402
from tendiff.evaluate import evaluation_order  # noqa: E402
from tendiff.protocol import STRENGTH  # noqa: E402


def versions(x, sigma: float, seed: int) -> dict:
    """The clipped input, the same noise unclipped, and the clipped one with its mean shift removed."""
    unclipped = x + sigma * torch.randn(x.shape, generator=corruption_generator("gaussian", seed))
    clipped = gaussian_noise(x, sigma, seed)
    assert torch.allclose(clipped, unclipped.clamp(0, 1))  # (one draw)
    return {"clipped": clipped, "unclipped": unclipped, "clipped, mean shift removed": clipped - (clipped - x).mean()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--purifiers", nargs="+", default=["dense"])
    p.add_argument("--t-star", type=int, nargs="+", default=[80, 200])
    p.add_argument("--n", type=int, default=300, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="the noise's seed (purification: seed + 1)")
    args = p.parse_args()
    test = load_dataset(args.dataset, "test")
    idx = evaluation_order(len(test))[1000:1000 + args.n]
    x, y = test.float_images(idx), test.labels[idx]
    inputs = versions(x, STRENGTH[args.dataset]["gaussian"], args.seed)
    print(f"{args.dataset}: {len(y)} held-out images, mean shift of the clipped noise "
          f"{(inputs['clipped'] - x).mean().item():.4f}")
    diffusion, classifier = GaussianDiffusion(), ckpt.load_model(ckpt.checkpoint_name(args.dataset, "classifier"))
    print("| purifier | t* | " + " | ".join(inputs) + " |\n|---|---|" + "---|" * len(inputs))
    for name in args.purifiers:
        if name in classical.CLASSICAL:  # deterministic, no t*; its input must stay in [0, 1]
            out = classical.purify(name, inputs["clipped"])
            outs = {"-": [out, None, (out - (out - x).mean()).clamp(0, 1)]}  # the shift taken out of its output
        else:
            model = ckpt.load_model(ckpt.checkpoint_name(args.dataset, name))
            outs = {t: [purify_chunks(model, diffusion, v, t, args.seed + 1) for v in inputs.values()]
                    for t in args.t_star}
        for t, row in outs.items():
            accs = ["-" if o is None else f"{100 * (predict(classifier, o).argmax(1) == y).float().mean().item():.1f}"
                    for o in row]
            print(f"| {name} | {t} | " + " | ".join(accs) + " |", flush=True)


if __name__ == "__main__":
    main()
