"""Evaluation: ``python -m tendiff.evaluate --help``.

Runs the matrix corruption x defense on a fixed, seeded subset of a test split and writes
``results.json``, ``results.csv``, ``results.md`` and figures to ``--out``.

Defenses (:class:`Defense`, by name): ``none``; a diffusion checkpoint label (``dense``, ``tt-r2``,
``ttm-r4``, ``authors-r3``) and its variants ``<label>/one-step``, ``<label>/adaptive-t`` (t* per
image from its estimated noise, which counts toward t*'s: :mod:`tendiff.adaptive`),
``<label>/vote<K>`` (majority vote over K purifications, :mod:`tendiff.defense`; variants
combine: ``dense/adaptive-t/vote8``), ``dense-cond/guided`` (guidance with the true label: leaks
it, no defense); every classical purifier by its registry name (``median3``, ``tucker``, ...); and
hybrids ``<classical>+<diffusion>`` (``median3+dense/adaptive-t``: the classical filter, then the
diffusion defense; the exact attack goes through the filter by BPDA).

Threat models are written next to every column: *transfer* attacks are crafted on the bare
classifier and never see the purifier, so their numbers are not robustness against an attacker
who knows the defense; the *adaptive* column attacks through a few-step DDIM surrogate of the
purifier; the *exact* column is PGD+EOT with the exact gradient through the defense as it runs
(BPDA through a classical purifier).

Per cell: accuracy (mean over ``--seeds`` purification runs) with a 95% Wilson interval,
worst-of-seeds accuracy (an image counts only if every run classifies it correctly: an attacker
who may resubmit), PSNR / SSIM of the purified image to the clean one and the wall time. Per
defense: parameters, size on disk, MACs per forward, forwards and seconds per image.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import hashlib
import json
import math
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import attacks, classical, cli
from . import checkpoints as ckpt
from .adaptive import purify_adaptive
from .classical import CLASSICAL
from .classifiers import predict as class_probabilities
from .data import DATASETS, load_dataset
from .metrics import psnr, ssim
from .defense import resubmission_accuracy, vote, vote_seeds
from .diffusion import METHODS, GaussianDiffusion, purify_chunks
from .protocol import ADAPTIVE_T_STAR, CORRUPTIONS as PROTOCOL, LADDER, STRENGTH, T_STAR, corrupt
from .runtime import machine, tune_allocator

CORRUPTIONS = ("none", "gaussian", "salt_pepper", "pgd_linf", "autoattack_l2", "adaptive", "exact")
PURIFIERS = ("none", "dense", "dense/adaptive-t", "dense/vote8", *LADDER, "tt-r2/one-step", "dense-cond/guided",
             *CLASSICAL)
ATTACKS = ("pgd_linf", "autoattack_l2", "adaptive", "exact")
PER_DEFENSE = ("adaptive", "exact")  # attacks crafted against each defense; the others are shared by all
COLUMN_GROUPS = (("Clean input and random noise", ("none", "gaussian", "salt_pepper")),
                 ("Transfer attacks", ("pgd_linf", "autoattack_l2")),
                 ("Adaptive attacks", ("adaptive", "exact")))
CLASSICAL_HEADING = "Classical purifiers (training-free, deterministic)"
CLASSICAL_TIMING_IMAGES = 8  # classical purifiers loop over images: a few show the per-image time


@dataclass
class EvalConfig:
    dataset: str = cli.field("mnist", "dataset ('all': each in turn)", choices=DATASETS + ("all",))
    n: int = cli.field(1000, "images for the columns without an attack")
    n_attack: int = cli.field(200, "images for attack columns")
    seeds: int = cli.field(3, "purification runs per image and cell: mean and worst-of-seeds (resubmission) accuracy")
    t_star: int | None = cli.field(None, "diffusion depth (default: the dataset's t*, chosen on held-out images: "
                                   + ", ".join(f"{d} {t}" for d, t in T_STAR.items()) + ")", type=int)
    steps: int = cli.field(10, "reverse steps")
    method: str = cli.field("ddim", "sampler", choices=METHODS)
    guidance_scale: float = cli.field(5.0, "classifier-free guidance scale of dense-cond/guided")
    pgd_steps: int = cli.field(40, "PGD steps of the transfer attack")
    adaptive_steps: int = cli.field(20, "PGD steps of the surrogate adaptive attack")
    adaptive_eot: int = cli.field(4, "EOT draws per step of the surrogate adaptive attack")
    surrogate_steps: int = cli.field(2, "DDIM steps of the surrogate")
    exact_steps: int = cli.field(20, "PGD steps of the exact column (Lee & Kim's budget: 200 steps, --exact-eot 20)")
    exact_eot: int = cli.field(4, "EOT draws per step of the exact column")
    attack_chunk: int = cli.field(50, "images per chunk of a per-defense attack (the chunk at image i is seeded "
                                  "seed + i)")
    attack_cache: str | None = cli.field(None, "folder keeping each finished chunk of a per-defense attack "
                                         "(safetensors): a rerun with the same settings and weights resumes from "
                                         "it, and the chunks' own crafting times are reported", type=str)
    autoattack_version: str = cli.field("standard", "AutoAttack version", choices=("standard", "rand", "plus"))
    corruptions: tuple = cli.field(CORRUPTIONS, "columns", choices=CORRUPTIONS)
    purifiers: tuple = cli.field(PURIFIERS, "rows: none, a checkpoint label (dense, tt-r2, ...), <label>/one-step, "
                                 "<label>/adaptive-t, <label>/vote<K> (combined: <label>/adaptive-t/vote8), "
                                 "dense-cond/guided, a classical purifier (" + ", ".join(CLASSICAL) + "), or a "
                                 "hybrid <classical>+<diffusion> (median3+dense/adaptive-t: the filter first)")
    seed: int = cli.field(0, "seed of the image order, the noises and the attacks")
    batch_size: int = cli.field(250, "purification chunk")
    timing: bool = cli.field(True, "skip the per-purifier timings", flag="--no-timing")
    strength: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.t_star is None and self.dataset in T_STAR:
            self.t_star = T_STAR[self.dataset]


# --------------------------------------------------------------- metrics
def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # (clamped to hold p: at p = 0 or 1 rounding can put the bound a hair on the wrong side)
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


# --------------------------------------------------------------- defenses
def timed(fn, *args):
    """(fn(*args), its wall time in seconds)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _tile(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of t repeated as often as needed (timing batches larger than the subset)."""
    return t.repeat(-(-n // len(t)), *[1] * (t.ndim - 1))[:n]


@dataclass(eq=False)
class Defense:
    """A defense as the evaluation runs it: ``purify(x, seed)`` (batch in [0, 1] -> batch in [0, 1])
    and ``predict(classifier, x, seed)`` (labels; a vote defense predicts by majority vote)."""
    name: str
    kind: str  # "none", "diffusion" or "classical"
    model: torch.nn.Module | None = None  # diffusion: the denoiser
    file: str | None = None  # diffusion: its checkpoint file
    diffusion: GaussianDiffusion | None = None
    t_star: int = 0
    steps: int = 10
    method: str = "ddim"
    chunk: int = 250
    votes: int = 1  # K: majority vote over K purifications with seeds defense.vote_seeds(seed, K)
    adaptive_t: bool = False  # t* per image from its estimated noise (tendiff.adaptive)
    guide_labels: torch.Tensor | None = None  # guidance towards the true labels: leaks them, no defense
    guidance_scale: float = 0.0
    prefilter: str | None = None  # a hybrid: this classical purifier runs first

    @property
    def stochastic(self) -> bool:
        return self.kind == "diffusion"

    @property
    def differentiable(self) -> bool:
        """Whether attacks.purify_differentiable computes it (it has no guidance); else BPDA."""
        return self.kind == "diffusion" and self.guide_labels is None

    @property
    def parameters(self) -> int:
        return 0 if self.model is None else sum(p.numel() for p in self.model.parameters())

    @property
    def forwards_per_purification(self) -> int:
        if self.kind != "diffusion":
            return 0
        # guidance runs the model on a conditional and an unconditional copy of the batch
        return (1 if self.method == "one-step" else self.steps) * (2 if self.guide_labels is not None else 1)

    @property
    def forwards_per_image(self) -> int:
        return self.forwards_per_purification * self.votes

    @property
    def attack_key(self) -> tuple:
        """Defenses with one key face the same per-defense attack (a vote: that of what it repeats)."""
        if self.kind != "diffusion":
            return (self.name,)
        return self.file, self.method, self.adaptive_t, self.guide_labels is not None, self.prefilter

    @property
    def identity(self) -> tuple:
        """What an attack on this defense depends on (the weights by their hash): names a cached attack."""
        if self.kind != "diffusion":
            return (self.name,)
        sha = ckpt.sha256_file(ckpt.checkpoint_dir() / self.file)
        return (self.file, sha, self.t_star, self.steps, self.method, self.adaptive_t, self.guide_labels is not None,
                *([self.prefilter] if self.prefilter else []))  # (no prefilter: the names caches already have)

    def purify(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.kind == "none":
            return x
        if self.kind == "classical":
            return classical.purify(self.name, x)
        if self.prefilter:
            x = classical.purify(self.prefilter, x)
        if self.adaptive_t:
            return purify_adaptive(self.model, self.diffusion, x, ADAPTIVE_T_STAR, seed, self.chunk,
                                   num_steps=self.steps, method=self.method)[0]
        labels = None if self.guide_labels is None else _tile(self.guide_labels, len(x))
        return purify_chunks(self.model, self.diffusion, x, self.t_star, seed, self.chunk, labels,
                             num_steps=self.steps, method=self.method, guidance_scale=self.guidance_scale)

    def run(self, classifier, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the purification with ``seed``, the defense's labels: the vote over its K purifications)."""
        first, predictions = None, []
        with torch.inference_mode():
            for s in vote_seeds(seed, self.votes):  # K = 1: just seed
                purified = self.purify(x, s)
                first = purified if first is None else first
                probs = class_probabilities(classifier, purified)
                predictions.append(probs.argmax(1))
        return first, vote(torch.stack(predictions), probs.shape[1])[0]

    def predict(self, classifier, x: torch.Tensor, seed: int) -> torch.Tensor:
        return self.run(classifier, x, seed)[1]

    def unsupported(self, corruption: str) -> str | None:
        """Why this defense has no cell in the column ``corruption`` (None: it has one)."""
        if corruption == "adaptive" and self.kind == "classical":
            return "no diffusion model to make a surrogate of; the exact column attacks it by BPDA"
        if corruption == "adaptive" and self.adaptive_t:
            return "the surrogate has one fixed t*; the exact column goes through the t* the defense picks"
        if corruption == "adaptive" and self.prefilter:
            return "the surrogate has no classical step; the exact column goes through it (BPDA)"
        if corruption == "exact" and self.guide_labels is not None:
            return "no exact gradient through guidance is built, and true-label guidance is no defense"
        return None

    def threat(self, corruption: str) -> str:
        """The protocol's kind of attack this defense meets in the column: BPDA where not differentiable."""
        return "bpda" if corruption == "exact" and not self.differentiable else corruption

    def exact_attack(self, classifier, x, y, eps: float, steps: int, eot: int, seed: int) -> torch.Tensor:
        """PGD L-inf through the defense as it runs: exact gradient and EOT, or BPDA (none: plain PGD)."""
        if not self.differentiable:
            return attacks.pgd_bpda(classifier, lambda v: self.purify(v, 0), x, y, eps, steps, seed=seed)
        if self.adaptive_t or self.prefilter:
            return attacks.pgd_linf_from_grad(x, self._grad_at_chosen_t(classifier, y, eot, seed), eps, steps,
                                              seed=seed)
        return attacks.pgd_eot_exact(classifier, self.model, self.diffusion, x, y, eps, self.t_star, steps, eot,
                                     self.steps, self.method, seed=seed)

    def _grad_at_chosen_t(self, classifier, y, eot: int, seed: int):
        """The EOT gradient through the purification at the t* the defense uses for the current
        input (adaptive: the choice is piecewise constant in x, so no gradient flows through it, but
        one does through the noise estimate it subtracts from t*'s noise). A hybrid's classical step
        runs forward and passes the gradient back unchanged (BPDA)."""
        def grad(x_adv, it):
            x_in = classical.purify(self.prefilter, x_adv) if self.prefilter else x_adv
            t_stars = (ADAPTIVE_T_STAR.choose(x_in, self.diffusion) if self.adaptive_t
                       else torch.full((len(x_in),), self.t_star))
            out = torch.zeros_like(x_adv)
            for t in t_stars.unique().tolist():
                idx = (t_stars == t).nonzero().flatten()
                out[idx] = attacks.defense_loss_grad(
                    classifier, self.model, self.diffusion, x_in[idx], y[idx], t, self.steps,
                    attacks.eot_seeds(seed, it, eot), self.method,
                    input_noise=ADAPTIVE_T_STAR.input_noise if self.adaptive_t else None)[1]
            return out
        return grad


VARIANT = re.compile(r"one-step|adaptive-t|guided|vote(\d+)")


def make_defense(name: str, cfg: EvalConfig, diffusion: GaussianDiffusion, labels: torch.Tensor,
                 models: dict) -> Defense | None:
    """The defense called ``name`` (see the module docstring); None when a classical purifier's
    library is missing. Raises CheckpointNotFoundError when a diffusion checkpoint is."""
    if name == "none":
        return Defense("none", "none")
    if name in CLASSICAL:
        return Defense(name, "classical") if classical.available(name) else None
    if "+" in name:  # a hybrid: <classical>+<diffusion defense>
        prefilter, rest = name.split("+", 1)
        if prefilter not in CLASSICAL or rest in CLASSICAL or "+" in rest or rest == "none":
            raise ValueError(f"a hybrid is <classical>+<diffusion defense> (e.g. median3+dense/adaptive-t), "
                             f"got {name!r}; classical: {', '.join(CLASSICAL)}")
        inner = make_defense(rest, cfg, diffusion, labels, models)
        if inner.guide_labels is not None:
            raise ValueError(f"{name!r}: true-label guidance is no defense, so no hybrid is made of it")
        return replace(inner, name=name, prefilter=prefilter) if classical.available(prefilter) else None
    base, *variants = name.split("/")  # e.g. dense/adaptive-t/vote8: variants combine
    matches = [VARIANT.fullmatch(v) for v in variants]
    kinds = [v.rstrip("0123456789") for v in variants]
    if None in matches or len(set(kinds)) < len(kinds) or ("guided" in kinds and len(kinds) > 1):
        raise ValueError(f"unknown variant in {name!r}: one-step, adaptive-t, guided or vote<K>, each at most "
                         "once (guided alone)")
    file = ckpt.checkpoint_name(cfg.dataset, base)
    if file not in models:  # the variants of one checkpoint share its model
        models[file] = ckpt.load_model(file)
    guided = "guided" in kinds
    return Defense(name, "diffusion", models[file], file, diffusion, cfg.t_star, cfg.steps,
                   "one-step" if "one-step" in kinds else cfg.method, cfg.batch_size,
                   votes=next((int(m[1]) for m in matches if m[1]), 1), adaptive_t="adaptive-t" in kinds,
                   guide_labels=labels if guided else None, guidance_scale=cfg.guidance_scale if guided else 0.0)


def load_defenses(cfg: EvalConfig, diffusion: GaussianDiffusion, labels: torch.Tensor
                  ) -> tuple[list[Defense], list[str]]:
    """The defenses named in cfg.purifiers that can run here; the names of the others (checkpoint
    or library missing)."""
    defenses, missing, models = [], [], {}
    for name in cfg.purifiers:
        try:
            defense = make_defense(name, cfg, diffusion, labels, models)
        except ckpt.CheckpointNotFoundError:
            defense = None
        if defense is None:
            missing.append(name)
        else:
            defenses.append(defense)
    return defenses, missing


# --------------------------------------------------------------- evaluation
def evaluation_order(num_images: int, seed: int = 0) -> torch.Tensor:
    """The seeded order of the test split: evaluation uses its first ``--n`` images (the same for
    every purifier and corruption); scripts/sweep_t_star.py chooses t* on images after the
    first 1000, which no reported number uses."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))


# an attack chunk as --attack-cache keeps it
def save_chunk(path: Path, images: torch.Tensor, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"images": images.contiguous()}, str(tmp), metadata={"seconds": repr(seconds)})
    tmp.replace(path)  # (a chunk is either whole or absent)


def load_chunk(path: Path) -> tuple[torch.Tensor, float]:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("images"), float(f.metadata()["seconds"])


class Evaluation:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.strength = {**STRENGTH[cfg.dataset], **cfg.strength}
        self.diffusion = GaussianDiffusion()
        self.classifier = ckpt.load_model(ckpt.checkpoint_name(cfg.dataset, "classifier"))
        test = load_dataset(cfg.dataset, "test")
        order = evaluation_order(len(test), cfg.seed)
        n_max = max(cfg.n, cfg.n_attack)
        self.images = test.float_images(order[:n_max])
        self.labels = test.labels[order[:n_max]]
        self.defenses, self.missing = load_defenses(cfg, self.diffusion, self.labels)
        self.attacks: dict[tuple, tuple[torch.Tensor, float, str]] = {}  # see attack_for

    def n_for(self, corruption: str) -> int:
        return self.cfg.n_attack if corruption in ATTACKS else self.cfg.n

    # -- corruptions
    def corrupt(self, corruption: str) -> torch.Tensor:
        """The corrupted images of a column shared by every defense (random noise, transfer attacks)."""
        n = self.n_for(corruption)
        x, y = self.images[:n], self.labels[:n]
        s, seed, cfg = self.strength, self.cfg.seed, self.cfg
        if corruption == "none" or PROTOCOL[corruption].random:
            return corrupt(corruption, x, s.get(corruption), seed)
        if corruption == "pgd_linf":
            eps = s["pgd_linf"]
            return attacks.pgd_linf(self.classifier, x, y, eps, alpha=2.5 * eps / cfg.pgd_steps, steps=cfg.pgd_steps,
                                    seed=seed)
        if corruption == "autoattack_l2":
            return attacks.autoattack_l2(self.classifier, x, y, s["autoattack_l2"], cfg.autoattack_version, seed)
        raise ValueError(f"unknown corruption {corruption!r}")

    def per_defense_attack(self, corruption: str, defense: Defense) -> tuple[torch.Tensor, float]:
        """(the images of a PER_DEFENSE column crafted against ``defense``, the seconds crafting them took)."""
        n, cfg, eps = self.n_for(corruption), self.cfg, self.strength["pgd_linf"]
        x, y = self.images[:n], self.labels[:n]
        if corruption == "adaptive" and defense.kind == "none":  # no purifier: PGD on the classifier
            return timed(self.corrupt, "pgd_linf")
        if corruption == "adaptive":
            return self._chunked(x, y, lambda xs, ys, sd: attacks.pgd_eot_ddim_surrogate(
                self.classifier, defense.model, self.diffusion, xs, ys, eps, defense.t_star,
                steps=cfg.adaptive_steps, eot=cfg.adaptive_eot, surrogate_steps=cfg.surrogate_steps, seed=sd),
                (corruption, defense.identity, eps, cfg.adaptive_steps, cfg.adaptive_eot, cfg.surrogate_steps,
                 attacks.ATTACK_VERSION))
        if corruption == "exact":
            return self._chunked(x, y, lambda xs, ys, sd: defense.exact_attack(
                self.classifier, xs, ys, eps, cfg.exact_steps, cfg.exact_eot, sd),
                (corruption, defense.identity, eps, cfg.exact_steps, cfg.exact_eot, attacks.ATTACK_VERSION))
        raise ValueError(f"{corruption!r} is not crafted per defense")

    def _chunked(self, x, y, attack, settings: tuple) -> tuple[torch.Tensor, float]:
        """attack(x, y, seed) over chunks of --attack-chunk images, the chunk at i seeded seed + i, and
        the seconds it took; with --attack-cache each chunk is saved when done and found by a rerun."""
        size, parts, seconds = self.cfg.attack_chunk, [], 0.0
        for i in range(0, len(x), size):
            xs, ys, sd = x[i:i + size], y[i:i + size], self.cfg.seed + i
            path = self._chunk_file(settings, xs, ys, sd)
            if path is not None and path.exists():
                adv, took = load_chunk(path)
            else:
                adv, took = timed(attack, xs, ys, sd)
                if path is not None:
                    save_chunk(path, adv, took)
                    print(f"[{settings[0]} / {settings[1][0]}] images {i}-{i + len(xs)} of {len(x)}: "
                          f"{took:.0f} s, saved to {path}", flush=True)
            parts.append(adv)
            seconds += took
        return torch.cat(parts), seconds

    def _chunk_file(self, settings: tuple, xs: torch.Tensor, ys: torch.Tensor, seed: int) -> Path | None:
        """Where --attack-cache keeps a chunk: named by a hash of everything the attack depends on."""
        if self.cfg.attack_cache is None:
            return None
        h = hashlib.sha256(repr((self.cfg.dataset, settings, seed)).encode())
        h.update(xs.contiguous().numpy().tobytes())
        h.update(ys.contiguous().numpy().tobytes())
        return Path(self.cfg.attack_cache) / f"{self.cfg.dataset}_{settings[0]}_{h.hexdigest()[:20]}.safetensors"

    def attack_for(self, corruption: str, defense: Defense) -> tuple[torch.Tensor, float, str]:
        """(the attack images a PER_DEFENSE cell is scored on, the seconds crafting them took, the
        defense they were crafted against: defenses with one attack_key share one attack)."""
        key = (corruption, *defense.attack_key)
        if key not in self.attacks:
            self.attacks[key] = (*self.per_defense_attack(corruption, defense), defense.name)
        return self.attacks[key]

    # -- cells
    def cell(self, corruption: str, defense: Defense, corrupted: torch.Tensor, attack_seconds: float | None = None,
             crafted_for: str | None = None) -> dict:
        """Score ``defense`` on ``corrupted``: ``seeds`` purification runs per image (one if
        deterministic). An attack's seconds count in the cell's own if it was crafted for this defense
        (``crafted_for``; None: a shared attack)."""
        t0 = time.perf_counter()
        n = len(corrupted)
        y, clean = self.labels[:n], self.images[:n]
        runs = [defense.run(self.classifier, corrupted, self.cfg.seed + s)
                for s in range(self.cfg.seeds if defense.stochastic else 1)]
        correct = torch.stack([labels == y for _, labels in runs])
        acc, worst = resubmission_accuracy(correct)
        lo, hi = wilson_interval(acc * n, n)
        first = runs[0][0]
        cell = {"dataset": self.cfg.dataset, "corruption": corruption, "purifier": defense.name,
                "threat_model": PROTOCOL[defense.threat(corruption)].threat, "n": n, "seeds": len(runs),
                "accuracy": acc, "ci95": [lo, hi], "accuracy_per_seed": correct.double().mean(1).tolist(),
                "worst_of_seeds": worst, "psnr": psnr(first, clean).mean().item(),
                "ssim": ssim(first, clean).mean().item(),
                "seconds": time.perf_counter() - t0 + (attack_seconds if crafted_for == defense.name else 0.0)}
        if attack_seconds is not None:
            cell.update(attack_seconds=attack_seconds, attack_crafted_for=crafted_for)
        if corruption in ATTACKS:
            cell.update(attack_version=attacks.ATTACK_VERSION)
        return cell

    # -- costs
    def seconds_per_image(self, defense: Defense, batch: int) -> float:
        """The defended prediction's (purifications and classifier) wall time per image, best of a few."""
        x = _tile(self.images, batch)
        defense.predict(self.classifier, x, 0)  # warm-up
        return min(timed(defense.predict, self.classifier, x, 0)[1] for _ in range(3 if batch == 1 else 2)) / batch

    def costs(self, defense: Defense) -> dict:
        row = {"purifier": defense.name, "kind": defense.kind, "parameters": defense.parameters}
        if defense.kind == "diffusion":
            path = ckpt.checkpoint_dir() / defense.file
            row.update(file=defense.file, size_bytes=path.stat().st_size, sha256=ckpt.sha256_file(path),
                       macs_per_forward=defense.model.macs(*self.images.shape[-2:]),
                       forwards_per_image=defense.forwards_per_image)
        if self.cfg.timing and defense.kind != "none":
            for b in (1, 64) if defense.kind == "diffusion" else (1, CLASSICAL_TIMING_IMAGES):
                row[f"s_per_image_b{b}"] = self.seconds_per_image(defense, b)
        return row

    def seconds_per_forward(self) -> float:
        """One network forward per image (batch 64) of the first diffusion model; 0 if none."""
        model = next((d.model for d in self.defenses if d.kind == "diffusion"), None)
        if model is None:
            return 0.0
        x, t = _tile(self.images, 64), torch.full((64,), 10)
        with torch.inference_mode():
            model(x, t)
            return timed(model, x, t)[1] / 64

    def estimate_seconds(self) -> float:
        """A rough total before starting: network forwards, and classical purifications timed on one image."""
        cfg, fwd = self.cfg, self.seconds_per_forward()
        total = 0.0
        for d in self.defenses:
            image = d.forwards_per_image * fwd if d.kind == "diffusion" else timed(d.purify, self.images[:1], 0)[1]
            for c in cfg.corruptions:
                n = self.n_for(c)
                total += n * (cfg.seeds if d.stochastic else 1) * image
                if c == "adaptive" and d.kind == "diffusion":
                    total += n * cfg.adaptive_steps * cfg.adaptive_eot * (cfg.surrogate_steps + 1) * 3 * fwd
                if c == "exact":  # forward, recomputation and backward: ~4 forwards a step (checkpointed)
                    total += n * cfg.exact_steps * (cfg.exact_eot * 4 * d.forwards_per_purification * fwd
                                                    if d.differentiable else image)
        return total + (self.cfg.n_attack * 0.05 if "autoattack_l2" in cfg.corruptions else 0.0)

    def run(self) -> dict:
        cfg = self.cfg
        print(f"[{cfg.dataset}] {len(cfg.corruptions)} corruptions x {len(self.defenses)} defenses "
              f"({', '.join(d.name for d in self.defenses)}); missing: {self.missing or 'none'}; "
              f"estimated {self.estimate_seconds() / 60:.1f} min", flush=True)
        cells, skipped = [], []
        with tqdm(total=len(cfg.corruptions) * len(self.defenses), desc=f"evaluate {cfg.dataset}", dynamic_ncols=True,
                  mininterval=1.0 if sys.stderr.isatty() else 20.0) as bar:
            for corruption in cfg.corruptions:
                shared = None if corruption in PER_DEFENSE else timed(self.corrupt, corruption)
                for defense in self.defenses:
                    bar.update(1)
                    reason = defense.unsupported(corruption)
                    if reason:
                        skipped.append({"corruption": corruption, "purifier": defense.name, "reason": reason})
                        continue
                    bar.set_postfix_str(f"{corruption} / {defense.name}", refresh=False)
                    if shared is None:
                        cells.append(self.cell(corruption, defense, *self.attack_for(corruption, defense)))
                    else:
                        attack_seconds = shared[1] if corruption in ATTACKS else None
                        cells.append(self.cell(corruption, defense, shared[0], attack_seconds))
        costs = [self.costs(d) for d in self.defenses]
        return {"config": {**asdict(cfg), "strength": self.strength}, "missing": self.missing,
                "skipped": skipped, "cells": cells, "costs": costs}


# --------------------------------------------------------------- reports
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def cell_index(result: dict) -> dict:
    return {(c["corruption"], c["purifier"]): c for c in result["cells"]}


def accuracy_text(cell: dict, ci: bool = False) -> str:
    """'mean (worst-of-seeds)' in %, the worst only where a random defense ran several times;
    ``ci`` adds the 95% interval of the mean."""
    txt = pct(cell["accuracy"]) + (f" ({pct(cell['worst_of_seeds'])})" if cell["seeds"] > 1 else "")
    return txt + (f" [{pct(cell['ci95'][0])}, {pct(cell['ci95'][1])}]" if ci else "")


BEST_CLASSICAL = "best classical"  # a summary row: the best classical purifier of each column
SUMMARY_PURIFIERS = ("none", "dense", BEST_CLASSICAL, "tt-r2", "dense/adaptive-t", "dense/vote8", "authors-r3",
                     "tt-r2/one-step", "dense-cond/guided")


def summary_text(cells: dict, corruption: str, purifier: str) -> str:
    if purifier != BEST_CLASSICAL:
        cell = cells.get((corruption, purifier))
        return "" if cell is None else accuracy_text(cell)
    best = max((c for (k, p), c in cells.items() if k == corruption and p in CLASSICAL),
               key=lambda c: c["accuracy"], default=None)
    return "" if best is None else f"{pct(best['accuracy'])} {best['purifier']}"


def summary_markdown(results: list[dict], purifiers=SUMMARY_PURIFIERS) -> str:
    """A compact table (accuracy %, mean (worst-of-seeds) over purification runs; the best classical
    purifier per column, by name) of a few defenses per dataset, for the README:
    ``python -m tendiff.evaluate --summarize docs/results.json``."""
    corrs = list(dict.fromkeys(c["corruption"] for r in results for c in r["cells"]))
    lines = ["| dataset | purifier | " + " | ".join(PROTOCOL[c].short for c in corrs) + " |",
             "|---|---|" + "---|" * len(corrs)]
    for r in results:
        cells = cell_index(r)
        for p in purifiers:
            row = [summary_text(cells, c, p) for c in corrs]
            if any(row):
                lines.append(f"| {r['config']['dataset']} | {p} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def claims(result: dict) -> list[str]:
    """What our measurements say about the paper's testable claims, for one dataset."""
    lines = []
    costs = {c["purifier"]: c for c in result["costs"]}
    cells = cell_index(result)
    if "dense" in costs and any(k.startswith("tt-r") and "/" not in k for k in costs):
        tt = {k: v for k, v in costs.items() if k.startswith("tt-r") and "/" not in k}
        ratios = ", ".join(f"{k}: {costs['dense']['parameters'] / v['parameters']:.0f}x" for k, v in tt.items())
        lines.append(f"- **Parameters O(N R^2) vs O(N^2)**: supported for the `tt` layout (whole-model compression {ratios}; "
                     "per layer the count is linear in N, see the formula test in `tests/test_tt.py`)."
                     + (f" The authors' layout at rank 3 keeps {costs['authors-r3']['parameters']:,} parameters "
                        f"({costs['dense']['parameters'] / costs['authors-r3']['parameters']:.1f}x), i.e. O(N^2 R)."
                        if "authors-r3" in costs else ""))
        if "s_per_image_b1" in costs["dense"]:
            sp = []
            for k, v in tt.items():
                sp.append(f"{k}: {costs['dense']['s_per_image_b1'] / v['s_per_image_b1']:.2f}x (batch 1), "
                          f"{costs['dense']['s_per_image_b64'] / v['s_per_image_b64']:.2f}x (batch 64)")
            verdict = "supported" if all(costs['dense']['s_per_image_b64'] > v['s_per_image_b64'] for v in tt.values()) \
                else "not supported at every rank"
            lines.append(f"- **\"More efficient\"** (wall time of the same defended prediction on this machine, "
                         f"dense/TT): {verdict}: {'; '.join(sp)}.")
    lines += baseline_claims(cells)
    for corruption in CORRUPTIONS[1:]:
        d, t = cells.get((corruption, "dense")), cells.get((corruption, "tt-r2"))
        if d and t:
            overlap = not (t["ci95"][0] > d["ci95"][1] or d["ci95"][0] > t["ci95"][1])
            verdict = ("no significant difference" if overlap else
                       ("tt-r2 better" if t["accuracy"] > d["accuracy"] else "tt-r2 worse"))
            lines.append(f"- **TT vs dense purification, {corruption}** ({PROTOCOL[corruption].threat}): tt-r2 {pct(t['accuracy'])}% "
                         f"vs dense {pct(d['accuracy'])}%: {verdict} at 95%.")
    return lines


def baseline_claims(cells: dict) -> list[str]:
    """The paper's "outperforms the baseline purification methods", column by column: the dense
    diffusion purifier against the best classical purifier of that column (95% intervals)."""
    lines = []
    for corruption in CORRUPTIONS:
        d = cells.get((corruption, "dense"))
        rivals = [(c["accuracy"], p, c) for (col, p), c in cells.items() if col == corruption and p in CLASSICAL]
        if d is None or not rivals:
            continue
        _, name, b = max(rivals, key=lambda r: r[0])
        if d["ci95"][0] > b["ci95"][1]:
            verdict = "supported"
        elif b["ci95"][0] > d["ci95"][1]:
            verdict = "not supported (the classical purifier is better)"
        else:
            ahead = "dense" if d["accuracy"] > b["accuracy"] else "the classical purifier"
            verdict = f"not shown (the intervals overlap; {ahead} is ahead)"
        lines.append(f"- **Outperforms the baseline purifiers, {PROTOCOL[corruption].short}**: dense {pct(d['accuracy'])}% "
                     f"vs the best classical, {name}, {pct(b['accuracy'])}%: {verdict}.")
    return lines


def table(header: list[str], rows: dict[str, list[str]]) -> list[str]:
    """A markdown table, a row per purifier: diffusion ones first, then the classical ones under a heading row."""
    names = sorted(rows, key=lambda p: p in CLASSICAL)  # (stable: keeps the run's order within each group)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, p in enumerate(names):
        if p in CLASSICAL and (i == 0 or names[i - 1] not in CLASSICAL):
            out.append(f"| **{CLASSICAL_HEADING}** |" + " |" * (len(header) - 1))
        out.append("| " + " | ".join([p, *rows[p]]) + " |")
    return out


def budget(corruption: str, cfg: dict) -> str:
    s = cfg["strength"]
    eps = f"eps {s['pgd_linf']:.4g}"
    return {"none": "no corruption", "gaussian": f"sigma {s['gaussian']}", "salt_pepper": f"p {s['salt_pepper']}",
            "pgd_linf": f"{eps}, {cfg['pgd_steps']} steps",
            "autoattack_l2": f"eps {s['autoattack_l2']}, {cfg['autoattack_version']}",
            "adaptive": f"{eps}, {cfg['adaptive_steps']} steps, EOT {cfg['adaptive_eot']}, "
                        f"{cfg['surrogate_steps']}-step DDIM surrogate",
            "exact": f"{eps}, {cfg.get('exact_steps')} steps, EOT {cfg.get('exact_eot')} (BPDA: no EOT, deterministic)",
            }[corruption]


def wall_time(corruption: str, col: list[dict]) -> str:
    """A column's wall time: a shared attack crafted once, plus every cell (with the attacks crafted for it)."""
    if not any("seconds" in c for c in col):
        return ""  # (results written before cells were timed)
    shared = None if corruption in PER_DEFENSE else next((c["attack_seconds"] for c in col if "attack_seconds" in c),
                                                         None)
    total = sum(c.get("seconds", 0.0) for c in col) + (shared or 0.0)
    return (f"; attack crafted once in {shared:.1f} s" if shared is not None else "") + f"; wall time {total:.1f} s"


def seconds_text(cell: dict) -> str:
    if "seconds" not in cell:
        return ""
    other = cell.get("attack_crafted_for") not in (None, cell["purifier"])  # e.g. a vote: its base's attack
    return f"{cell['seconds']:.1f}" + (f" (attack: {cell['attack_crafted_for']}'s)" if other else "")


def column_section(title: str, cols: list[str], res: dict, purs: list[str]) -> list[str]:
    """One column group: each column's budget, wall time and threat model(s) (which rows meet which
    where they differ: exact or BPDA), then the accuracies and, for attacks crafted per defense,
    the seconds each cell took."""
    cells, skipped = cell_index(res), {(s["corruption"], s["purifier"]) for s in res.get("skipped", [])}
    out = [f"### {title}", ""]
    for c in cols:
        col = [cell for cell in res["cells"] if cell["corruption"] == c]
        threats: dict[str, list[str]] = {}
        for cell in col:
            threats.setdefault(cell["threat_model"], []).append(cell["purifier"])
        head = f"- **{PROTOCOL[c].short}** ({budget(c, res['config'])}{wall_time(c, col)}):"
        out += ([f"{head} {next(iter(threats))}"] if len(threats) == 1 else
                [head] + [f"  - {', '.join(p)}: {t}" for t, p in threats.items()])
    per_defense = [c for c in cols if c in PER_DEFENSE and any("seconds" in cells[k] for k in cells if k[0] == c)]
    rows = {}
    for p in purs:
        acc = ["not run" if (c, p) in skipped else accuracy_text(cells[(c, p)], ci=True) if (c, p) in cells else ""
               for c in cols]
        rows[p] = acc + [seconds_text(cells.get((c, p), {})) for c in per_defense]
    header = ["purifier", *(PROTOCOL[c].short for c in cols), *(f"{c}: s" for c in per_defense)]
    return out + [""] + table(header, rows) + [""]


def not_evaluated(res: dict) -> list[str]:
    checkpoints = [m for m in res["missing"] if m not in CLASSICAL]
    libraries = [m for m in res["missing"] if m in CLASSICAL]
    out = [f"Not evaluated ({why} missing): {', '.join(names)}." for why, names in
           (("checkpoint", checkpoints), ("library", libraries)) if names]
    reasons: dict[tuple, list[str]] = {}
    for s in res.get("skipped", []):
        reasons.setdefault((s["corruption"], s["reason"]), []).append(s["purifier"])
    out += [f"Not run in the {PROTOCOL[c].short} column: {', '.join(p)}: {why}." for (c, why), p in reasons.items()]
    out += older_attacks(res)
    return [line + "  " for line in out] + ([""] if out else [])


def older_attacks(res: dict) -> list[str]:
    """A line naming the rows whose attack cells older attack code made (see attacks.ATTACK_VERSION)."""
    old = {c["purifier"]: c.get("attack_version", 1) for c in res["cells"]
           if c["corruption"] in ATTACKS and c.get("attack_version", 1) < attacks.ATTACK_VERSION}
    if not old:
        return []
    return [f"Attack columns made by older attack code (version {min(old.values())}; now "
            f"{attacks.ATTACK_VERSION}: their random starts were drawn from the stream of purification run 0): "
            f"{', '.join(old)}."]


def ms(seconds: float | None, digits: int = 1) -> str:
    return "" if seconds is None else f"{seconds * 1000:.{digits}f} ms"


def cost_row(c: dict) -> list[str]:
    big = c.get("s_per_image_b64", c.get(f"s_per_image_b{CLASSICAL_TIMING_IMAGES}"))
    if "macs_per_forward" not in c:  # classical: no network
        return [f"{c['parameters']:,}", "", "", "", ms(c.get("s_per_image_b1")), ms(big, 2)]
    return [f"{c['parameters']:,}", f"{c['size_bytes'] / 1024:.0f} KiB", f"{c['macs_per_forward'] / 1e6:.1f} M",
            str(c["forwards_per_image"]), ms(c.get("s_per_image_b1")), ms(big, 2)]


def dataset_section(res: dict, made_by: str | None) -> list[str]:
    cfg, s = res["config"], res["config"]["strength"]
    corrs = list(dict.fromkeys(c["corruption"] for c in res["cells"]))
    purs = list(dict.fromkeys(c["purifier"] for c in res["cells"]))
    cells = cell_index(res)
    out = [f"## {cfg['dataset']}", ""] + ([made_by, ""] if made_by else [])
    out += [f"Subset: first {cfg['n']} images (attacks: {cfg['n_attack']}) of a seed-{cfg['seed']} permutation of "
            f"the test split. Purification: t* = {cfg['t_star']}, {cfg['steps']} {cfg['method']} steps; random "
            f"defenses purify each image {cfg['seeds']} times per cell (deterministic ones once). Gaussian sigma "
            f"{s['gaussian']}, salt-and-pepper p {s['salt_pepper']}.", ""]
    out += not_evaluated(res)
    for title, group in COLUMN_GROUPS:
        cols = [c for c in group if c in corrs]
        out += column_section(title, cols, res, purs) if cols else []
    out += ["PSNR (dB) / SSIM of the purified image to the clean one (first run):", ""]
    out += table(["purifier", *(PROTOCOL[c].short for c in corrs)],
                 {p: [f"{cells[(c, p)]['psnr']:.1f} / {cells[(c, p)]['ssim']:.3f}" if (c, p) in cells else ""
                      for c in corrs] for p in purs})
    out += ["", "Cost per defense (seconds per image of the whole defended prediction, purification(s) and "
            "classifier, on this machine):", ""]
    out += table(["purifier", "parameters", "size on disk", "MACs / forward", "forwards / image",
                  "s / image, batch 1", f"s / image, batch 64 (classical: {CLASSICAL_TIMING_IMAGES} images)"],
                 {c["purifier"]: cost_row(c) for c in res["costs"] if c["purifier"] != "none"})
    out += ["", "What the measurements say about the paper's claims:", ""] + claims(res) + [""]
    for fig in res.get("figures", []):
        out += [f"![{fig}]({fig})", ""]
    return out


def markdown(results: list[dict], command: str) -> str:
    commands = list(dict.fromkeys(r.get("command", command) for r in results))
    out = ["# Results", "",
           ("Made by `" + commands[0] + "`  \n" + f"on {results[0].get('machine', machine())}, "
            f"{results[0].get('date', time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}."
            if len(commands) == 1 else
            "Made dataset by dataset (`--merge`); each section names the command, machine and date that made it."),
           "",
           "Accuracy in %: the mean over purification runs, in parentheses the worst-of-seeds accuracy (an image "
           "counts only if every run classifies it right: an attacker who may resubmit; shown where a random defense "
           "ran several times), then the 95% Wilson interval of the mean. Transfer attacks are crafted on the bare "
           "classifier and are **not** robustness against an adaptive attacker; the adaptive columns attack through "
           "the defense (a DDIM surrogate; the exact gradient; BPDA for classical purifiers). `<label>/vote<K>` is a "
           "majority vote over K purifications. `dense-cond/guided` is the authors' code-faithful variant: "
           "classifier-free guidance with the **true label**, which leaks the answer and is no defense.",
           ""]
    for res in results:
        made_by = (f"Made by `{res.get('command', command)}`  \non {res.get('machine', '?')}, {res.get('date', '?')}."
                   if len(commands) > 1 else None)
        out += dataset_section(res, made_by)
    return "\n".join(out)


def figures(result: dict, out_dir: Path) -> list[str]:
    """The dataset's figures under out_dir/figures: accuracy bars, and accuracy against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = result["config"]["dataset"]
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    names = []
    for name, draw in ((f"figures/{ds}_accuracy.png", accuracy_bars),
                       (f"figures/{ds}_params_vs_accuracy.png", accuracy_vs_parameters)):
        fig = draw(result, plt)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            names.append(name)
    return names


def accuracy_bars(result: dict, plt):
    """A panel per corruption, a labelled bar per purifier (table order, top down) with its 95%
    interval; the dashed line is the bare classifier's accuracy."""
    corrs = list(dict.fromkeys(c["corruption"] for c in result["cells"]))
    purs = list(dict.fromkeys(c["purifier"] for c in result["cells"]))
    lookup = cell_index(result)
    fig, axes = plt.subplots(1, len(corrs), sharey=True, squeeze=False,
                             figsize=(2.2 + 2.6 * len(corrs), max(2.4, 0.9 + 0.24 * len(purs))))
    for ax, c in zip(axes[0], corrs):
        rows = [(i, lookup[(c, p)]) for i, p in enumerate(purs) if (c, p) in lookup]
        acc = [100 * cell["accuracy"] for _, cell in rows]
        errs = [[a - 100 * cell["ci95"][0] for a, (_, cell) in zip(acc, rows)],
                [100 * cell["ci95"][1] - a for a, (_, cell) in zip(acc, rows)]]
        ax.barh([i for i, _ in rows], acc, xerr=errs, color="tab:blue", ecolor="0.3", capsize=1.5)
        if (c, "none") in lookup:
            ax.axvline(100 * lookup[(c, "none")]["accuracy"], color="0.4", ls="--", lw=1)
        ax.set_xlim(0, 100)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel("accuracy (%)", fontsize=8)
    axes[0][0].set_yticks(range(len(purs)), purs, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{result['config']['dataset']}: accuracy by corruption and purifier (95% CI)", fontsize=10)
    return fig


def accuracy_vs_parameters(result: dict, plt):
    """Purified accuracy under the random noises against each checkpoint's parameters (None
    without noise columns or parametrised purifiers)."""
    lookup = cell_index(result)
    costs = [c for c in result["costs"] if c["parameters"] > 0 and "/" not in c["purifier"]]  # (log axis: no 0)
    noisy = [c for c in dict.fromkeys(c["corruption"] for c in result["cells"]) if c in ("gaussian", "salt_pepper")]
    if not (costs and noisy):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in noisy:
        pts = [(k["parameters"], 100 * lookup[(c, k["purifier"])]["accuracy"], k["purifier"])
               for k in costs if (c, k["purifier"]) in lookup]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=c)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("purifier parameters (log)")
    ax.set_ylabel("purified accuracy (%)")
    ax.set_title(f"{result['config']['dataset']}: accuracy vs parameters")
    ax.legend()
    return fig


def read_results(path: Path) -> list[dict]:
    """The results of a results.json (files written before the protocol named the no-corruption
    case "none" call it "clean")."""
    results = json.loads(Path(path).read_text())["results"]
    for r in results:
        for cell in r["cells"]:
            cell["corruption"] = "none" if cell["corruption"] == "clean" else cell["corruption"]
    return results


def add_rows(new: dict, old: dict) -> dict:
    """``new``'s rows added to ``old``'s (same dataset and settings but the purifiers): a purifier
    measured again is replaced; both commands are kept."""
    config = json.loads(json.dumps(new["config"]))  # (tuples as the stored lists)
    default = {f.name: f.default for f in fields(EvalConfig)}  # (settings added since old was made)
    differ = [k for k in config if k not in ("purifiers", "attack_cache")
              and config[k] != old["config"].get(k, default.get(k))]
    if differ:
        raise ValueError(f"--add-rows: the settings differ from the {new['config']['dataset']} results already "
                         f"there ({', '.join(differ)}); run the whole dataset again instead")
    purifiers = [p for p in old["config"]["purifiers"] if p not in new["config"]["purifiers"]]
    keep = lambda rows: [r for r in rows if r["purifier"] in purifiers]  # noqa: E731
    return {**new, "config": {**new["config"], "purifiers": purifiers + list(new["config"]["purifiers"])},
            "cells": keep(old["cells"]) + new["cells"], "costs": keep(old["costs"]) + new["costs"],
            "skipped": keep(old.get("skipped", [])) + new["skipped"],
            "missing": sorted(set(old.get("missing", [])) - set(new["config"]["purifiers"]) | set(new["missing"])),
            "command": f"{old['command']} ; {new['command']}", "date": f"{old['date']}; {new['date']}"}


def merge_results(results: list[dict], out_dir: Path, rows: bool = False) -> list[dict]:
    """The new results plus those of other datasets already in out_dir/results.json (each keeps
    the command and machine that made it), in dataset order; with ``rows``, a dataset's new
    purifier rows are added to its results there (:func:`add_rows`)."""
    path = out_dir / "results.json"
    old = read_results(path) if path.exists() else []
    if rows:
        before = {r["config"]["dataset"]: r for r in old}
        results = [add_rows(r, before[r["config"]["dataset"]]) if r["config"]["dataset"] in before else r
                   for r in results]
    fresh = {r["config"]["dataset"] for r in results}
    kept = [r for r in old if r["config"]["dataset"] not in fresh]
    order = {d: i for i, d in enumerate(DATASETS)}
    return sorted(kept + results, key=lambda r: order.get(r["config"]["dataset"], 99))


@contextlib.contextmanager
def results_lock(out_dir: Path):
    """One writer at a time: evaluations run side by side (row groups, datasets) merge into one results.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_results(results: list[dict], out_dir: Path, command: str, merge: bool = False, rows: bool = False) -> None:
    """Write the results to out_dir, merged with those already there (``merge``, ``rows``: :func:`merge_results`)."""
    with results_lock(out_dir):
        write_outputs(merge_results(results, out_dir, rows) if merge else results, out_dir, command)


def write_outputs(results: list[dict], out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for res in results:
        try:
            res["figures"] = figures(res, out_dir)
        except Exception as exc:  # a plot must never cost the hours of measurements behind it
            print(f"[{res['config']['dataset']}] figures not drawn: {exc!r}", file=sys.stderr)
            res["figures"] = []
    (out_dir / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "corruption", "threat_model", "purifier", "n", "seeds", "accuracy", "ci95_low",
                    "ci95_high", "worst_of_seeds", "psnr", "ssim", "seconds"])
        for res in results:
            for c in res["cells"]:
                w.writerow([c["dataset"], c["corruption"], c["threat_model"], c["purifier"], c["n"], c["seeds"],
                            f"{c['accuracy']:.4f}", f"{c['ci95'][0]:.4f}", f"{c['ci95'][1]:.4f}",
                            f"{c['worst_of_seeds']:.4f}", f"{c['psnr']:.2f}", f"{c['ssim']:.4f}",
                            f"{c.get('seconds', float('nan')):.2f}"])
    (out_dir / "results.md").write_text(markdown(results, command))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tendiff.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(p, EvalConfig)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--summarize", metavar="RESULTS_JSON",
                   help="print the README's summary table of an earlier run's results.json and exit")
    p.add_argument("--merge", action="store_true",
                   help="keep the other datasets' results already in --out (run datasets one at a time)")
    p.add_argument("--add-rows", action="store_true",
                   help="with --merge: add these purifiers' rows to the dataset's results already in --out "
                        "(the same settings otherwise)")
    p.add_argument("--record-metrics", action="store_true",
                   help="also write the purified accuracies into checkpoints/manifest.json")
    return p.parse_args(argv)


def record_metrics(result: dict) -> None:
    """Store each purifier's accuracies (and the classifier's clean accuracy) in the manifest."""
    ds = result["config"]["dataset"]
    by_purifier: dict[str, dict] = {}
    for c in result["cells"]:
        key = f"acc_{c['corruption']}_t{result['config']['t_star']}_{result['config']['method']}{result['config']['steps']}"
        by_purifier.setdefault(c["purifier"], {})[key] = round(c["accuracy"], 4)
    for name, metrics in by_purifier.items():
        if name == "none":
            metrics = {k.replace("acc_", "acc_unpurified_"): v for k, v in metrics.items()}
            metrics["n_eval"] = result["config"]["n"]
            metrics["n_eval_attacks"] = result["config"]["n_attack"]
            ckpt.set_metrics(ckpt.checkpoint_name(ds, "classifier"), metrics)
        elif "/" not in name and name not in CLASSICAL:
            ckpt.set_metrics(ckpt.checkpoint_name(ds, name), {**metrics, "n_eval": result["config"]["n"],
                                                              "n_eval_attacks": result["config"]["n_attack"]})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.summarize:
        print(summary_markdown(read_results(Path(args.summarize))))
        return
    if args.add_rows and not args.merge:  # (before any work)
        raise SystemExit("--add-rows needs --merge")
    command = "python -m tendiff.evaluate " + " ".join(shlex.quote(a) for a in argv)
    tune_allocator()
    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    results = []
    for ds in datasets:
        cfg = cli.from_args(EvalConfig, args, dataset=ds)
        try:
            result = Evaluation(cfg).run()
        except ckpt.CheckpointNotFoundError as exc:
            print(f"[{ds}] skipped: {exc}")
            continue
        result.update(command=command, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        results.append(result)
        if args.record_metrics:
            record_metrics(result)
    if not results:
        raise SystemExit("nothing was evaluated: no classifier checkpoint for the chosen dataset(s)")
    save_results(results, Path(args.out), command, args.merge, args.add_rows)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
