"""Corruptions and attacks, all in [0, 1] pixel space.

Random corruptions (Gaussian, salt-and-pepper) and attacks on the *bare classifier* through
torchattacks (PGD L-inf, PGD L2, AutoAttack L2, the authors' attack). Attacks on the bare
classifier are *transfer* attacks against a purification defense: the attacker never sees the
purifier. :func:`pgd_eot_ddim_surrogate` is the *adaptive* attack: PGD with expectation over
transformation (EOT) whose gradients go through a few-step DDIM surrogate of the purifier.
Every function takes and returns images in [0, 1]; the classifiers normalise internally.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion, purify_batch

def _check_range(name: str, value: float, lo: float, hi: float) -> float:
    value = float(value)
    if not lo <= value <= hi:  # also refuses NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _check_images(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("images must be in [0, 1]")
    return x


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """x + N(0, sigma^2) per pixel and channel, clipped to [0, 1]."""
    sigma = _check_range("sigma", sigma, 0.0, 1.0)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(_check_images(x).shape, generator=g).to(x.device, x.dtype)
    return (x + sigma * noise).clamp(0, 1)


def salt_and_pepper(x: torch.Tensor, p: float, seed: int = 0) -> torch.Tensor:
    """Each *pixel* (all its channels together) becomes white or black with probability p,
    half each."""
    p = _check_range("p", p, 0.0, 1.0)
    g = torch.Generator().manual_seed(int(seed))
    b, _, h, w = _check_images(x).shape
    hit = (torch.rand((b, 1, h, w), generator=g) < p).to(x.device)
    salt = (torch.rand((b, 1, h, w), generator=g) < 0.5).to(x.device, x.dtype)
    return torch.where(hit, salt.expand_as(x), x)


def _run_torchattack(attack, x, y, seed) -> torch.Tensor:
    # torchattacks draws its random starts from the global RNG: fork it so a seed fixes them
    # without disturbing the caller's stream.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        return attack(_check_images(x), y).detach()


def pgd_linf(classifier, x, y, eps: float, alpha: float | None = None, steps: int = 10, seed: int = 0):
    """PGD L-inf (Madry et al. 2018) on the bare classifier, random start; alpha defaults to
    2.5 eps / steps."""
    import torchattacks

    eps = _check_range("eps", eps, 0.0, 1.0)
    alpha = 2.5 * eps / steps if alpha is None else _check_range("alpha", alpha, 0.0, 1.0)
    return _run_torchattack(torchattacks.PGD(classifier.eval(), eps=eps, alpha=alpha, steps=int(steps)), x, y, seed)


def pgd_l2(classifier, x, y, eps: float, alpha: float | None = None, steps: int = 10, seed: int = 0):
    import torchattacks

    eps = _check_range("eps", eps, 0.0, 100.0)
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    return _run_torchattack(torchattacks.PGDL2(classifier.eval(), eps=eps, alpha=alpha, steps=int(steps)), x, y, seed)


def autoattack_l2(classifier, x, y, eps: float = 0.5, version: str = "standard", seed: int = 0):
    """AutoAttack (Croce & Hein 2020) L2 on the bare classifier: the authors' attack."""
    import torchattacks

    eps = _check_range("eps", eps, 0.0, 100.0)
    attack = torchattacks.AutoAttack(classifier.eval(), norm="L2", eps=eps, version=version, n_classes=10, seed=int(seed))
    return _run_torchattack(attack, x, y, seed)


def pgd_eot_ddim_surrogate(classifier, purifier, diffusion: GaussianDiffusion, x, y, eps: float, t_star: int,
                           steps: int = 10, eot: int = 4, surrogate_steps: int = 2, alpha: float | None = None,
                           seed: int = 0) -> torch.Tensor:
    """Adaptive PGD L-inf with EOT through the purifier.

    The gradient is the exact gradient of the mean cross-entropy of ``classifier(purify(x'))``
    over ``eot`` draws of the purifier's randomness, where purify is a ``surrogate_steps``-step
    deterministic DDIM from t* (a *surrogate*: the defended pipeline may use more or stochastic
    steps, so this attack transfers from the surrogate to it). Cost per PGD step:
    eot * (surrogate_steps + 1) purifier-and-classifier forward/backward passes.
    """
    eps = _check_range("eps", eps, 0.0, 1.0)
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    x = _check_images(x).detach()
    classifier.eval()
    purifier.eval()
    g = torch.Generator().manual_seed(int(seed))
    delta = (torch.rand(x.shape, generator=g) * 2 - 1).to(x.device) * eps
    x_adv = (x + delta).clamp(0, 1)
    for it in range(int(steps)):
        x_adv.requires_grad_(True)
        batch = x_adv.repeat(eot, 1, 1, 1)
        with torch.enable_grad():
            purified = purify_batch(purifier, diffusion, batch, t_star, num_steps=surrogate_steps,
                                    method="ddim", seed=int(seed) * 100003 + it, grad=True)
            loss = F.cross_entropy(classifier(purified), y.repeat(eot))
            (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + alpha * grad.sign()
            x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()
