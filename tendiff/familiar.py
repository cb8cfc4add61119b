"""Does an input look like the dataset's images? A warning for uploads and drawings.

A classifier is as sure of itself on a drawing unlike any training image as on a test digit (a
drawn "3" was read as 8 at 99.6%). The diffusion model is the dataset's density model: it
reconstructs its own kind of image well from moderate noise and other images badly. The score of
an image is the RMSE between it and the dense purifier's one-step prediction of it from t =
``T_PROBE`` (the mean over ``SEEDS``); an input whose score is above the ``QUANTILE`` of held-out test
images' scores is flagged. The references are computed by ``scripts/familiar_reference.py`` into
``checkpoints/familiar.json``, each with the sha256 of the purifier it was measured with (a
reference made with other weights is not used).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from .diffusion import GaussianDiffusion, purify_batch

T_PROBE = 100  # deep enough to erase what the model cannot explain, shallow enough to keep the digit
SEEDS = (0, 1, 2)
QUANTILE = 0.99
REFERENCE = "familiar.json"  # in the checkpoint folder, beside the weights it was measured with


def score(model, diffusion: GaussianDiffusion, x: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE (pixel units) between x (B, C, H, W in [0, 1]) and the one-step
    reconstruction from t = T_PROBE, averaged over SEEDS."""
    with torch.inference_mode():
        errors = [(purify_batch(model, diffusion, x, T_PROBE, method="one-step", seed=s) - x).pow(2).flatten(1)
                  .mean(1).sqrt() for s in SEEDS]
    return torch.stack(errors).mean(0)


def read_reference(path: Path) -> dict:
    """dataset -> {threshold, quantile, n, sha256, ...} from a familiar.json (empty when absent);
    re-read only when the file changes (the app asks on every request)."""
    path = Path(path)
    return _read(path, path.stat().st_mtime_ns if path.exists() else None)


@functools.lru_cache(maxsize=4)
def _read(path: Path, stamp: int | None) -> dict:
    return json.loads(path.read_text())["datasets"] if stamp is not None else {}


def verdict(value: float, reference: dict | None, sha256: str | None) -> str | None:
    """A warning when the score is above the reference threshold; None when the input looks
    familiar or no reference measured with these weights exists."""
    if not reference or reference.get("sha256") != sha256 or value <= reference["threshold"]:
        return None
    share = reference.get("quantile", QUANTILE)
    return (f"This input looks unlike the dataset's images: the purifier reconstructs it worse (RMSE {value:.3f}) "
            f"than {share:.0%} of held-out test images (above {reference['threshold']:.3f}). Predictions on it, "
            "however confident, say little.")
