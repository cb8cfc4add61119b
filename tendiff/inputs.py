"""Inputs: any upload, array or drawing -> the tensor a dataset's models take.

:func:`prepare_image` turns a path, bytes, PIL image, array or tensor into a (1, C, H, W) tensor
in [0, 1] at exactly 8-bit levels: the dataset's size and colour mode, MNIST-like digits white on
black, drawings and photos centred and scaled like the dataset's images. Everything it refuses
raises ``ValueError`` with a message meant for the end user.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import IMAGE_SHAPE, check_dataset


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may be."""

    max_bytes: int = 10 * 2 ** 20
    max_side: int = 4096
    min_side: int = 8


@dataclass
class Prepared:
    tensor: torch.Tensor  # (1, C, H, W) in [0, 1], exactly 8-bit levels
    message: str
    inverted: bool = False


def _open_upload(source, limits: UploadLimits) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"upload {path.name!r} was not found")
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise ValueError(f"the upload is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB")
        source = path.read_bytes()
    if isinstance(source, (bytes, bytearray)):
        if len(source) > limits.max_bytes:
            raise ValueError(f"the upload is {len(source) / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB")
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


def prepare_image(image, dataset: str, limits: UploadLimits = UploadLimits()) -> Prepared:
    """Any upload -> the (1, C, H, W) tensor in [0, 1] that the dataset's models take.

    Refuses, with a message for the user: files that are not images, files over the size limit,
    images larger than ``max_side`` or smaller than ``min_side`` pixels on a side,
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
    img = _to_pil(image, limits)
    _check_upload(img, limits)
    source_mode = img.mode
    original = f"{img.width}x{img.height} {source_mode}"
    c, H, W = IMAGE_SHAPE[dataset]
    img, steps = _to_colour_mode(_opaque_8bit(img), c, source_mode)
    arr, inverted, fit_steps = _fit_to_dataset(img, dataset)
    tensor = torch.from_numpy(arr.copy()).float().div(255)
    tensor = tensor[None, None] if c == 1 else tensor.permute(2, 0, 1)[None]
    mode = "gray" if c == 1 else "RGB"
    steps += fit_steps
    message = f"Model input: {W}x{H} {mode}, from a {original} image" + (f"; {', '.join(steps)}." if steps else " (unchanged).")
    return Prepared(tensor.contiguous(), message, inverted)


def _to_pil(image, limits: UploadLimits) -> Image.Image:
    """A tensor ((1,) C, H, W), array or upload (path, bytes, PIL image) as a PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        image = image[0] if image.ndim == 4 else image
        image = np.moveaxis(image, 0, -1) if image.ndim == 3 and image.shape[0] in (1, 3) else image
    return _array_to_pil(image) if isinstance(image, np.ndarray) else _open_upload(image, limits)


def _check_upload(img: Image.Image, limits: UploadLimits) -> None:
    """Refuses animations, sizes outside the limits, 16-bit and damaged images; loads the pixels."""
    if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
        raise ValueError("animated images are not supported; upload a single still frame")
    w, h = img.size
    if max(w, h) > limits.max_side:
        raise ValueError(f"the image is {w}x{h} pixels; the limit is {limits.max_side} on a side")
    if min(w, h) < limits.min_side:
        raise ValueError(f"the image is {w}x{h} pixels, too small to be recognised; "
                         f"at least {limits.min_side} on a side is needed")
    if img.mode == "I" or img.mode.startswith("I;16"):
        raise ValueError(f"16-bit images (mode {img.mode}) are not supported; save the image with 8 bits per channel")
    try:
        img.load()
    except Exception as exc:
        raise ValueError(f"the image file is damaged or truncated ({type(exc).__name__})") from None


def _opaque_8bit(img: Image.Image) -> Image.Image:
    """Float images in [0, 1] as 8-bit gray, palettes as RGB(A); refuses transparent pixels."""
    if img.mode == "F":
        # A float image (e.g. a 32-bit TIFF written from an array): accepted when it holds
        # finite values in [0, 1], which _array_to_pil checks before rounding to 8 bits.
        img = _array_to_pil(np.asarray(img, dtype=np.float32))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        if img.convert("RGBA").getchannel("A").getextrema()[0] < 255:
            raise ValueError("the image has transparent pixels; flatten it onto a background and upload it again")
    return img


def _to_colour_mode(img: Image.Image, channels: int, source_mode: str) -> tuple[Image.Image, list[str]]:
    """The image in gray (1 channel) or RGB (3), with the step to say when it changed."""
    img = img.convert("L" if channels == 1 else "RGB")
    gray_source = source_mode in ("L", "1", "F")
    if img.mode == "L" and not gray_source:
        return img, [f"converted from {source_mode} to grayscale"]
    if img.mode == "RGB" and source_mode != "RGB":
        return img, [f"converted from {source_mode} to RGB" + (" (gray copied to 3 channels)" if gray_source else "")]
    return img, []


def _fit_to_dataset(img: Image.Image, dataset: str) -> tuple[np.ndarray, bool, list[str]]:
    """The pixels at the dataset's size, as uint8, whether they were inverted, and the steps taken:
    MNIST-like drawings and photos centred like the dataset's images, everything else cropped to the
    centre square and resized (gray images on a light background inverted)."""
    c, H, W = IMAGE_SHAPE[dataset]
    if dataset in CENTRING and not in_dataset_format(img, (W, H)):
        full = np.asarray(img, dtype=np.uint8)
        light = _light_background(full)
        centred = centre_like_dataset(255 - full if light else full, dataset)
        if centred is not None:  # the centring crops and scales the ink itself: no centre square, no resize
            return centred, light, ([INVERTED] if light else []) + [CENTRING[dataset].note]
    steps = []
    w, h = img.size
    if w != h:
        side = min(w, h)
        img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        steps.append("cropped to the centre square")
    if img.size != (W, H):
        factor = img.size[0] / W
        exact = factor == int(factor) and img.size[1] == H * int(factor)
        img = img.resize((W, H), Image.BOX if exact else Image.LANCZOS)
        steps.append(f"resized to {W}x{H}")
    arr = np.asarray(img, dtype=np.uint8)
    if c == 1 and _light_background(arr):
        return 255 - arr, True, steps + [INVERTED]
    return arr, False, steps


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to 8-bit levels: what is shown (a PNG) is exactly what is purified."""
    return (x.clamp(0, 1) * 255).round() / 255


def image_hash(x: torch.Tensor) -> str:
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
