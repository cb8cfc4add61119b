"""The purification pipeline behind the Studio app, free of any UI.

One :class:`Studio` object loads and caches (thread-safely) the classifier and the purifiers of
each dataset from the committed checkpoints (:func:`tendiff.checkpoints.load_model`, local first,
then the Hub), and runs the three stages of a demo request:

1. :func:`prepare_image` turns any upload (path, bytes, PIL image, array) into the tensor the
   models see: the dataset's size and colour mode, in [0, 1], MNIST-like digits white on black,
   drawings and photos centred and scaled like the dataset's images;
2. :meth:`Studio.corrupt` applies a corruption or an attack (:mod:`tendiff.attacks`);
3. :meth:`Studio.purify_stream` streams the reverse diffusion (:func:`tendiff.diffusion.purify`),
   one :class:`Frame` per step with the classifier's view of each step.

Every parameter is validated by :class:`CorruptionSpec` / :class:`PurifySpec` *before* any work
starts, against server-side :class:`Limits`; a bad value raises ``ValueError`` with a message
meant for the end user. Whole runs are cached on every input (image bytes, label, corruption,
model, t*, steps, method, seed), so a repeated request replays instantly.
"""
from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import torch

from . import attacks, familiar
from .checks import check_float, check_int
from .checkpoints import (CheckpointNotFoundError, checkpoint_dir, checkpoint_name, load_model, manifest_path,
                          read_manifest)
from .classifiers import predict
from .data import CLASS_NAMES, DATASETS, check_dataset
from .inputs import UploadLimits, image_hash, quantize
from .batching import Batcher
from .defense import vote
from .diffusion import METHODS, GaussianDiffusion, purify, purify_batch
from .metrics import psnr, ssim
from .classical import CLASSICAL, available as classical_available, estimate_noise, purify as classical_purify
from .protocol import ADAPTIVE_T_STAR, CORRUPTIONS, DATASET_TITLES, PURIFIERS, T_STAR, corrupt, parse_model_label
from .tt import count_parameters
from .unet import UNet, preset

APP_CORRUPTIONS = ("none", "gaussian", "salt_pepper", "pgd_linf", "adaptive", "exact")  # what the app offers
THROUGH_PURIFIER = ("adaptive", "exact")  # attacks that differentiate through the chosen purifier
DEFAULT_MODEL = "tt-r2"
DEFAULT_T_STAR = T_STAR["mnist"]  # the app's first dataset's
DEFAULT_STEPS = 10
DEFAULT_METHOD = "ddim"


# ----------------------------------------------------------------- limits and validation
@dataclass(frozen=True)
class Limits:
    """Server-side limits: what one request may cost."""

    max_reverse_steps: int = 100
    max_attack_steps: int = 40  # PGD iterations against the bare classifier
    max_adaptive_steps: int = 10  # PGD iterations of the adaptive attack
    max_eot: int = 4
    max_surrogate_steps: int = 4
    max_runs: int = 16  # purifications of one input for its spread (one batch)
    upload: UploadLimits = UploadLimits()
    max_seed: int = 2 ** 31 - 1


def check_label(dataset: str, label: Any) -> int | None:
    """A true label as a class index (None: unknown). Accepts an index or a class name."""
    if label is None or label == "" or (isinstance(label, str) and label.startswith("unknown")):
        return None
    names = CLASS_NAMES[check_dataset(dataset)]
    if isinstance(label, str):  # a name only: "7" must not silently mean CIFAR-10's class 7
        if label in names:
            return names.index(label)
        raise ValueError(f"true label {label!r} is not a {DATASET_TITLES[dataset]} class; use one of "
                         f"{', '.join(names)}, or 'unknown'")
    return check_int("true label", label, 0, len(names) - 1)


@dataclass(frozen=True)
class CorruptionSpec:
    kind: str = "gaussian"
    sigma: float = 0.2
    p: float = 0.2
    eps: float = 0.2
    attack_steps: int = 10
    eot: int = 2
    surrogate_steps: int = 2

    def validated(self, limits: Limits = Limits()) -> "CorruptionSpec":
        if self.kind not in APP_CORRUPTIONS:
            raise ValueError(f"unknown corruption {self.kind!r}; choose one of {', '.join(APP_CORRUPTIONS)}")
        max_steps = limits.max_adaptive_steps if self.kind in THROUGH_PURIFIER else limits.max_attack_steps
        return replace(
            self,
            sigma=check_float("sigma", self.sigma, 0.0, 1.0),
            p=check_float("p", self.p, 0.0, 1.0),
            eps=check_float("eps", self.eps, 0.0, 1.0),
            attack_steps=check_int("attack steps", self.attack_steps, 1, max_steps),
            eot=check_int("EOT samples", self.eot, 1, limits.max_eot),
            surrogate_steps=check_int("surrogate DDIM steps", self.surrogate_steps, 1, limits.max_surrogate_steps),
        )

    def key(self) -> tuple:
        """Only the parameters this kind uses (so an unused slider never misses the cache)."""
        used = {"none": (), "gaussian": ("sigma",), "salt_pepper": ("p",), "pgd_linf": ("eps", "attack_steps"),
                "adaptive": ("eps", "attack_steps", "eot", "surrogate_steps"),
                "exact": ("eps", "attack_steps", "eot")}[self.kind]
        return (self.kind,) + tuple(getattr(self, k) for k in used)

    @property
    def threat(self) -> str:
        return CORRUPTIONS[self.kind].threat

    def cost(self, purify_steps: int = 10) -> str:
        """What the attack costs; ``purify_steps``: the reverse steps the exact attack goes through."""
        if self.kind == "pgd_linf":
            return f"{self.attack_steps} classifier forward/backward passes."
        if self.kind == "exact":
            n = self.attack_steps * self.eot * purify_steps
            return (f"{self.attack_steps} PGD steps x {self.eot} EOT samples x {purify_steps} reverse steps of the "
                    f"purifier, exact gradients = {n} network forward/backward passes (with recomputation: about "
                    f"{4 * n} network calls; seconds to minutes on a CPU).")
        if self.kind == "adaptive":
            n = self.attack_steps * self.eot * (self.surrogate_steps + 1)
            return (f"{self.attack_steps} PGD steps x {self.eot} EOT samples x ({self.surrogate_steps} surrogate "
                    f"DDIM steps + classifier) = {n} purifier-and-classifier forward/backward passes "
                    "(seconds to minutes on a CPU).")
        return "negligible."

    @classmethod
    def from_params(cls, kind: str, params: Mapping[str, Any] | None = None) -> "CorruptionSpec":
        params = dict(params or {})
        allowed = {f for f in cls.__dataclass_fields__ if f != "kind"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(f"unknown corruption parameter(s) {sorted(unknown)}; expected some of {sorted(allowed)}")
        return cls(kind=kind, **params)


@dataclass(frozen=True)
class PurifySpec:
    model: str = DEFAULT_MODEL
    t_star: int | str | None = None  # None: the dataset's T_STAR; "auto": from the input (tendiff.adaptive)
    steps: int = DEFAULT_STEPS
    method: str = DEFAULT_METHOD
    seed: int = 0
    input_noise: float | None = None  # set with an "auto" t*: the input's own noise, counted toward t*'s
    prefilter: str | None = None  # a hybrid: this classical filter runs first (median3 for impulse noise)

    @property
    def label(self) -> str:
        """The purifier's name as the evaluation writes it: ``median3+dense`` for a hybrid."""
        return f"{self.prefilter}+{self.model}" if self.prefilter else self.model

    def validated(self, num_timesteps: int, limits: Limits = Limits(), dataset: str | None = None) -> "PurifySpec":
        """This spec checked, with t* = ``T_STAR[dataset]`` where it was left None ("auto" stays:
        :meth:`Studio.resolve_t_star` fixes it once the input is known)."""
        if self.model not in CLASSICAL:
            parse_model_label(self.model)
        if self.prefilter is not None and (self.prefilter not in CLASSICAL or not classical_available(self.prefilter)):
            raise ValueError(f"unknown classical step {self.prefilter!r}; choose one of "
                             f"{', '.join(n for n in CLASSICAL if classical_available(n))}, or none")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        t_star = self.t_star
        if t_star is None:
            if dataset is None:
                raise ValueError("t* is None (the dataset's default) but no dataset was given")
            t_star = T_STAR[check_dataset(dataset)]
        if t_star != "auto":
            t_star = check_int("t*", t_star, 1, num_timesteps)
        max_steps = limits.max_reverse_steps if t_star == "auto" else t_star  # (auto: at most t*, once chosen)
        steps = 1 if self.method == "one-step" else check_int(
            "number of reverse steps", self.steps, 1, min(limits.max_reverse_steps, max_steps))
        return replace(self, t_star=t_star, steps=steps, seed=check_int("seed", self.seed, 0, limits.max_seed))


# ---------------------------------------------------------------------------- results
@dataclass
class Corrupted:
    tensor: torch.Tensor  # (1, C, H, W) in [0, 1], 8-bit levels
    spec: CorruptionSpec
    label_used: int | None  # the label an attack pushed away from (true label, else the prediction)
    seconds: float

    @property
    def threat(self) -> str:
        return self.spec.threat


@dataclass
class Frame:
    """One streamed step of purification, with the classifier's view of it."""

    index: int
    num_steps: int
    t: int
    noise_std: float
    x_t: torch.Tensor
    pred_x0: torch.Tensor
    confidence: float  # the tracked class's probability for pred_x0
    distance: float  # RMSE between pred_x0 and the clean image, in [0, 1] pixel units
    seconds: float  # wall time since purification started

    @property
    def final(self) -> bool:
        return self.index == self.num_steps


@dataclass
class RunResult:
    dataset: str
    clean: torch.Tensor
    corrupted: Corrupted
    spec: PurifySpec
    frames: list[Frame]
    probs_clean: torch.Tensor
    probs_corrupted: torch.Tensor
    probs_purified: torch.Tensor
    tracked_label: int
    seconds: float
    t_star_note: str = ""  # how an adaptive t* was chosen

    @property
    def purified(self) -> torch.Tensor:
        return self.frames[-1].x_t


@dataclass
class Spread:
    """Several purifications of one corrupted input (fresh noise each): what one run cannot show."""
    model: str
    images: torch.Tensor  # (n, C, H, W) purified
    predictions: list[int]  # the class each purification was read as
    confidences: list[float]  # the tracked class's probability after each
    tracked: int  # the true label, or the clean input's predicted class when unknown
    vote: int  # the majority class (ties to the smaller index)
    vote_share: float
    seconds: float
    deterministic: bool = False  # a classical filter: every run is the same

    @property
    def n(self) -> int:
        return len(self.predictions)

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.confidences).mean())

    @property
    def std(self) -> float:
        return float(torch.tensor(self.confidences).std(unbiased=False))

    @property
    def agree(self) -> int:
        """How many runs ended on the tracked class."""
        return sum(p == self.tracked for p in self.predictions)


@dataclass
class CompareRow:
    model: str
    available: bool
    image: torch.Tensor | None = None
    prediction: str = ""
    confidence: float = float("nan")
    true_confidence: float = float("nan")
    parameters: int = 0
    compression: float = float("nan")
    seconds: float = float("nan")
    note: str = ""
    spread: Spread | None = None  # when the comparison ran several purifications per purifier


def topk(dataset: str, probs: torch.Tensor, k: int = 3) -> list[tuple[str, float]]:
    p = probs.flatten()
    vals, idx = p.topk(min(k, p.numel()))
    names = CLASS_NAMES[dataset]
    return [(names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]


def attack_measures(result: RunResult) -> dict:
    """The size of the corruption and what purification did, in pixel units (images in [0, 1]):
    the perturbation delta = corrupted - clean (L-inf, L2 over every pixel and channel), and PSNR
    (dB) and SSIM of the corrupted and the purified image against the clean one
    (:func:`tendiff.evaluate.psnr` / :func:`tendiff.evaluate.ssim`, the evaluation's own)."""
    clean, corrupted, purified = result.clean, result.corrupted.tensor, result.purified
    delta = (corrupted - clean).detach()
    return {"linf": float(delta.abs().max()), "l2": float(delta.flatten().norm()),
            "psnr_corrupted": float(psnr(corrupted, clean)[0]), "ssim_corrupted": float(ssim(corrupted, clean)[0]),
            "psnr_purified": float(psnr(purified, clean)[0]), "ssim_purified": float(ssim(purified, clean)[0])}


def _ranked(dataset: str, probs: torch.Tensor) -> list[dict]:
    return [{"class": name, "probability": round(p, 6)} for name, p in topk(dataset, probs, len(CLASS_NAMES[dataset]))]


def run_record(result: RunResult, requested: PurifySpec | None = None, true_label: int | None = None,
               measures: dict | None = None, checkpoints: Mapping[str, str | None] | None = None) -> dict:
    """Everything needed to read or repeat a run, as JSON-ready values: the settings (the
    requested t*, "auto" for an adaptive one, and the t* used), the seed, the predictions with
    every class's probability, the measures (:func:`attack_measures`) and the checkpoints' sha256."""
    names = CLASS_NAMES[result.dataset]
    spec = result.spec
    t_requested = requested.t_star if requested is not None else spec.t_star
    return {
        "dataset": result.dataset,
        "true_label": names[true_label] if true_label is not None else None,
        "tracked_label": names[result.tracked_label],
        "corruption": asdict(result.corrupted.spec) | {"threat_model": result.corrupted.threat},
        "purifier": {"model": spec.model, "method": spec.method, "steps": spec.steps, "classical_step_first": spec.prefilter},
        "seed": spec.seed,
        "t_star": spec.t_star,
        "t_star_requested": t_requested,
        "adaptive_t_star": t_requested == "auto",
        "t_star_note": result.t_star_note,
        "input_noise_counted": None if spec.input_noise is None else round(spec.input_noise, 6),
        "noise_std_at_t_star": None if spec.model in CLASSICAL else round(result.frames[0].noise_std, 6),
        "predictions": {"clean": _ranked(result.dataset, result.probs_clean),
                        "corrupted": _ranked(result.dataset, result.probs_corrupted),
                        "purified": _ranked(result.dataset, result.probs_purified)},
        "measures": {k: round(v, 6) for k, v in (measures if measures is not None else attack_measures(result)).items()},
        "seconds": round(result.seconds, 4),
        "checkpoints": dict(checkpoints or {}),
    }


# ------------------------------------------------------------------------------ studio
class Studio:
    """Loads, caches and runs the models of every dataset; safe to share between threads."""

    def __init__(self, limits: Limits = Limits(), cache_size: int = 64):
        self.limits = limits
        self.diffusion = GaussianDiffusion()
        self._models: dict[str, tuple[str | None, torch.nn.Module]] = {}
        self._load_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = cache_size
        self._manifest: tuple[int | None, dict] | None = None
        self.batcher = Batcher()  # purifications of concurrent requests run as one batch
        self._attack_lock = threading.Lock()  # attacks are heavy: one at a time

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    def noise_std(self, t: int) -> float:
        return self.diffusion.noise_std(t)

    # ----------------------------------------------------------------- models
    def manifest_entries(self) -> dict:
        """The manifest's checkpoints, re-read only when the file changes (every request asks)."""
        path = manifest_path()
        stamp = path.stat().st_mtime_ns if path.exists() else None
        if self._manifest is None or self._manifest[0] != stamp:
            self._manifest = (stamp, read_manifest()["checkpoints"])
        return self._manifest[1]

    def unfamiliar(self, dataset: str, x: torch.Tensor) -> str | None:
        """A warning when x (1, C, H, W) looks unlike the dataset's images (:mod:`tendiff.familiar`);
        None when it looks like them, or no reference was measured with the committed dense purifier."""
        name = checkpoint_name(check_dataset(dataset), "dense")
        sha = self.manifest_entries().get(name, {}).get("sha256")
        reference = familiar.read_reference(checkpoint_dir() / familiar.REFERENCE).get(dataset)
        if sha is None or reference is None or reference.get("sha256") != sha:
            return None
        value, _ = self._cached(("familiar", dataset, image_hash(x)),
                                lambda: float(familiar.score(self.purifier(dataset, "dense"), self.diffusion, x)[0]))
        return familiar.verdict(value, reference, sha)

    def available_models(self, dataset: str) -> list[str]:
        """Diffusion purifier labels whose checkpoint the manifest lists, in display order."""
        check_dataset(dataset)
        listed = self.manifest_entries()
        return [m for m in PURIFIERS if checkpoint_name(dataset, m) in listed]

    def available_purifiers(self, dataset: str) -> list[str]:
        """Every purifier a run can use: the trained diffusion ones, then the classical ones."""
        return self.available_models(dataset) + [name for name in CLASSICAL if classical_available(name)]

    def has_classifier(self, dataset: str) -> bool:
        return checkpoint_name(check_dataset(dataset), "classifier") in self.manifest_entries()

    def status(self, dataset: str) -> str:
        """One line for the UI: what is trained for this dataset."""
        title = DATASET_TITLES[check_dataset(dataset)]
        models = self.available_models(dataset)
        if not self.has_classifier(dataset) or not models:
            missing = "classifier and purifiers" if not self.has_classifier(dataset) and not models else (
                "classifier" if not self.has_classifier(dataset) else "purifiers")
            ready = [DATASET_TITLES[d] for d in DATASETS
                     if d != dataset and self.has_classifier(d) and self.available_models(d)]
            return (f"{title}: the {missing} are not trained yet, so this dataset can only be browsed (examples "
                    "and uploads work; corrupting and purifying need the checkpoints). "
                    + (f"Ready to run: {', '.join(ready)}." if ready else "No dataset is trained yet."))
        return f"{title}: classifier and purifiers {', '.join(models)} ready."

    def _sha(self, name: str) -> str | None:
        return self.manifest_entries().get(name, {}).get("sha256")

    def _load(self, name: str) -> torch.nn.Module:
        """The model of checkpoint ``name``, loaded once; reloaded when the manifest's hash changes
        (a checkpoint retrained while the app runs)."""
        sha = self._sha(name)
        with self._load_lock:
            cached = self._models.get(name)
            if cached is None or cached[0] != sha:
                try:
                    model = load_model(name)
                except CheckpointNotFoundError as exc:
                    raise CheckpointNotFoundError(f"not trained yet: {exc}") from None
                model.requires_grad_(False).eval()
                cached = self._models[name] = (sha, model)
            return cached[1]

    def classifier(self, dataset: str) -> torch.nn.Module:
        return self._load(checkpoint_name(check_dataset(dataset), "classifier"))

    def purifier(self, dataset: str, model: str) -> torch.nn.Module:
        if not model.endswith("-cond"):
            parse_model_label(model)  # refuses unknown labels and ranks before any loading
        return self._load(checkpoint_name(check_dataset(dataset), model))

    def model_parameters(self, dataset: str, model: str) -> int:
        entry = self.manifest_entries().get(checkpoint_name(dataset, model))
        if entry and "parameters" in entry:
            return int(entry["parameters"])
        return count_parameters(self.purifier(dataset, model))

    def dense_parameters(self, dataset: str) -> int:
        entry = self.manifest_entries().get(checkpoint_name(dataset, "dense"))
        if entry and "parameters" in entry:
            return int(entry["parameters"])
        return count_parameters(UNet(preset(dataset)))

    # ------------------------------------------------------------- inference
    def probs(self, dataset: str, x: torch.Tensor) -> torch.Tensor:
        return predict(self.classifier(dataset), x)

    def predict_topk(self, dataset: str, x: torch.Tensor, k: int = 3) -> list[tuple[str, float]]:
        return topk(dataset, self.probs(dataset, x)[0], k)

    def clear_cache(self) -> None:
        """Forget every cached run (models stay loaded): the next request computes afresh."""
        with self._cache_lock:
            self._cache.clear()

    def _cached(self, key: tuple, compute):
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], True
        value = compute()
        with self._cache_lock:
            self._cache[key] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value, False

    def corrupt(self, dataset: str, kind: str, x: torch.Tensor, y: int | None = None,
                params: Mapping[str, Any] | CorruptionSpec | None = None, seed: int = 0,
                model: str = DEFAULT_MODEL, t_star: int | None = None, steps: int = DEFAULT_STEPS,
                method: str = DEFAULT_METHOD, prefilter: str | None = None) -> Corrupted:
        """Apply a corruption (validated first); attacks push away from y (default: the prediction).

        ``model`` and ``t_star`` (default: the dataset's) matter only to the attacks through the
        purifier: the adaptive one differentiates through a few-step DDIM surrogate of that purifier
        diffused to that t*, the exact one through its real ``steps`` of ``method`` (and through a
        hybrid's classical ``prefilter`` by BPDA).
        """
        check_dataset(dataset)
        spec = params if isinstance(params, CorruptionSpec) else CorruptionSpec.from_params(kind, params)
        spec = replace(spec, kind=kind).validated(self.limits)
        seed = check_int("seed", seed, 0, self.limits.max_seed)
        if spec.kind in THROUGH_PURIFIER:
            if model in CLASSICAL:
                raise ValueError("this attack differentiates through a diffusion purifier; pick one, or attack the "
                                 "classifier (PGD L-inf)")
            parse_model_label(model)
            if prefilter is not None and spec.kind == "adaptive":
                raise ValueError("the surrogate attack has no classical step; the exact attack goes through it "
                                 "(BPDA)")
            # An adaptive t* is attacked through the dataset's fixed t* (the surrogate's depth).
            t_star = T_STAR[dataset] if t_star in (None, "auto") else t_star
            t_star = check_int("t*", t_star, 1, self.num_timesteps)
            steps = PurifySpec(model, t_star, steps, method, seed).validated(self.num_timesteps, self.limits).steps
        through = (model, t_star, self._sha(checkpoint_name(dataset, model))) if spec.kind in THROUGH_PURIFIER else None
        key = ("corrupt", dataset, image_hash(x), y, spec.key(), seed,
               through + (steps, method, prefilter) if spec.kind == "exact" else through,
               self._sha(checkpoint_name(dataset, "classifier")) if not CORRUPTIONS[spec.kind].random else None)
        value, _ = self._cached(key, lambda: self._corrupt(dataset, spec, x, y, seed, model, t_star, steps, method,
                                                           prefilter))
        return value

    def corrupt_for(self, dataset: str, x: torch.Tensor, y, corruption: CorruptionSpec, spec: PurifySpec) -> Corrupted:
        """The corrupted input of a run: :meth:`corrupt` with the purification ``spec`` attacks go through."""
        return self.corrupt(dataset, corruption.kind, x, y, corruption, spec.seed, spec.model, spec.t_star, spec.steps,
                            spec.method, spec.prefilter)

    def _corrupt(self, dataset, spec, x, y, seed, model, t_star, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
                 prefilter=None) -> Corrupted:
        start = time.perf_counter()
        label_used = y
        if spec.kind == "none" or CORRUPTIONS[spec.kind].random:
            out = corrupt(spec.kind, x, {"gaussian": spec.sigma, "salt_pepper": spec.p}.get(spec.kind), seed)
        else:
            classifier = self.classifier(dataset)
            if label_used is None:
                label_used = int(self.probs(dataset, x).argmax())
            yt = torch.tensor([label_used])
            with self._attack_lock:  # (many requests run at once; attacks queue here, one per core's worth)
                if spec.kind == "pgd_linf":
                    out = attacks.pgd_linf(classifier, x, yt, spec.eps, steps=spec.attack_steps, seed=seed)
                elif spec.kind == "exact":
                    out = attacks.pgd_eot_exact(classifier, self.purifier(dataset, model), self.diffusion, x, yt,
                                                spec.eps, t_star, steps=spec.attack_steps, eot=spec.eot,
                                                num_steps=steps, method=method, seed=seed,
                                                prefilter=prefilter and functools.partial(classical_purify, prefilter))
                else:
                    purifier = self.purifier(dataset, model)
                    out = attacks.pgd_eot_ddim_surrogate(
                        classifier, purifier, self.diffusion, x, yt, spec.eps, t_star, steps=spec.attack_steps,
                        eot=spec.eot, surrogate_steps=spec.surrogate_steps, seed=seed)
        return Corrupted(quantize(out), spec, label_used, time.perf_counter() - start)

    def purify_stream(self, dataset: str, x: torch.Tensor, spec: PurifySpec = PurifySpec(),
                      clean: torch.Tensor | None = None, track_label: int | None = None,
                      purifier: torch.nn.Module | None = None, guide_label: int | None = None,
                      guidance_scale: float = 0.0) -> Iterator[Frame]:
        """Purify x (1, C, H, W) and yield one :class:`Frame` per step (``steps + 1`` frames).

        ``track_label`` is the class whose confidence each frame reports (default: the
        classifier's prediction on ``clean``, else on x); ``clean`` is the reference for the
        distance (default: x). ``guide_label`` applies classifier-free guidance (needs a
        class-conditional ``purifier``).
        """
        check_dataset(dataset)
        spec = spec.validated(self.num_timesteps, self.limits, dataset)
        classifier = self.classifier(dataset)
        clean = x if clean is None else clean
        if track_label is None:
            track_label = int(self.probs(dataset, clean).argmax())
        start = time.perf_counter()

        def frame(index, num_steps, t, x_t, pred):
            pred = pred.clamp(0, 1)
            conf = float(predict(classifier, pred)[0, track_label])
            dist = float((pred - clean).pow(2).mean().sqrt())
            return Frame(index, num_steps, t, self.diffusion.noise_std(t), x_t.clamp(0, 1), pred, conf, dist,
                         time.perf_counter() - start)

        if spec.model in CLASSICAL:  # one filter pass: a single, final frame
            out = classical_purify(spec.model, self.prefiltered(spec, x))
            yield frame(0, 0, 0, out, out)
            return
        x = self.prefiltered(spec, x)
        spec = self.resolve_t_star(spec, x)[0]
        model = purifier if purifier is not None else self.purifier(dataset, spec.model)
        label = None if guide_label is None else torch.tensor([int(guide_label)])
        if label is None and purifier is None and len(x) == 1:  # concurrent requests share a batch
            key = (dataset, spec.model, spec.t_star, spec.steps, spec.method, spec.input_noise)
            steps = self.batcher.stream(key, x, [spec.seed], lambda images, seeds: purify(
                model, self.diffusion, images, spec.t_star, num_steps=spec.steps, method=spec.method, seed=seeds,
                input_noise=spec.input_noise))
        else:
            steps = purify(model, self.diffusion, x, spec.t_star, num_steps=spec.steps, method=spec.method,
                           seed=spec.seed, label=label, guidance_scale=guidance_scale, input_noise=spec.input_noise)
        for step in steps:
            yield frame(step.index, step.num_steps, step.t, step.x_t, step.pred_x0)

    @staticmethod
    def prefiltered(spec: PurifySpec, x: torch.Tensor) -> torch.Tensor:
        """x after the spec's classical step (a hybrid's first half); x itself when it has none."""
        return classical_purify(spec.prefilter, x) if spec.prefilter else x

    def resolve_t_star(self, spec: PurifySpec, x: torch.Tensor) -> tuple[PurifySpec, str]:
        """A spec with t* = "auto" made concrete for input x (a hybrid's: x after its classical step,
        :mod:`tendiff.adaptive`), with the rule's explanation; any other spec unchanged."""
        if spec.t_star != "auto":
            return spec, ""
        estimate = estimate_noise(x)
        t, sigma = int(ADAPTIVE_T_STAR.choose(x, self.diffusion, estimate)[0]), float(estimate[0])
        note = ADAPTIVE_T_STAR.describe(sigma, t, self.diffusion)
        if spec.steps > t:
            note += f" {t} reverse steps, not {spec.steps}: no more steps than t*."
        return replace(spec, t_star=t, steps=min(spec.steps, t), input_noise=sigma if ADAPTIVE_T_STAR.matched else None), note

    # ------------------------------------------------------------ whole runs
    def run_key(self, dataset, x, y, corruption: CorruptionSpec, spec: PurifySpec) -> tuple:
        # The checkpoints' hashes are part of the key: a retrained model never replays old results.
        shas = (self._sha(checkpoint_name(dataset, "classifier")), self._sha(checkpoint_name(dataset, spec.model)))
        return ("run", dataset, image_hash(x), y, corruption.key(), spec.label, spec.t_star, spec.steps,
                spec.method, spec.seed, shas)

    def validate_request(self, dataset: str, y, corruption: CorruptionSpec, spec: PurifySpec):
        """Every check of a run, before any work: returns (label index, corruption, spec)."""
        check_dataset(dataset)
        y = check_label(dataset, y)
        corruption = corruption.validated(self.limits)
        spec = spec.validated(self.num_timesteps, self.limits, dataset)
        if not self.has_classifier(dataset):
            raise CheckpointNotFoundError(f"{DATASET_TITLES[dataset]}: the classifier is not trained yet "
                                          f"({checkpoint_name(dataset, 'classifier')} is missing)")
        if spec.model not in self.available_purifiers(dataset):
            raise CheckpointNotFoundError(f"{DATASET_TITLES[dataset]}: the {spec.model} purifier is not trained yet "
                                          f"({checkpoint_name(dataset, spec.model)} is missing); its purifiers: "
                                          f"{', '.join(self.available_purifiers(dataset))}")
        return y, corruption, spec

    def run_stream(self, dataset: str, x: torch.Tensor, y=None, corruption: CorruptionSpec = CorruptionSpec(),
                   spec: PurifySpec = PurifySpec()) -> Iterator[tuple[Frame, RunResult | None, bool]]:
        """Corrupt then purify, yielding ``(frame, None, cached)`` per step and finally
        ``(last frame, RunResult, cached)``. A request seen before is replayed from the cache."""
        y, corruption, spec = self.validate_request(dataset, y, corruption, spec)
        key = self.run_key(dataset, x, y, corruption, spec)
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None:
            for frame in hit.frames[:-1]:
                yield frame, None, True
            yield hit.frames[-1], hit, True
            return
        start = time.perf_counter()
        corrupted = self.corrupt_for(dataset, x, y, corruption, spec)
        probs_clean = self.probs(dataset, x)
        tracked = y if y is not None else int(probs_clean.argmax())
        filtered = self.prefiltered(spec, corrupted.tensor)  # (once: the t* rule and the purifier both read it)
        spec, note = self.resolve_t_star(spec, filtered)
        frames = []
        for frame in self.purify_stream(dataset, filtered, replace(spec, prefilter=None), clean=x, track_label=tracked):
            frames.append(frame)
            if not frame.final:
                yield frame, None, False
        result = RunResult(dataset, x, corrupted, spec, frames, probs_clean[0], self.probs(dataset, corrupted.tensor)[0],
                           self.probs(dataset, frames[-1].x_t)[0], tracked, time.perf_counter() - start, note)
        self._cached(key, lambda: result)
        yield frames[-1], result, False

    def run(self, dataset: str, x: torch.Tensor, y=None, corruption: CorruptionSpec = CorruptionSpec(),
            spec: PurifySpec = PurifySpec()) -> RunResult:
        result = None
        for _, result, _ in self.run_stream(dataset, x, y, corruption, spec):
            pass
        return result

    def spread(self, dataset: str, x: torch.Tensor, y=None, corruption: CorruptionSpec = CorruptionSpec(),
               spec: PurifySpec = PurifySpec(), runs: int = 8) -> Spread:
        """Purify the corrupted input of this request ``runs`` times with fresh noise (one batch,
        seeded by ``spec.seed``): each run's prediction and tracked-class confidence, and the
        majority vote. The corrupted input is the same as the request's run (same seed)."""
        y, corruption, spec = self.validate_request(dataset, y, corruption, spec)
        runs = check_int("purification runs", runs, 1, self.limits.max_runs)
        key = ("spread", runs, self.run_key(dataset, x, y, corruption, spec))
        return self._cached(key, lambda: self._spread(dataset, x, y, corruption, spec, runs))[0]

    def _spread(self, dataset, x, y, corruption, spec, runs) -> Spread:
        start = time.perf_counter()
        corrupted = self.corrupt_for(dataset, x, y, corruption, spec)
        tracked = y if y is not None else int(self.probs(dataset, x).argmax())
        filtered = self.prefiltered(spec, corrupted.tensor)
        batch = filtered.expand(runs, -1, -1, -1).contiguous()
        if spec.model in CLASSICAL:
            purified = classical_purify(spec.model, batch)
        else:
            spec = self.resolve_t_star(spec, filtered)[0]
            with torch.inference_mode():
                purified = purify_batch(self.purifier(dataset, spec.model), self.diffusion, batch, spec.t_star,
                                        num_steps=spec.steps, method=spec.method, seed=spec.seed,
                                        input_noise=spec.input_noise)
        probs = self.probs(dataset, purified)
        predictions = probs.argmax(1)
        label, share = vote(predictions[:, None], probs.shape[1])
        return Spread(spec.label, purified, predictions.tolist(), probs[:, tracked].tolist(), tracked, int(label),
                      float(share), time.perf_counter() - start, spec.model in CLASSICAL)

    def compare(self, dataset: str, x: torch.Tensor, y=None, corruption: CorruptionSpec = CorruptionSpec(),
                spec: PurifySpec = PurifySpec(), models: Sequence[str] | None = None,
                runs: int = 1) -> Iterator[list[CompareRow]]:
        """The same input, corruption and seed through each purifier (default: every available
        one, diffusion then classical); yields the growing table. With ``runs`` > 1 each row also
        carries the :meth:`spread` of that many purifications.

        Adaptive corruptions are computed once, against ``spec.model``, and shared by every row.
        """
        y, corruption, spec = self.validate_request(dataset, y, corruption, spec)
        available = self.available_purifiers(dataset)
        for m in models or ():
            if m not in CLASSICAL:
                parse_model_label(m)
        corrupted = self.corrupt_for(dataset, x, y, corruption, spec)
        tracked = y if y is not None else int(self.probs(dataset, x).argmax())
        dense_params = self.dense_parameters(dataset)
        rows: list[CompareRow] = []
        for m in models or available:
            if m not in available:
                rows.append(CompareRow(m, False, note="not trained yet"))
                yield list(rows)
                continue
            mspec = replace(spec, model=m)
            key = ("compare", self.run_key(dataset, x, y, corruption, mspec))
            row, _ = self._cached(key, lambda: self._compare_row(dataset, corrupted.tensor, mspec, tracked, dense_params))
            if runs > 1:
                row = replace(row, spread=self.spread(dataset, x, y, corruption, mspec, runs))
            rows.append(row)
            yield list(rows)

    def _compare_row(self, dataset, x, spec: PurifySpec, tracked: int, dense_params: int) -> CompareRow:
        start = time.perf_counter()
        last = None
        for last in self.purify_stream(dataset, x, spec, track_label=tracked):
            pass
        p = self.probs(dataset, last.x_t)[0]
        name, conf = topk(dataset, p, 1)[0]
        params = 0 if spec.model in CLASSICAL else self.model_parameters(dataset, spec.model)
        return CompareRow(spec.label, True, last.x_t, name, conf, float(p[tracked]), params,
                          dense_params / params if params else float("nan"), time.perf_counter() - start)

    def guidance_lesson(self, dataset: str, x: torch.Tensor, true_label: int, wrong_label: int | None = None,
                        spec: PurifySpec = PurifySpec(model="dense"), guidance_scale: float = 3.0) -> dict:
        """Purify x with a class-conditional purifier: no label, the true label, a wrong label.

        Guiding with the true label leaks it into the defense (the prediction follows the
        label, whatever the input); with a wrong label the same mechanism turns the image into
        that class. Raises CheckpointNotFoundError when ``<dataset>_dense-cond`` is missing.
        """
        check_dataset(dataset)
        true_label = check_label(dataset, true_label)
        if true_label is None:
            raise ValueError("the guidance lesson needs the true label; pick an example or set the label")
        wrong_label = (true_label + 1) % 10 if wrong_label is None else check_label(dataset, wrong_label)
        scale = check_float("guidance scale", guidance_scale, 0.0, 20.0)
        spec = replace(spec, model="dense").validated(self.num_timesteps, self.limits, dataset)
        name = checkpoint_name(dataset, "dense-cond")
        if name not in self.manifest_entries():
            raise CheckpointNotFoundError(f"the class-conditional purifier {name} is not trained yet "
                                          f"(python -m tendiff.train purifier --dataset {dataset} --conditional)")
        cond = self._load(name)
        out = {}
        for key, label in (("no label", None), (f"true label {CLASS_NAMES[dataset][true_label]}", true_label),
                           (f"wrong label {CLASS_NAMES[dataset][wrong_label]}", wrong_label)):
            last = None
            for last in self.purify_stream(dataset, x, spec, track_label=true_label, purifier=cond,
                                           guide_label=label, guidance_scale=scale if label is not None else 0.0):
                pass
            out[key] = (last.x_t, self.predict_topk(dataset, last.x_t, 3))
        return out

