"""Purification defenses built from several purifications: a majority vote over K draws of the
purifier's noise, and how to score a defense an attacker may query (or resubmit to) repeatedly.
"""
from __future__ import annotations

import torch

from .diffusion import GaussianDiffusion, purify_batch

VOTE_SEED_STRIDE = 1_000_003  # (a prime) between the seeds of successive votes


def vote_seeds(seed: int, k: int) -> list[int]:
    """The purification seeds of a K-vote: ``seed + VOTE_SEED_STRIDE * r`` for r < k. Vote 0 is
    the single purification with ``seed`` itself, and the votes of a smaller K are the first
    ones of a larger K (the seeds nest), so accuracy against K compares like with like."""
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return [int(seed) + VOTE_SEED_STRIDE * r for r in range(int(k))]


def vote(predictions: torch.Tensor, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The majority of ``predictions`` (K, B) class indices per column: (labels (B,), the
    fraction of the K votes the winner got (B,)). Ties go to the smaller class index."""
    if predictions.ndim != 2 or predictions.shape[0] < 1:
        raise ValueError(f"predictions must be (K >= 1, B), got shape {tuple(predictions.shape)}")
    predictions = predictions.long()
    num_classes = int(predictions.max()) + 1 if num_classes is None else int(num_classes)
    k, b = predictions.shape
    counts = torch.zeros(b, num_classes, dtype=torch.long, device=predictions.device)
    counts.scatter_add_(1, predictions.t(), torch.ones_like(predictions.t()))
    top = counts.max(1, keepdim=True).values
    classes = torch.arange(num_classes, device=predictions.device).expand(b, -1)
    # The smallest class index among those with the most votes (explicit, not argmax's tie rule).
    labels = torch.where(counts == top, classes, num_classes).min(1).values
    return labels, top[:, 0].double() / k


def majority_vote(classifier, purifier, diffusion: GaussianDiffusion, x: torch.Tensor, t_star: int, k: int = 8,
                  num_steps: int = 10, method: str = "ddim", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Purify the batch x (B, C, H, W in [0, 1]) K times, with seeds :func:`vote_seeds`
    (``seed``, k), classify each purification and vote: returns (labels (B,), vote fraction (B,)),
    the most frequent class per image (ties to the smaller class index) and the fraction of the
    K votes it got. K = 1 is the single purification with ``seed``. Each purification is one
    :func:`tendiff.diffusion.purify_batch` call on the whole batch (as the defense runs it), so
    an image's noise, as there, depends on its batch."""
    classifier.eval()
    purifier.eval()
    predictions = []
    with torch.inference_mode():
        for s in vote_seeds(seed, k):
            purified = purify_batch(purifier, diffusion, x, t_star, num_steps=num_steps, method=method, seed=s)
            logits = classifier(purified)
            predictions.append(logits.argmax(1))
        num_classes = logits.shape[1]
    return vote(torch.stack(predictions), num_classes)


def resubmission_accuracy(correct: torch.Tensor) -> tuple[float, float]:
    """Accuracy of a randomized defense over N independent runs: ``correct`` (N runs, B images)
    of booleans (or 0/1). Returns (mean accuracy over runs and images, worst-case accuracy: the
    fraction of images every run got right, i.e. the accuracy against an attacker who may
    resubmit an input N times and wins if any run is wrong)."""
    if correct.ndim != 2 or correct.shape[0] < 1 or correct.shape[1] < 1:
        raise ValueError(f"correct must be (N >= 1 runs, B >= 1 images), got shape {tuple(correct.shape)}")
    correct = correct.bool()
    return correct.double().mean().item(), correct.all(0).double().mean().item()
