"""Input-adaptive t*: estimate how noisy the input is and diffuse just deep enough to cover it.

A fixed t* must be deep enough for the worst noise of the protocol (salt-and-pepper), which costs
clean images detail; a shallow one leaves strong noise in. The rule here, per image:

    sigma_hat = std of (x - median3x3(x))          (:func:`tendiff.classical.estimate_noise`)
    t*(x)     = smallest t in [t_min, t_max], a multiple of ``quantum``, with
                noise_std(t) >= factor * sigma_hat

where noise_std(t) is the Gaussian noise (pixel units) that diffusing to t amounts to. The
factor is chosen on held-out images (scripts/sweep_t_star.py --adaptive); t_max is the deepest
t the purifiers were trained on.

``matched`` (the default): the input's estimated noise counts as part of t*'s noise, and the
diffusion adds only what is missing, sqrt(1 - abar - abar (2 sigma_hat)^2) in model units
(Carlini et al. 2023 treat a noisy input as x_t itself). Adding the full noise on top of the
input's own leaves the model a noisier x_t than its t* (docs/t_star.md measures both).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .classical import estimate_noise
from .diffusion import GaussianDiffusion, purify_chunks


@dataclass(frozen=True)
class AdaptiveTStar:
    factor: float = 1.0
    t_min: int = 10
    t_max: int = 400
    quantum: int = 10
    matched: bool = True  # the input's own noise counts toward t*'s: only the rest is added

    def input_noise(self, x: torch.Tensor) -> torch.Tensor | None:
        """What :func:`tendiff.diffusion.purify` takes as ``input_noise`` for x: the estimate
        (differentiable in x), or None when the rule adds the full noise."""
        return estimate_noise(x) if self.matched else None

    def choose(self, x: torch.Tensor, diffusion: GaussianDiffusion, sigma: torch.Tensor | None = None) -> torch.Tensor:
        """t* per image of the batch x (B, C, H, W) in [0, 1], as a (B,) integer tensor
        (``sigma``: x's noise estimate, when the caller has it already)."""
        candidates = torch.arange(self.t_min, self.t_max + 1, self.quantum)
        stds = torch.tensor([diffusion.noise_std(int(t)) for t in candidates])
        need = self.factor * (estimate_noise(x) if sigma is None else sigma).detach()
        first = torch.searchsorted(stds, need.to(stds.dtype)).clamp(max=len(candidates) - 1)
        return candidates[first]

    def rule(self) -> str:
        """The rule in words (the app shows it next to the t* setting)."""
        return (f"t* is the shallowest t (within {self.t_min}..{self.t_max}) whose diffusion noise covers "
                + ("" if self.factor == 1 else f"{self.factor:g} x ") + "the input's estimated noise (std of the "
                "image minus its 3x3 median)" + ("; that noise counts toward t*'s, so only the rest is added."
                                                 if self.matched else "; the full noise of t* is added."))

    def describe(self, sigma: float, t_star: int, diffusion: GaussianDiffusion) -> str:
        """One run's choice, short (the rule: :meth:`rule`)."""
        return (f"Adaptive t*: estimated input noise {sigma:.3f}, so t* = {t_star} (its noise "
                f"{diffusion.noise_std(t_star):.3f} covers it" + ("; only the rest is added)." if self.matched else ")."))


def purify_adaptive(model, diffusion: GaussianDiffusion, x: torch.Tensor, rule: AdaptiveTStar, seed: int = 0,
                    chunk: int = 250, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Purify each image at its own t* (images sharing a t* run as one batch); returns the
    purified batch and the t* of each image."""
    sigma = estimate_noise(x)
    t_stars, noise = rule.choose(x, diffusion, sigma), sigma if rule.matched else None
    out = torch.empty_like(x)
    for t in t_stars.unique().tolist():
        idx = (t_stars == t).nonzero().flatten()
        out[idx] = purify_chunks(model, diffusion, x[idx], int(t), seed=seed * 1009 + int(t), chunk=chunk,
                                 input_noise=None if noise is None else noise[idx], **kwargs)
    return out, t_stars
