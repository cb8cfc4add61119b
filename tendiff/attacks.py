"""Corruptions and attacks, all in [0, 1] pixel space.

Random corruptions (Gaussian, salt-and-pepper) and attacks on the *bare classifier* through
torchattacks (PGD L-inf, PGD L2, AutoAttack L2: the authors' attack). Attacks on the bare
classifier are *transfer* attacks against a purification defense: the attacker never sees the
purifier. :func:`pgd_eot_ddim_surrogate` is an *adaptive* attack whose gradients go through a
few-step DDIM surrogate of the purifier; :func:`pgd_eot_exact` is the full adaptive attack: PGD
with expectation over transformation (EOT) whose gradients go through the defended pipeline
exactly as it runs (same sampler, same number of steps), checkpointed step by step.
Every function takes and returns images in [0, 1]; the classifiers normalise internally.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from .checks import check_float
from .diffusion import GaussianDiffusion, purify_batch

def _check_images(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4:
        raise ValueError(f"images must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("images must be in [0, 1]")
    return x


# Bumped whenever an attack's output for the same inputs and seed changes, so that cached attacks
# (``python -m tendiff.evaluate --attack-cache``) made by older code are not reused.
# 2: random starts drawn apart from the purifier's noise (derived_seed).
ATTACK_VERSION = 2


def derived_seed(purpose: str, seed: int) -> int:
    """The seed of the random stream for ``purpose`` (a corruption, an attack's random start) with
    ``seed``: a hash of both, so that it is never the stream :func:`tendiff.diffusion.purify` draws
    its forward noise from with the same seed (the same numbers: the two noises would add up
    coherently, not independently, or an attack would start from the defense's own noise)."""
    digest = hashlib.sha256(f"{purpose}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def corruption_generator(kind: str, seed: int) -> torch.Generator:
    """The random stream of corruption ``kind`` with ``seed`` (see :func:`derived_seed`)."""
    return torch.Generator().manual_seed(derived_seed(f"corruption:{kind}", seed))


def start_seed(seed: int) -> int:
    """The seed of an attack's random start with ``seed`` (see :func:`derived_seed`)."""
    return derived_seed("attack-start", seed)


def start_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(start_seed(seed))


def gaussian_noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """x + N(0, sigma^2) per pixel and channel, clipped to [0, 1]."""
    sigma = check_float("sigma", sigma, 0.0, 1.0)
    g = corruption_generator("gaussian", seed)
    noise = torch.randn(_check_images(x).shape, generator=g).to(x.device, x.dtype)
    return (x + sigma * noise).clamp(0, 1)


def salt_and_pepper(x: torch.Tensor, p: float, seed: int = 0) -> torch.Tensor:
    """Each *pixel* (all its channels together) becomes white or black with probability p,
    half each."""
    p = check_float("p", p, 0.0, 1.0)
    g = corruption_generator("salt_pepper", seed)
    b, _, h, w = _check_images(x).shape
    hit = (torch.rand((b, 1, h, w), generator=g) < p).to(x.device)
    salt = (torch.rand((b, 1, h, w), generator=g) < 0.5).to(x.device, x.dtype)
    return torch.where(hit, salt.expand_as(x), x)


def _run_torchattack(attack, x, y, seed) -> torch.Tensor:
    # torchattacks draws its random starts from the global RNG: fork it so a seed fixes them
    # without disturbing the caller's stream.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(start_seed(seed))
        return attack(_check_images(x), y).detach()


def pgd_linf(classifier, x, y, eps: float, alpha: float | None = None, steps: int = 10, seed: int = 0):
    """PGD L-inf (Madry et al. 2018) on the bare classifier, random start; alpha defaults to
    2.5 eps / steps."""
    import torchattacks

    eps = check_float("eps", eps, 0.0, 1.0)
    alpha = 2.5 * eps / steps if alpha is None else check_float("alpha", alpha, 0.0, 1.0)
    return _run_torchattack(torchattacks.PGD(classifier.eval(), eps=eps, alpha=alpha, steps=int(steps)), x, y, seed)


def pgd_l2(classifier, x, y, eps: float, alpha: float | None = None, steps: int = 10, seed: int = 0):
    import torchattacks

    eps = check_float("eps", eps, 0.0, 100.0)
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    return _run_torchattack(torchattacks.PGDL2(classifier.eval(), eps=eps, alpha=alpha, steps=int(steps)), x, y, seed)


def autoattack_l2(classifier, x, y, eps: float = 0.5, version: str = "standard", seed: int = 0):
    """AutoAttack (Croce & Hein 2020) L2 on the bare classifier: the authors' attack."""
    import torchattacks

    eps = check_float("eps", eps, 0.0, 100.0)
    attack = torchattacks.AutoAttack(classifier.eval(), norm="L2", eps=eps, version=version, n_classes=10,
                                    seed=start_seed(seed))
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
    eps = check_float("eps", eps, 0.0, 1.0)
    alpha = 2.5 * eps / steps if alpha is None else float(alpha)
    x = _check_images(x).detach()
    classifier.eval()
    purifier.eval()
    g = start_generator(seed)
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


# ------------------------------------------------------------ exact adaptive attack
EOT_SEED_BASE = 1_000_003  # (a prime) keeps the attacker's purification seeds away from small defense seeds


def eot_seeds(seed: int, it: int, eot: int) -> list[int]:
    """The purification seeds of PGD step ``it``'s ``eot`` draws:
    ``EOT_SEED_BASE * (seed + 1) + it * eot + j`` for j < eot: fresh noise for every draw of
    every step, fixed by ``seed``, and never the defense's own small seeds (0, 1, ...)."""
    return [EOT_SEED_BASE * (int(seed) + 1) + int(it) * int(eot) + j for j in range(int(eot))]


def purify_differentiable(purifier, diffusion: GaussianDiffusion, x: torch.Tensor, t_star: int, num_steps: int = 10,
                          method: str = "ddim", seed: int = 0, checkpoint: bool = True,
                          input_noise=None) -> torch.Tensor:
    """:func:`tendiff.diffusion.purify_batch` with autograd on: the same timesteps, sampler and
    random stream, so for a given seed it computes exactly what the defense computes, and
    gradients flow back to ``x``; ``checkpoint`` recomputes each reverse step in the backward
    pass (memory of one step). ``input_noise``: a function of x giving the noise the defense
    counts as already present (an adaptive rule's estimate), differentiated through too."""
    with torch.enable_grad():
        return purify_batch(purifier, diffusion, x, t_star, num_steps=num_steps, method=method, seed=seed,
                            grad=True, checkpoint=checkpoint, input_noise=input_noise and input_noise(x))


def defense_loss_grad(classifier, purifier, diffusion: GaussianDiffusion, x: torch.Tensor, y: torch.Tensor,
                      t_star: int, num_steps: int, seeds, method: str = "ddim",
                      checkpoint: bool = True, input_noise=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The EOT loss the exact attack ascends, and its gradient with respect to x:

        L(x) = mean over s in ``seeds`` of  sum over the batch of CE(classifier(purify_s(x)), y)

    where purify_s is the defended pipeline with purification seed s
    (:func:`purify_differentiable`, with ``input_noise``). The draws run one after the other (memory of one draw);
    with fixed seeds L is a deterministic function of x. Returns (L, dL/dx), both detached.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("need at least one EOT seed")
    x = x.detach().requires_grad_(True)
    loss_sum, grad_sum = torch.zeros((), dtype=x.dtype, device=x.device), torch.zeros_like(x)
    with torch.enable_grad():
        for s in seeds:
            purified = purify_differentiable(purifier, diffusion, x, t_star, num_steps, method, s, checkpoint,
                                             input_noise)
            loss = F.cross_entropy(classifier(purified), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            loss_sum += loss.detach()
            grad_sum += grad
    return loss_sum / len(seeds), grad_sum / len(seeds)


def _l2_norms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))


def pgd_eot_exact(classifier, purifier, diffusion: GaussianDiffusion, x, y, eps: float, t_star: int, steps: int = 10,
                  eot: int = 4, num_steps: int = 10, method: str = "ddim", norm: str = "linf",
                  alpha: float | None = None, seed: int = 0, checkpoint: bool = True,
                  random_start: bool = True, prefilter=None) -> torch.Tensor:
    """Threat model: white-box adaptive, x' in the eps-ball (L-inf or L2) around x and in [0, 1]; knows every weight, t*, sampler and steps, not the defense's noise.

    PGD (Madry et al. 2018) whose gradient goes through the defended pipeline exactly as it
    runs: diffusion to t* with fresh noise, every reverse step of ``method`` with ``num_steps``
    steps, then the classifier (:func:`defense_loss_grad`), averaged over ``eot`` independent
    purification noises per PGD step (EOT, Athalye et al. 2018; seeds: :func:`eot_seeds`).
    Steps: sign of the gradient (L-inf) or the gradient over its L2 norm per image (L2), of
    size ``alpha`` (default 2.5 eps / steps), then projection onto the eps-ball and [0, 1].
    Starts at a uniformly random point of the ball (``random_start``, seeded by ``seed``) or at
    x. Deterministic for a fixed seed (on CPU). ``checkpoint`` bounds memory (see
    :func:`purify_differentiable`). Cost per PGD step: ``eot`` purifications with backward,
    about 3 eot num_steps network forwards (4 with checkpointing). ``prefilter`` (a deterministic
    function of the batch, e.g. a classical filter a hybrid defense runs first) is run forward and
    passed through backward unchanged (BPDA, Athalye et al. 2018).
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    eps = check_float("eps", eps, 0.0, 1.0 if norm == "linf" else 100.0)
    steps, eot = int(steps), int(eot)
    if steps < 0 or eot < 1:
        raise ValueError(f"need steps >= 0 and eot >= 1, got steps={steps}, eot={eot}")
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else check_float("alpha", alpha, 0.0, 100.0)
    x = _check_images(x).detach()
    classifier.eval()
    purifier.eval()
    x_adv = _project(x + eps * _random_start(x, norm, seed), x, eps, norm) if random_start and eps > 0 else x.clone()
    for it in range(steps):
        x_in = x_adv if prefilter is None else prefilter(x_adv)
        _, grad = defense_loss_grad(classifier, purifier, diffusion, x_in, y, t_star, num_steps,
                                    eot_seeds(seed, it, eot), method, checkpoint)
        with torch.no_grad():
            step = grad.sign() if norm == "linf" else grad / _l2_norms(grad).clamp_min(1e-12)
            x_adv = _project(x_adv + alpha * step, x, eps, norm)
    return x_adv.detach()


def _random_start(x: torch.Tensor, norm: str, seed: int) -> torch.Tensor:
    """A uniformly random point of the unit ball of ``norm`` per image (from :func:`start_generator`)."""
    g = start_generator(seed)
    if norm == "linf":
        return (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device)
    # uniform in the L2 ball: a random direction, radius u^(1/d)
    direction = torch.randn(x.shape, generator=g, dtype=x.dtype)
    u = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), generator=g, dtype=x.dtype)
    return (direction / _l2_norms(direction) * u ** (1.0 / x[0].numel())).to(x.device)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """x_adv moved into the ``norm`` eps-ball around x and into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)


# ------------------------------------------------------------ BPDA
def pgd_linf_from_grad(x, grad_fn, eps: float, steps: int, alpha: float | None = None, seed: int = 0) -> torch.Tensor:
    """PGD L-inf driven by ``grad_fn(x_adv, it)`` (the gradient of the loss to ascend at PGD step
    ``it``): a uniformly random start in the eps-ball (seeded by ``seed``), then ``steps`` signed
    steps of size ``alpha`` (default 2.5 eps / steps), each projected onto the ball and [0, 1]."""
    eps = check_float("eps", eps, 0.0, 1.0)
    alpha = 2.5 * eps / max(int(steps), 1) if alpha is None else check_float("alpha", alpha, 0.0, 1.0)
    x = _check_images(x).detach()
    g = start_generator(seed)
    x_adv = (x + eps * (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1).to(x.device)).clamp(0, 1)
    for it in range(int(steps)):
        grad = grad_fn(x_adv, it)
        with torch.no_grad():
            x_adv = (x + (x_adv + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()


def pgd_bpda(classifier, purify_fn, x, y, eps: float, steps: int, alpha: float | None = None,
             seed: int = 0) -> torch.Tensor:
    """Threat model: white-box adaptive against a deterministic, non-differentiable purifier
    ``purify_fn`` (batch in [0, 1] -> batch in [0, 1]), x' in the L-inf eps-ball around x.

    BPDA (Backward Pass Differentiable Approximation, Athalye, Carlini & Wagner 2018): the
    forward pass goes through the real purifier, the backward pass treats it as the identity, so
    each PGD step ascends the classifier's cross-entropy gradient taken at the purified input
    (:func:`pgd_linf_from_grad`). With the identity as ``purify_fn`` it is plain white-box PGD.
    Cost per PGD step: one purification and one classifier forward/backward.
    """
    classifier.eval()

    def grad(x_adv, it):
        purified = purify_fn(x_adv).detach().clone().requires_grad_(True)  # (clone: a plain tensor)
        with torch.enable_grad():
            loss = F.cross_entropy(classifier(purified), y, reduction="sum")
            return torch.autograd.grad(loss, purified)[0]

    return pgd_linf_from_grad(x, grad, eps, steps, alpha, seed)
