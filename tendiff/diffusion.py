"""Gaussian diffusion (Ho et al. 2020, "DDPM"; Song et al. 2021, "DDIM") and purification.

Conventions. The model works on x in [-1, 1]; callers hand :func:`purify` images in [0, 1].
Timesteps run t = 0..T with alpha_bar_0 = 1 (t = 0 is the clean image) and
alpha_bar_t = prod_{s<=t} (1 - beta_s). The network is trained on t in 1..T.

Purification (DiffPure, Nie et al. 2022): diffuse the input to t* with q(x_t* | x_0), then run
the reverse process back to t = 0. :func:`purify` is a generator that yields every step (the
seam a streaming UI needs) and ends with the purified batch; one-step purification (the
model's prediction of x_0 at t*) is the same call with one step.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint

METHODS = ("ddpm", "ddim", "one-step")


@dataclass(frozen=True)
class ScheduleConfig:
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_s, s < t
    pred_x0: torch.Tensor  # the model's estimate of the clean image, clipped to [-1, 1]


@dataclass
class PurifyStep:
    """One frame of purification: ``x_t`` and ``pred_x0`` are in [0, 1] pixel units (x_t may
    leave [0, 1]), converted from the model's [-1, 1] units when first read (a sampler that only
    wants the result skips two ops per step for each of them)."""

    index: int  # 0 is the diffused input at t*, num_steps is the purified result (t = 0)
    num_steps: int
    t: int
    x_t_model: torch.Tensor  # in the model's [-1, 1] units
    pred_x0_model: torch.Tensor

    @cached_property
    def x_t(self) -> torch.Tensor:
        return (self.x_t_model + 1) / 2

    @cached_property
    def pred_x0(self) -> torch.Tensor:
        return (self.pred_x0_model + 1) / 2

    @property
    def final(self) -> bool:
        return self.index == self.num_steps


class GaussianDiffusion:
    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        T = config.num_timesteps
        # Linear schedule of Ho et al. 2020 (Sec. 4), computed in float64 for exactness.
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # betas[0] unused
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # alphas_cumprod[0] = 1
        # Read on every sampler step; a list is cheaper to index than the tensor
        # (docs/performance.md, 'Why the code is shaped this way').
        self._alphas_cumprod_list = self.alphas_cumprod.tolist()

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    def _abar(self, t, like: torch.Tensor):
        """alpha_bar_t: a Python float for an int t (the sampler's case, where scalar arithmetic
        saves a few dozen tiny tensor ops per step: a third of a batch-1 dense step's ops), else
        a tensor broadcastable against ``like`` (t: (B,) tensor, as in training)."""
        if isinstance(t, int):
            return self._alphas_cumprod_list[t]
        a = self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long)]
        return a.to(like.dtype).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))

    def check_t(self, t: int) -> int:
        t = int(t)
        if not 0 <= t <= self.num_timesteps:
            raise ValueError(f"t must be in 0..{self.num_timesteps}, got {t}")
        return t

    # ------------------------------------------------------------- forward
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor, present=None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, Eq. 4).

        ``present`` (model units, one number or one per image): the std of noise x_0 already
        carries, which counts toward t's noise; only the rest, sqrt(1 - abar_t - abar_t present^2),
        is added (the "noisy input is already x_t" view of Carlini et al. 2023)."""
        a = self._abar(t, x0)
        if present is None:
            return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise
        present = torch.as_tensor(present, dtype=x0.dtype, device=x0.device).reshape(-1, *[1] * (x0.ndim - 1))
        rest = (1 - a - a * present ** 2).clamp_min(1e-12).sqrt()  # (not 0: sqrt's gradient there is inf)
        return a ** 0.5 * x0 + rest * noise

    add_noise = q_sample  # the diffusers name

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4 for x_0 given a noise estimate (Ho et al. 2020, Eq. 15)."""
        a = self._abar(t, x_t)
        if isinstance(a, float):  # (two ops instead of three: this runs on every sampler step)
            return torch.add(x_t, eps, alpha=-(1 - a) ** 0.5) * a ** -0.5
        return (x_t - (1 - a) ** 0.5 * eps) / a ** 0.5

    def noise_std(self, t: int) -> float:
        """The std of Gaussian noise, in [0, 1] pixel units, that diffusing to t amounts to.

        x_t / sqrt(abar_t) = x_0 + sqrt((1 - abar_t) / abar_t) eps in [-1, 1] model units, and a
        [0, 1] pixel is half a model unit.
        """
        a = float(self.alphas_cumprod[self.check_t(t)])
        return 0.5 * math.sqrt((1 - a) / a)

    def added_noise_std(self, t: int, present: float = 0.0) -> float:
        """The std, in pixel units, that diffusing to t adds to an input already carrying noise of std
        ``present`` (pixel units): what t's noise lacks, :meth:`q_sample` with ``present`` seen in
        pixel units."""
        return math.sqrt(max(self.noise_std(t) ** 2 - float(present) ** 2, 0.0))

    def t_for_noise_std(self, std: float) -> int:
        """The timestep whose :meth:`noise_std` is closest to std (pixel units)."""
        if not std >= 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        a = self.alphas_cumprod
        stds = 0.5 * ((1 - a) / a).sqrt()
        return int((stds - std).abs().argmin())

    # ------------------------------------------------------------- reverse
    def timesteps(self, t_start: int, num_steps: int) -> list[int]:
        """Evenly spaced, strictly decreasing timesteps t_start = t_0 > ... > t_n = 0."""
        t_start = self.check_t(t_start)
        if t_start < 1:
            raise ValueError("t* must be >= 1 to purify")
        if not 1 <= num_steps <= t_start:
            raise ValueError(f"number of steps must be in 1..t* = {t_start}, got {num_steps}")
        ts = torch.linspace(t_start, 0, num_steps + 1, dtype=torch.float64).round().long().tolist()
        return ts

    def step(self, eps: torch.Tensor, t: int, s: int, x_t: torch.Tensor, method: str = "ddim",
             eta: float = 0.0, generator: torch.Generator | None = None) -> StepOutput:
        """One reverse step from t to s < t, given the model's noise estimate at (x_t, t).

        ``ddpm``: ancestral sample from the posterior q(x_s | x_t, x_0 = pred_x0) of the process
        respaced to the visited timesteps (Ho et al. 2020, Eqs. 6-7, with beta replaced by
        1 - abar_t / abar_s as in Nichol & Dhariwal 2021, Sec. 4).
        ``ddim``: Song et al. 2021, Eq. 12, with sigma from Eq. 16 scaled by eta (0: deterministic).
        """
        if method == "one-step":
            method = "ddim"
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        t, s = int(t), int(s)  # (so the schedule's coefficients below are Python floats)
        a_t, a_s = self._abar(t, x_t), self._abar(s, x_t)
        pred_x0 = self.predict_x0(x_t, t, eps).clamp(-1, 1)
        if s == 0:
            return StepOutput(pred_x0, pred_x0)
        if method == "ddpm":
            beta = 1 - a_t / a_s
            mean = (a_s ** 0.5 * beta / (1 - a_t)) * pred_x0 + ((1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t)) * x_t
            var = beta * (1 - a_s) / (1 - a_t)
            noise = _randn_like(x_t, generator)
            return StepOutput(mean + var ** 0.5 * noise, pred_x0)
        # Re-derive eps from the clipped x_0 so the two stay consistent:
        # eps = (x_t - sqrt(a_t) pred_x0) / sqrt(1 - a_t), and Eq. 12 is linear in (x_t, pred_x0):
        # x_s = sqrt(a_s) pred_x0 + c eps = c / sqrt(1 - a_t) x_t + (sqrt(a_s) - c sqrt(a_t / (1 - a_t))) pred_x0
        # with c = sqrt(1 - a_s - sigma^2): two ops.
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
        c = math.sqrt(max(1 - a_s - sigma ** 2, 0.0))  # (rounding can push it below 0)
        k_x, k_pred = c / (1 - a_t) ** 0.5, a_s ** 0.5 - c * (a_t / (1 - a_t)) ** 0.5
        x_s = torch.add(x_t * k_x, pred_x0, alpha=k_pred)
        if eta > 0:
            x_s = x_s + sigma * _randn_like(x_t, generator)
        return StepOutput(x_s, pred_x0)

    def predict_eps(self, model, x_t: torch.Tensor, t: int, label: torch.Tensor | None = None,
                    guidance_scale: float = 0.0) -> torch.Tensor:
        """The model's noise estimate; with a label, classifier-free guidance
        eps = (1 + w) eps(x, y) - w eps(x, null)  (Ho & Salimans 2022, Eq. 6)."""
        if label is None:  # a 0-dim t: one timestep for the whole batch
            return model(x_t, torch.tensor(t, dtype=torch.long, device=x_t.device))
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        if not getattr(model, "label_embed", None):
            raise ValueError("guidance needs a class-conditional model (num_classes > 0)")
        null = torch.full_like(label, model.null_label)
        both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([label, null]))
        cond, uncond = both.chunk(2)
        return (1 + guidance_scale) * cond - guidance_scale * uncond


def _randn_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    # Draw on the generator's device (CPU by default) so a seed means the same noise everywhere.
    if isinstance(generator, (list, tuple)):  # one generator per image: its noise ignores the batch
        return torch.cat([_randn_like(x[i: i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _reverse_step(diffusion: GaussianDiffusion, model, x_t, t, s, method, eta, generator, label, guidance_scale,
                  checkpoint: bool) -> StepOutput:
    """One network call and sampler update. ``checkpoint`` recomputes it in the backward pass
    instead of keeping its activations; the recomputation restores the generator's state so
    that an ancestral (DDPM) step draws the same noise again."""
    if not checkpoint:
        eps = diffusion.predict_eps(model, x_t, t, label, guidance_scale)
        return diffusion.step(eps, t, s, x_t, method, eta, generator)
    state, after = generator.get_state(), {}

    def run(x_t):
        g = torch.Generator()
        g.set_state(state)
        out = diffusion.step(diffusion.predict_eps(model, x_t, t, label, guidance_scale), t, s, x_t, method, eta, g)
        after["state"] = g.get_state()
        return out.prev_sample, out.pred_x0

    prev, pred = torch.utils.checkpoint.checkpoint(run, x_t, use_reentrant=False)
    generator.set_state(after["state"])  # (the stream continues past this step's draws)
    return StepOutput(prev, pred)


def purify(model, diffusion: GaussianDiffusion, images: torch.Tensor, t_star: int, num_steps: int = 10,
           method: str = "ddim", seed: int | Sequence[int] = 0, label: torch.Tensor | None = None,
           guidance_scale: float = 0.0, eta: float = 0.0, grad: bool = False,
           checkpoint: bool = False, input_noise=None) -> Iterator[PurifyStep]:
    """Diffuse ``images`` (B, C, H, W in [0, 1]) to ``t_star`` and denoise back, yielding each step.

    Yields ``num_steps + 1`` :class:`PurifyStep` frames: the diffused input (index 0) and the
    state after each reverse step; the last one's ``x_t`` is the purified batch in [0, 1].
    ``method="one-step"`` returns the model's x_0 prediction at t* (one network call).
    ``label`` with ``guidance_scale`` > 0 applies classifier-free guidance towards that label,
    which leaks it when it is the true label (the authors' setting; never a fair defense).
    ``grad=True`` keeps the graph, for attacks that differentiate through purification, and
    ``checkpoint=True`` then keeps only each step's input (memory of one step, not num_steps).
    ``seed`` fixes both the forward noise and any ancestral noise; a sequence of seeds, one per
    image, gives each image its own noise stream, so that an image's result does not depend on the
    batch it ran in (image i equals a batch-1 run with seed[i]; the app batches concurrent requests).
    ``input_noise`` (pixel units, one number or a (B,) tensor): noise the input already carries;
    the diffusion adds only what is missing to reach t*'s noise (:meth:`GaussianDiffusion.q_sample`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "one-step":
        num_steps = 1
    ts = diffusion.timesteps(t_star, num_steps)
    if isinstance(seed, (list, tuple)):
        if len(seed) != len(images) or (checkpoint and grad):
            raise ValueError(f"per-image seeds need one seed per image ({len(seed)} for {len(images)}) and no "
                             "checkpointing")
        generator = [torch.Generator().manual_seed(int(s)) for s in seed]
    else:
        generator = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode(not grad):
        x0 = images * 2 - 1
        present = None if input_noise is None else 2 * torch.as_tensor(input_noise)  # (a pixel is half a unit)
        x_t = diffusion.q_sample(x0, ts[0], _randn_like(x0, generator), present)
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        with torch.inference_mode(not grad):
            out = _reverse_step(diffusion, model, x_t, t, s, method, eta, generator, label, guidance_scale,
                                checkpoint and grad)
        yield PurifyStep(i, num_steps, t, x_t, out.pred_x0)
        x_t = out.prev_sample
    yield PurifyStep(num_steps, num_steps, 0, x_t, x_t)


def purify_batch(model, diffusion: GaussianDiffusion, images: torch.Tensor, t_star: int, **kwargs) -> torch.Tensor:
    """Run :func:`purify` to the end and return the purified batch in [0, 1]."""
    last = None
    for last in purify(model, diffusion, images, t_star, **kwargs):
        pass
    return last.x_t


def purify_chunks(model, diffusion: GaussianDiffusion, images: torch.Tensor, t_star: int, seed: int = 0,
                  chunk: int = 250, labels: torch.Tensor | None = None, input_noise: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor:
    """:func:`purify_batch` over a large set in chunks of ``chunk`` images; chunk i (its first
    image's index) draws its noise from seed ``seed * 7919 + i``, so a result does not depend on
    how many images were purified with it. ``labels`` (per image) guide a conditional model;
    ``input_noise`` (per image) is :func:`purify`'s."""
    out = []
    for i in range(0, len(images), chunk):
        label = None if labels is None else labels[i:i + chunk]
        noise = None if input_noise is None else input_noise[i:i + chunk]
        out.append(purify_batch(model, diffusion, images[i:i + chunk], t_star, seed=seed * 7919 + i, label=label,
                                input_noise=noise, **kwargs))
    return torch.cat(out)
