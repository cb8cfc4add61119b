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

import hashlib
import io
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import attacks
from .checks import check_float, check_int
from .checkpoints import CheckpointNotFoundError, checkpoint_name, load_model, manifest_path, read_manifest
from .classifiers import predict
from .data import CLASS_NAMES, DATASETS, IMAGE_SHAPE, check_dataset
from .diffusion import METHODS, GaussianDiffusion, purify
from .metrics import psnr, ssim
from .classical import CLASSICAL, available as classical_available, estimate_noise, purify as classical_purify
from .protocol import ADAPTIVE_T_STAR, CORRUPTIONS, DATASET_TITLES, PURIFIERS, T_STAR, corrupt, parse_model_label
from .tt import TTConv2d, count_parameters, tt_layers, tt_param_count, dense_param_count
from .unet import UNet, preset

APP_CORRUPTIONS = ("none", "gaussian", "salt_pepper", "pgd_linf", "adaptive")  # what the app offers
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
    max_upload_bytes: int = 10 * 2 ** 20
    max_upload_side: int = 4096
    min_upload_side: int = 8
    max_seed: int = 2 ** 31 - 1


def check_label(dataset: str, label: Any) -> int | None:
    """A true label as a class index (None: unknown). Accepts an index or a class name."""
    if label is None or label == "" or (isinstance(label, str) and label.startswith("unknown")):
        return None
    names = CLASS_NAMES[dataset]
    if isinstance(label, str) and label in names:
        return names.index(label)
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
        max_steps = limits.max_adaptive_steps if self.kind == "adaptive" else limits.max_attack_steps
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
                "adaptive": ("eps", "attack_steps", "eot", "surrogate_steps")}[self.kind]
        return (self.kind,) + tuple(getattr(self, k) for k in used)

    @property
    def threat(self) -> str:
        return CORRUPTIONS[self.kind].threat

    def cost(self) -> str:
        if self.kind == "pgd_linf":
            return f"{self.attack_steps} classifier forward/backward passes."
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

    def validated(self, num_timesteps: int, limits: Limits = Limits(), dataset: str | None = None) -> "PurifySpec":
        """This spec checked, with t* = ``T_STAR[dataset]`` where it was left None ("auto" stays:
        :meth:`Studio.resolve_t_star` fixes it once the input is known)."""
        if self.model not in CLASSICAL:
            parse_model_label(self.model)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        t_star = self.t_star
        if t_star is None:
            if dataset is None:
                raise ValueError("t* is None (the dataset's default) but no dataset was given")
            t_star = T_STAR[check_dataset(dataset)]
        if t_star != "auto":
            t_star = check_int("t*", t_star, 1, num_timesteps)
        max_steps = ADAPTIVE_T_STAR.t_min if t_star == "auto" else t_star
        steps = 1 if self.method == "one-step" else check_int(
            "number of reverse steps", self.steps, 1, min(limits.max_reverse_steps, max_steps))
        return replace(self, t_star=t_star, steps=steps, seed=check_int("seed", self.seed, 0, limits.max_seed))


# ------------------------------------------------------------------------------ images
@dataclass
class Prepared:
    tensor: torch.Tensor  # (1, C, H, W) in [0, 1], exactly 8-bit levels
    message: str
    inverted: bool = False


def _open_upload(source, limits: Limits) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"upload {path.name!r} was not found")
        size = path.stat().st_size
        if size > limits.max_upload_bytes:
            raise ValueError(f"the upload is {size / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:.0f} MB")
        source = path.read_bytes()
    if isinstance(source, (bytes, bytearray)):
        if len(source) > limits.max_upload_bytes:
            raise ValueError(f"the upload is {len(source) / 2**20:.1f} MB; the limit is {limits.max_upload_bytes / 2**20:.0f} MB")
        try:
            img = Image.open(io.BytesIO(source))
        except (UnidentifiedImageError, Image.DecompressionBombError):
            raise ValueError("the upload is not an image PIL can read (or is absurdly large); upload a PNG or JPEG") from None
        except Exception as exc:
            raise ValueError(f"the upload could not be read as an image ({type(exc).__name__})") from None
        return img
    if isinstance(source, Image.Image):
        return source
    raise ValueError(f"expected an image, got {type(source).__name__}")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.dtype == np.uint16 or arr.dtype == np.int32:
        raise ValueError("16-bit images are not supported; save the image with 8 bits per channel")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("the image holds NaN or infinite values; send finite values in [0, 1]")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"float image values must lie in [0, 1]; these span "
                             f"[{arr.min():.3g}, {arr.max():.3g}]")
        arr = np.round(arr * 255).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"unsupported image array type {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(arr, "RGB" if arr.shape[2] == 3 else "RGBA")
    raise ValueError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")


# How the MNIST-like datasets' images were made, for drawings and photos to look the same.
@dataclass(frozen=True)
class Centring:
    box: int  # the ink's longer side, in pixels of the 28x28 field
    by: str  # "mass": centre of mass at the field's centre (LeCun); "box": bounding box centred
    note: str  # what prepare_image's message says


CENTRING = {
    # LeCun et al.: the NIST digit, aspect kept, antialiased into a 20x20 box, then placed in 28x28
    # with its centre of mass at the centre.
    "mnist": Centring(20, "mass", "cropped to the ink, centred and scaled like MNIST digits (20 px box, centre "
                                  "of mass in the middle)"),
    # Xiao et al. (Zalando): the product trimmed, its longer edge resized to 28, centred; the bundled
    # examples fill the field the same way (a box of 28 on the longer side).
    "fashion_mnist": Centring(28, "box", "cropped to the ink, centred and scaled like Fashion-MNIST items "
                                         "(longer side 28 px)"),
}
INVERTED = "inverted (light background; these models expect a light object on black)"
EMPTY_DRAWING = "the drawing is empty: draw something first"
INK_LEVELS = 16  # below this many 8-bit levels above the background, an image holds no ink


def _light_background(arr: np.ndarray) -> bool:
    """Whether a gray image's border is light (a dark object on white: to be inverted)."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return float(border.mean()) > 127


def in_dataset_format(img: Image.Image, size: tuple[int, int]) -> bool:
    """The rule for "already a dataset image": exactly ``size``, or an exact nearest-neighbour
    enlargement of an image of that size (each k x k block holds one value)."""
    w, h = img.size
    if (w, h) == size:
        return True
    k = w // size[0]
    if k < 2 or (w, h) != (size[0] * k, size[1] * k):
        return False
    arr = np.asarray(img)
    blocks = arr.reshape(size[1], k, size[0], k, *arr.shape[2:])
    return bool((blocks == blocks[:, :1, :, :1]).all())


def centre_like_dataset(arr: np.ndarray, dataset: str, size: int = 28) -> np.ndarray | None:
    """A gray image, light ink on dark (any size), made like the dataset's images: the background
    level (the border's median) subtracted, the ink's bounding box cropped, scaled (aspect kept,
    antialiased) so that its longer side is ``CENTRING[dataset].box`` pixels and pasted into a
    ``size`` x ``size`` field, by its centre of mass (MNIST) or its box (Fashion-MNIST); the ink's
    brightest level becomes 255. Returns uint8 (size, size), or None when there is no ink."""
    rule = CENTRING[dataset]
    a = np.asarray(arr, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    a = np.clip(a - np.median(border), 0, None)
    peak = float(a.max())
    if peak < INK_LEVELS:
        return None
    ys, xs = np.nonzero(a > peak / 8)  # the ink's box (faint antialiasing and noise left out)
    crop = a[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] * (255.0 / peak)
    h, w = crop.shape
    scale = rule.box / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    patch = np.asarray(Image.fromarray(crop, "F").resize((nw, nh), Image.LANCZOS), dtype=np.float32)
    patch = np.clip(patch, 0, 255)
    if rule.by == "mass" and patch.sum() > 0:
        cy = float((patch.sum(1) * np.arange(nh)).sum() / patch.sum())
        cx = float((patch.sum(0) * np.arange(nw)).sum() / patch.sum())
        oy, ox = round(size / 2 - cy), round(size / 2 - cx)
    else:
        oy, ox = (size - nh) // 2, (size - nw) // 2
    oy, ox = min(max(oy, 0), size - nh), min(max(ox, 0), size - nw)  # the whole box stays in the field
    field = np.zeros((size, size), np.float32)
    field[oy: oy + nh, ox: ox + nw] = patch
    return np.round(field).astype(np.uint8)


def drawn_image(drawing) -> Image.Image:
    """A sketchpad's composite (array or PIL image, any mode; transparency counts as white paper)
    as a gray PIL image; refuses an empty drawing with a message."""
    if drawing is None:
        raise ValueError(EMPTY_DRAWING)
    img = drawing if isinstance(drawing, Image.Image) else _array_to_pil(np.asarray(drawing))
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        paper = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, img.convert("RGBA"))
    gray = img.convert("L")
    lo, hi = gray.getextrema()
    if hi - lo < INK_LEVELS:
        raise ValueError(EMPTY_DRAWING)
    return gray


def prepare_image(image, dataset: str, limits: Limits = Limits()) -> Prepared:
    """Any upload -> the (1, C, H, W) tensor in [0, 1] that the dataset's models take.

    Refuses, with a message for the user: files that are not images, files over the size limit,
    images larger than ``max_upload_side`` or smaller than ``min_upload_side`` pixels on a side,
    animations, 16-bit images, float images with values outside [0, 1] or NaN/inf, and images
    with transparent pixels. Accepts everything
    else: crops the centre square (when not square), resizes (box filter for exact integer
    factors, so an image enlarged with nearest-neighbour comes back exactly; Lanczos otherwise),
    converts to the dataset's colour mode, and for MNIST-like datasets (white digit on black)
    inverts a gray image whose border is light.

    For the MNIST-like datasets a drawing, photo or scan is also centred and scaled the way the
    dataset's images were made (:func:`centre_like_dataset`). The rule for "already in the
    dataset's format, leave it alone": a gray image that is exactly 28x28, or an exact
    nearest-neighbour enlargement of a 28x28 image (every k x k block one value: a bundled example
    or a saved model view, enlarged). Everything else with ink on it is centred; a blank image is not.
    """
    check_dataset(dataset)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        image = image[0] if image.ndim == 4 else image
        image = np.moveaxis(image, 0, -1) if image.ndim == 3 and image.shape[0] in (1, 3) else image
    img = _array_to_pil(image) if isinstance(image, np.ndarray) else _open_upload(image, limits)
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        raise ValueError("animated images are not supported; upload a single still frame")
    w, h = img.size
    if max(w, h) > limits.max_upload_side:
        raise ValueError(f"the image is {w}x{h} pixels; the limit is {limits.max_upload_side} on a side")
    if min(w, h) < limits.min_upload_side:
        raise ValueError(f"the image is {w}x{h} pixels, too small to be recognised; "
                         f"at least {limits.min_upload_side} on a side is needed")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I") or img.mode.startswith("I;16"):
        raise ValueError(f"16-bit images (mode {img.mode}) are not supported; save the image with 8 bits per channel")
    try:
        img.load()
    except Exception as exc:
        raise ValueError(f"the image file is damaged or truncated ({type(exc).__name__})") from None
    source_mode = img.mode
    if img.mode == "F":
        # A float image (e.g. a 32-bit TIFF written from an array): accepted when it holds
        # finite values in [0, 1], which _array_to_pil checks before rounding to 8 bits.
        img = _array_to_pil(np.asarray(img, dtype=np.float32))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ValueError("the image has transparent pixels; flatten it onto a background and upload it again")
    original = f"{w}x{h} {source_mode}"
    steps = []
    c, H, W = IMAGE_SHAPE[dataset]
    img = img.convert("L" if c == 1 else "RGB")
    if img.mode == "L" and source_mode not in ("L", "1", "F"):
        steps.append(f"converted from {source_mode} to grayscale")
    elif img.mode == "RGB" and source_mode != "RGB":
        steps.append(f"converted from {source_mode} to RGB" + (" (gray copied to 3 channels)" if source_mode in ("L", "1", "F") else ""))
    centred = None
    if dataset in CENTRING and not in_dataset_format(img, (W, H)):
        full = np.asarray(img, dtype=np.uint8)
        light = _light_background(full)
        centred = centre_like_dataset(255 - full if light else full, dataset)
    if centred is not None:  # the centring crops and scales the ink itself: no centre square, no resize
        arr, inverted = centred, light
        if inverted:
            steps.append(INVERTED)
        steps.append(CENTRING[dataset].note)
    else:
        if w != h:
            side = min(w, h)
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            steps.append("cropped to the centre square")
        if img.size != (W, H):
            factor = img.size[0] / W
            exact = factor == int(factor) and img.size[1] == H * int(factor)
            img = img.resize((W, H), Image.BOX if exact else Image.LANCZOS)
            steps.append(f"resized to {W}x{H}")
        inverted = False
        arr = np.asarray(img, dtype=np.uint8)
        if c == 1 and _light_background(arr):
            arr = 255 - arr
            inverted = True
            steps.append(INVERTED)
    tensor = torch.from_numpy(arr.copy()).float().div(255)
    tensor = tensor[None, None] if c == 1 else tensor.permute(2, 0, 1)[None]
    mode = "gray" if c == 1 else "RGB"
    message = f"Model input: {W}x{H} {mode}, from a {original} image" + (f"; {', '.join(steps)}." if steps else " (unchanged).")
    return Prepared(tensor.contiguous(), message, inverted)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: what is shown (a PNG) is exactly what is purified."""
    return (x.clamp(0, 1) * 255).round() / 255


def image_hash(x: torch.Tensor) -> str:
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


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
        "purifier": {"model": spec.model, "method": spec.method, "steps": spec.steps},
        "seed": spec.seed,
        "t_star": spec.t_star,
        "t_star_requested": t_requested,
        "adaptive_t_star": t_requested == "auto",
        "t_star_note": result.t_star_note,
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
                model: str = DEFAULT_MODEL, t_star: int | None = None) -> Corrupted:
        """Apply a corruption (validated first); attacks push away from y (default: the prediction).

        ``model`` and ``t_star`` (default: the dataset's) matter only to the adaptive attack, which
        differentiates through that purifier diffused to that t*.
        """
        check_dataset(dataset)
        spec = params if isinstance(params, CorruptionSpec) else CorruptionSpec.from_params(kind, params)
        spec = replace(spec, kind=kind).validated(self.limits)
        seed = check_int("seed", seed, 0, self.limits.max_seed)
        if spec.kind == "adaptive":
            if model in CLASSICAL:
                raise ValueError("the adaptive attack differentiates through a diffusion purifier; pick one, or "
                                 "attack the classifier (PGD L-inf)")
            parse_model_label(model)
            # An adaptive t* is attacked through the dataset's fixed t* (the surrogate's depth).
            t_star = T_STAR[dataset] if t_star in (None, "auto") else t_star
            t_star = check_int("t*", t_star, 1, self.num_timesteps)
        key = ("corrupt", dataset, image_hash(x), y, spec.key(), seed,
               (model, t_star, self._sha(checkpoint_name(dataset, model))) if spec.kind == "adaptive" else None,
               self._sha(checkpoint_name(dataset, "classifier")) if spec.kind in ("pgd_linf", "adaptive") else None)
        value, _ = self._cached(key, lambda: self._corrupt(dataset, spec, x, y, seed, model, t_star))
        return value

    def _corrupt(self, dataset, spec, x, y, seed, model, t_star) -> Corrupted:
        start = time.perf_counter()
        label_used = y
        if spec.kind == "none" or CORRUPTIONS[spec.kind].random:
            out = corrupt(spec.kind, x, {"gaussian": spec.sigma, "salt_pepper": spec.p}.get(spec.kind), seed)
        else:
            classifier = self.classifier(dataset)
            if label_used is None:
                label_used = int(self.probs(dataset, x).argmax())
            yt = torch.tensor([label_used])
            if spec.kind == "pgd_linf":
                out = attacks.pgd_linf(classifier, x, yt, spec.eps, steps=spec.attack_steps, seed=seed)
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
            out = classical_purify(spec.model, x)
            yield frame(0, 0, 0, out, out)
            return
        spec = self.resolve_t_star(spec, x)[0]
        model = purifier if purifier is not None else self.purifier(dataset, spec.model)
        label = None if guide_label is None else torch.tensor([int(guide_label)])
        for step in purify(model, self.diffusion, x, spec.t_star, num_steps=spec.steps, method=spec.method,
                           seed=spec.seed, label=label, guidance_scale=guidance_scale):
            yield frame(step.index, step.num_steps, step.t, step.x_t, step.pred_x0)

    def resolve_t_star(self, spec: PurifySpec, x: torch.Tensor) -> tuple[PurifySpec, str]:
        """A spec with t* = "auto" made concrete for input x (:mod:`tendiff.adaptive`), with the
        rule's explanation; any other spec unchanged."""
        if spec.t_star != "auto":
            return spec, ""
        t = int(ADAPTIVE_T_STAR.choose(x, self.diffusion)[0])
        note = ADAPTIVE_T_STAR.describe(float(estimate_noise(x)[0]), t, self.diffusion)
        return replace(spec, t_star=t, steps=min(spec.steps, t)), note

    # ------------------------------------------------------------ whole runs
    def run_key(self, dataset, x, y, corruption: CorruptionSpec, spec: PurifySpec) -> tuple:
        # The checkpoints' hashes are part of the key: a retrained model never replays old results.
        shas = (self._sha(checkpoint_name(dataset, "classifier")), self._sha(checkpoint_name(dataset, spec.model)))
        return ("run", dataset, image_hash(x), y, corruption.key(), spec.model, spec.t_star, spec.steps,
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
                                          f"({checkpoint_name(dataset, spec.model)} is missing)")
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
        corrupted = self.corrupt(dataset, corruption.kind, x, y, corruption, spec.seed, spec.model, spec.t_star)
        probs_clean = self.probs(dataset, x)
        tracked = y if y is not None else int(probs_clean.argmax())
        spec, note = self.resolve_t_star(spec, corrupted.tensor)
        frames = []
        for frame in self.purify_stream(dataset, corrupted.tensor, spec, clean=x, track_label=tracked):
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

    def compare(self, dataset: str, x: torch.Tensor, y=None, corruption: CorruptionSpec = CorruptionSpec(),
                spec: PurifySpec = PurifySpec(), models: Sequence[str] | None = None) -> Iterator[list[CompareRow]]:
        """The same input, corruption and seed through each purifier (default: every available
        one, diffusion then classical); yields the growing table.

        Adaptive corruptions are computed once, against ``spec.model``, and shared by every row.
        """
        y, corruption, spec = self.validate_request(dataset, y, corruption, spec)
        available = self.available_purifiers(dataset)
        for m in models or ():
            if m not in CLASSICAL:
                parse_model_label(m)
        corrupted = self.corrupt(dataset, corruption.kind, x, y, corruption, spec.seed, spec.model, spec.t_star)
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
        return CompareRow(spec.model, True, last.x_t, name, conf, float(p[tracked]), params,
                          dense_params / params if params else float("nan"), time.perf_counter() - start)

    # ------------------------------------------------------------------ learn
    def tt_layer_names(self, dataset: str, model: str) -> list[str]:
        return [name for name, _ in tt_layers(self.purifier(dataset, model))]

    def layer_view(self, dataset: str, model: str, layer: str | None = None) -> dict:
        """Cores of one TT layer, the kernel they rebuild, and the dense model's kernel there."""
        layout, rank = parse_model_label(model)
        if layout == "dense":
            raise ValueError("pick a TT model (tt, ttm or authors layout) to see its cores")
        net = self.purifier(dataset, model)
        layers = dict(tt_layers(net))
        layer = layer or next(iter(layers))
        if layer not in layers:
            raise ValueError(f"{model} has no TT layer {layer!r}; it has {', '.join(layers)}")
        tt: TTConv2d = layers[layer]
        with torch.no_grad():
            rebuilt = tt.full_kernel().float()
        dense_kernel, rel_error = None, None
        try:
            dense = dict(self.purifier(dataset, "dense").named_modules())[layer]
            dense_kernel = dense.weight.detach().float()
            rel_error = float((rebuilt - dense_kernel).norm() / dense_kernel.norm())
        except (CheckpointNotFoundError, KeyError, AttributeError):
            pass
        kh, kw = tt.kernel_size
        return {
            "layer": layer, "layout": tt.layout, "ranks": tt.ranks,
            "shape": (tt.out_channels, tt.in_channels, kh, kw),
            "cores": [c.detach().float() for c in tt.cores],
            "rebuilt": rebuilt, "dense": dense_kernel, "relative_error": rel_error,
            "tt_parameters": tt_param_count(tt.in_channels, tt.out_channels, (kh, kw), tt.ranks, tt.layout, bias=False),
            "dense_parameters": dense_param_count(tt.in_channels, tt.out_channels, (kh, kw), bias=False),
        }

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


def parameter_table(dataset: str, ranks: Sequence[int] = range(1, 9)) -> list[dict]:
    """Whole-U-Net parameter counts for dense and the ``tt``, ``ttm`` and authors' layouts."""
    check_dataset(dataset)
    dense = count_parameters(UNet(preset(dataset)))
    rows = []
    for r in ranks:
        tt = count_parameters(UNet(preset(dataset, conv="tt", rank=r)))
        ttm = count_parameters(UNet(preset(dataset, conv="ttm", rank=r)))
        au = count_parameters(UNet(preset(dataset, conv="authors", rank=r)))
        rows.append({"rank": r, "dense": dense, "tt": tt, "ttm": ttm, "authors": au})
    return rows
