"""The bundled examples through the app's pipeline: how many the purified prediction gets right.

``python scripts/check_examples.py --dataset fashion_mnist --purifiers dense tt-r2``

Each of the 20 bundled images of a dataset (``assets/<dataset>_<label>_<copy>.png``) is corrupted
and purified exactly as the app's Purify button does (Gaussian sigma 0.2, 10 DDIM steps, seed 0),
at the dataset's fixed t* and, with ``--adaptive``, at the input-adaptive t* (what the app's
default t* mode, auto, uses for this noise), and the
classifier's prediction on the clean, corrupted and purified image is compared with the label in
the file name. ``--seeds`` repeats the purification with more seeds (the corruption follows the
seed, as in the app) and reports the mean count.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, not installed

from tendiff.data import DATASETS  # noqa: E402
from tendiff.inputs import prepare_image  # noqa: E402
from tendiff.pipeline import CorruptionSpec, PurifySpec, Studio  # noqa: E402


def bundled(dataset: str) -> list[tuple[Path, int]]:
    """(path, true label) of each bundled example of ``dataset``."""
    return [(p, int(p.stem.split("_")[-2])) for p in sorted((ROOT / "assets").glob(f"{dataset}_*.png"))]


def count(studio: Studio, dataset: str, model: str, t_star, seed: int) -> tuple[int, int, int]:
    """(clean, corrupted, purified) predictions right over the bundled examples."""
    right = [0, 0, 0]
    for path, label in bundled(dataset):
        x = prepare_image(path, dataset).tensor
        r = studio.run(dataset, x, label, CorruptionSpec(), PurifySpec(model=model, t_star=t_star, seed=seed))
        for i, probs in enumerate((r.probs_clean, r.probs_corrupted, r.probs_purified)):
            right[i] += int(probs.argmax()) == label
    return tuple(right)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--purifiers", nargs="+", default=["dense"])
    p.add_argument("--adaptive", action="store_true", help="also with the input-adaptive t*")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (the app's default is 0)")
    args = p.parse_args()
    studio = Studio()
    print("| dataset | purifier | t* | clean | corrupted | purified (seed 0) | purified, mean over seeds | "
          "per seed: purified (corrupted) |")
    print("|---|---|---|---|---|---|---|---|")
    for dataset in args.dataset:
        n = len(bundled(dataset))
        for model in args.purifiers:
            for t_star in (None, "auto") if args.adaptive else (None,):
                counts = [count(studio, dataset, model, t_star, s) for s in range(args.seeds)]
                clean, corrupted, first = counts[0]
                mean = sum(c[2] for c in counts) / len(counts)
                print(f"| {dataset} | {model} | {'adaptive (app default)' if t_star else 'fixed'} | {clean}/{n} | {corrupted}/{n} | "
                      f"{first}/{n} | {mean:.1f}/{n} ({args.seeds} seeds) | "
                      f"{', '.join(f'{c[2]} ({c[1]})' for c in counts)} |", flush=True)


if __name__ == "__main__":
    main()
