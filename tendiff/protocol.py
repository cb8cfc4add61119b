"""The protocol, defined once: datasets' corruption strengths and t*, the corruption kinds
(names, titles, threat-model text), the purifier ladder and its labels, and :func:`corrupt`
for the random corruptions. The app, the evaluation, the t* sweep and the bench all read it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attacks
from .adaptive import AdaptiveTStar

DATASET_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}

# Corruption strengths per dataset (pixel units in [0, 1]): the paper's noises, the usual L-inf
# budgets (MNIST 0.3, Fashion-MNIST 0.1, CIFAR-10 8/255) and the authors' AutoAttack L2 0.5.
STRENGTH = {
    "mnist": {"gaussian": 0.2, "salt_pepper": 0.2, "pgd_linf": 0.3, "autoattack_l2": 0.5},
    "fashion_mnist": {"gaussian": 0.2, "salt_pepper": 0.2, "pgd_linf": 0.1, "autoattack_l2": 0.5},
    "cifar10": {"gaussian": 0.2, "salt_pepper": 0.15, "pgd_linf": 8 / 255, "autoattack_l2": 0.5},
}

# Diffusion depth per dataset, chosen on held-out test images by scripts/sweep_t_star.py (the
# rule and the numbers: docs/t_star.md, docs/history.md).
T_STAR = {"mnist": 200, "fashion_mnist": 300, "cifar10": 100}

# The input-adaptive t* rule (tendiff.adaptive): the input's noise counted toward t*'s; its
# factor chosen on held-out images (scripts/sweep_t_star.py --adaptive, docs/t_star.md).
ADAPTIVE_T_STAR = AdaptiveTStar(factor=1.0, matched=True)


@dataclass(frozen=True)
class Corruption:
    name: str
    title: str  # the app's choice
    short: str  # a results-table header
    threat: str  # the threat model, one line
    random: bool = False  # random noise (no attacker): computed by :func:`corrupt`


CORRUPTIONS = {c.name: c for c in (
    Corruption("none", "None (clean input)", "clean", "No corruption: the clean image goes to the purifier."),
    Corruption("gaussian", "Gaussian noise (sigma)", "Gaussian", "Random noise, no attacker.", random=True),
    Corruption("salt_pepper", "Salt and pepper (p)", "salt & pepper", "Random noise, no attacker.", random=True),
    Corruption("pgd_linf", "PGD L-inf on the classifier (eps, steps)", "PGD L-inf (transfer)",
               "Transfer: the attack sees only the classifier."),
    Corruption("autoattack_l2", "AutoAttack L2 on the classifier", "AutoAttack L2 (transfer)",
               "Transfer: the attack sees only the classifier (the authors' protocol)."),
    Corruption("adaptive", "Adaptive PGD+EOT through the purifier (slow)", "PGD+EOT (adaptive, surrogate)",
               "Adaptive: the attack sees the purifier (PGD+EOT with gradients through a few-step DDIM "
               "surrogate of the chosen purifier, then the classifier)."),
    Corruption("exact", "Exact PGD+EOT through the whole defense (slowest)", "PGD+EOT (exact; BPDA for classical)",
               "Adaptive, white-box: PGD L-inf + EOT, the gradient exactly through the defense as it runs (its t*, "
               "sampler and steps; adaptive t*: through the t* it picks for the current input, a piecewise-constant "
               "choice not differentiated, and through the noise estimate it counts toward t*'s; a vote: EOT over fresh noises of the one purification it repeats; a hybrid's classical step: BPDA)."),
    Corruption("bpda", "BPDA PGD through a non-differentiable purifier", "PGD (BPDA)",
               "Adaptive, white-box BPDA (Athalye et al. 2018): PGD L-inf, forward through the real deterministic "
               "purifier, backward as the identity (with no purifier: plain white-box PGD)."),
)}


# How t* is set: "auto" chooses it from the input for clean and random-noise inputs, where that
# beat the fixed t* on every dataset measured, and keeps the fixed t* under attack, where the
# adaptive rule is no defense (both: docs/t_star.md).
T_STAR_MODES = {"auto": "Auto: from the input for clean or noisy inputs, the fixed t* under attack",
                "fixed": "Fixed: the t* of the slider",
                "adaptive": "Adaptive: from the input's estimated noise, always"}


def adaptive_t_star(corruption: str, mode: str | bool = "auto") -> bool:
    """Whether t* is chosen from the input for this corruption and t* mode (True / False: the
    older API's adaptive / fixed)."""
    if isinstance(mode, bool):
        return mode
    if mode not in T_STAR_MODES:
        raise ValueError(f"unknown t* mode {mode!r}; choose one of {', '.join(T_STAR_MODES)}")
    noise = corruption == "none" or getattr(CORRUPTIONS.get(corruption), "random", False)
    return mode == "adaptive" or (mode == "auto" and noise)


def corrupt(kind: str, x: torch.Tensor, strength: float | None, seed: int = 0) -> torch.Tensor:
    """A random corruption (or none) of a batch in [0, 1], deterministic in ``seed``."""
    if kind == "none":
        return x.clone()
    if kind == "gaussian":
        return attacks.gaussian_noise(x, strength, seed)
    if kind == "salt_pepper":
        return attacks.salt_and_pepper(x, strength, seed)
    raise ValueError(f"{kind!r} is not a random corruption; choose none, gaussian or salt_pepper")


# ------------------------------------------------------------------- purifiers
LAYOUT_TITLES = {"tt": "TT (one core per mode)", "ttm": "TT-matrix (factorized channels)",
                 "authors": "authors' layout"}
PAPER_MAX_RANK = 4  # the paper's TT ranks are R <= 4; larger ranks are labelled as beyond it
MAX_RANK = 16
# Every purifier made from the dense one by the same fine-tuning recipe (docs/training.md).
LADDER = ("tt-r1", "tt-r2", "tt-r3", "tt-r4", "tt-r8", "tt-r16", "ttm-r1", "ttm-r2", "ttm-r3", "ttm-r4",
          "authors-r3")
PURIFIERS = ("dense",) + LADDER


def model_label(conv: str, rank: int | None = None) -> str:
    """'dense', or '<layout>-r<rank>' ('tt-r2', 'ttm-r4', 'authors-r3')."""
    return "dense" if conv == "dense" else f"{conv}-r{int(rank)}"


def parse_model_label(label: str) -> tuple[str, int | None]:
    """'dense' -> ('dense', None); 'tt-r2' -> ('tt', 2); 'ttm-r4' -> ('ttm', 4)."""
    if label == "dense":
        return "dense", None
    layout, _, rank = str(label).partition("-r")
    if layout not in LAYOUT_TITLES or not rank.isdigit():
        raise ValueError(f"unknown model {label!r}; expected 'dense' or one of {', '.join(LADDER)}")
    if not 1 <= int(rank) <= MAX_RANK:
        raise ValueError(f"TT rank must be in 1..{MAX_RANK}, got {int(rank)} (model {label!r})")
    return layout, int(rank)


def purifier_title(label: str) -> str:
    """The label as a person reads it, marking ranks beyond the paper's R <= 4."""
    layout, rank = parse_model_label(label)
    if layout == "dense":
        return "dense"
    return label + (f" (beyond the paper's R <= {PAPER_MAX_RANK})" if rank > PAPER_MAX_RANK else "")
