"""Reference scores for ``tendiff.familiar``: ``python scripts/familiar_reference.py --dataset mnist``.

Scores the held-out test images (after the first 1000 of ``tendiff.evaluate``'s order, like the
t* sweep) with the dataset's dense purifier and writes the ``QUANTILE`` threshold, with the
purifier's sha256, into ``checkpoints/familiar.json`` (other datasets' entries kept).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

import torch  # noqa: E402

from tendiff import checkpoints as ckpt  # noqa: E402
from tendiff.data import DATASETS, load_dataset  # noqa: E402
from tendiff.diffusion import GaussianDiffusion  # noqa: E402
from tendiff.evaluate import evaluation_order  # noqa: E402
from tendiff.familiar import QUANTILE, REFERENCE, SEEDS, T_PROBE, score  # noqa: E402

OUT = ckpt.checkpoint_dir() / REFERENCE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", nargs="+", required=True, choices=DATASETS)
    p.add_argument("--n", type=int, default=2000, help="held-out test images")
    args = p.parse_args()
    entries = json.loads(OUT.read_text())["datasets"] if OUT.exists() else {}
    for dataset in args.dataset:
        test = load_dataset(dataset, "test")
        x = test.float_images(evaluation_order(len(test))[1000:1000 + args.n])
        name = ckpt.checkpoint_name(dataset, "dense")
        model = ckpt.load_model(name)
        values = torch.cat([score(model, GaussianDiffusion(), x[i:i + 250]) for i in range(0, len(x), 250)])
        entries[dataset] = {"threshold": float(values.quantile(QUANTILE)), "quantile": QUANTILE, "n": len(x),
                            "median": float(values.median()), "max": float(values.max()), "t_probe": T_PROBE,
                            "seeds": list(SEEDS), "purifier": name,
                            "sha256": ckpt.sha256_file(ckpt.checkpoint_dir() / name),
                            "command": " ".join(["python", *sys.argv]),
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(dataset, {k: v for k, v in entries[dataset].items() if k in ("threshold", "median", "max", "n")})
    OUT.write_text(json.dumps({"datasets": entries}, indent=1))


if __name__ == "__main__":
    main()
