"""Classical (training-free) purifiers, with the diffusion purifiers' interface.

``purify(name, x, **params)`` takes a batch (B, C, H, W) in [0, 1] (C = 1 or 3) and returns a
deterministic batch of the same shape, dtype and device in [0, 1]. The purifiers:

- ``median3``: 3x3 median filter per channel (scipy.ndimage).
- ``adaptive_median``: Hwang & Haddad's adaptive median filter for impulse noise: the window
  grows 3 -> 5 -> 7 until its median is not one of its extremes; only a pixel that is the
  window's min or max is replaced by that median (numpy/scipy, vectorised).
- ``gaussian_blur``: Gaussian blur (skimage.filters.gaussian).
- ``tv``: total-variation denoising (skimage.restoration.denoise_tv_chambolle).
- ``nlm``: non-local means (skimage.restoration.denoise_nl_means, fast mode).
- ``bm3d``: BM3D (the ``bm3d`` package; CBM3D ``bm3d_rgb`` for colour).
- ``tucker``: a Tucker tensor denoiser: similar patches grouped into a (p, p, K, C) tensor, its
  HOSVD core hard-thresholded, patches put back and overlaps averaged (tensorly).

Noise rule. ``estimate_noise(x)`` is, per image, the std of the residual x - median3x3(x)
(reflect padding), averaged over channels. On white Gaussian noise it is ~0.97 sigma, so it is
used as the noise std ``sigma`` directly. Every parameter follows from it by a fixed rule, set a
priori and not tuned on test images:

    gaussian_blur  blur std (pixels) = min(5 sigma, 2)  (sigma 0.2 -> 1 px)
    tv             weight = sigma
    nlm            sigma = sigma, h = 0.8 sigma         (skimage's recommendation, fast mode)
    bm3d           sigma_psd = sigma
    tucker         core threshold = 2.7 sigma           (BM3D's hard threshold)

Each parameter can also be passed explicitly (the same value for the whole batch).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

TAU = 2.7  # BM3D's hard-threshold factor, reused for the Tucker core


# ------------------------------------------------------------------- helpers
def _check(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be a (B, C, H, W) tensor with C = 1 or 3, got shape {tuple(np.shape(x))}")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError("images must be a finite floating-point tensor")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("images must be in [0, 1]")
    return x


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _to_torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.clip(a, 0, 1)).to(like.device, like.dtype)


def _per_image(x: torch.Tensor, fn, value) -> torch.Tensor:
    """Apply fn(img (H, W, C), value) to each image; value None -> the image's noise estimate."""
    values = estimate_noise(x).tolist() if value is None else [float(value)] * len(x)
    a = _to_numpy(x).transpose(0, 2, 3, 1)
    out = np.stack([fn(img, v) for img, v in zip(a, values)])
    if not np.isfinite(out).all():  # fail loudly rather than hand NaN to the classifier
        raise RuntimeError(f"classical purifier {fn.__qualname__} produced non-finite values")
    return _to_torch(out.transpose(0, 3, 1, 2), x)


def _channel_axis(img: np.ndarray):
    return None if img.shape[-1] == 1 else -1


def _squeeze(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.shape[-1] == 1 else img  # skimage and bm3d take gray as 2-D


def _unsqueeze(out: np.ndarray) -> np.ndarray:
    return out[..., None] if out.ndim == 2 else out


def estimate_noise(x: torch.Tensor) -> torch.Tensor:
    """Per-image noise std, shape (B,): std of x - median3x3(x) (reflect padding), mean over
    channels. Torch, in double, so that an attack can differentiate through it."""
    a = _check(x).double()
    windows = torch.nn.functional.pad(a, (1, 1, 1, 1), mode="reflect").unfold(2, 3, 1).unfold(3, 3, 1)
    residual = a - windows.flatten(-2).median(-1).values
    return residual.std(dim=(2, 3), correction=0).mean(1).to(x.dtype)


# ------------------------------------------------------------------- purifiers
def median3(x: torch.Tensor) -> torch.Tensor:
    """3x3 median filter per channel."""
    a = _to_numpy(_check(x))
    return _to_torch(ndimage.median_filter(a, size=(1, 1, 3, 3), mode="mirror"), x)


def adaptive_median(x: torch.Tensor, max_size: int = 7) -> torch.Tensor:
    """Adaptive median (Hwang & Haddad 1995), per channel: for each pixel, the first window
    (3, 5, ..., max_size) whose median is strictly between its min and max is used; the pixel is
    replaced by that median only if it is the window's min or max (an impulse). Where no window
    qualifies, the largest one is used (Gonzalez & Woods' variant: isolated impulses in flat
    regions are removed instead of kept)."""
    a = _to_numpy(_check(x))
    out, settled = a.copy(), np.zeros(a.shape, bool)
    for s in range(3, int(max_size) + 1, 2):
        size = (1, 1, s, s)
        lo = ndimage.minimum_filter(a, size=size, mode="mirror")
        hi = ndimage.maximum_filter(a, size=size, mode="mirror")
        med = ndimage.median_filter(a, size=size, mode="mirror")
        use = ~settled & (((lo < med) & (med < hi)) | (s + 2 > max_size))  # last window: take it
        out = np.where(use & ((a <= lo) | (a >= hi)), med, out)
        settled |= use
    return _to_torch(out, x)


def gaussian_blur(x: torch.Tensor, blur_sigma: float | None = None) -> torch.Tensor:
    """Gaussian blur of std blur_sigma pixels; default min(5 sigma, 2) from the noise estimate."""
    from skimage.filters import gaussian

    def blur(img, s):
        s = min(5 * s, 2.0) if blur_sigma is None else s
        if s <= 0:
            return img
        return _unsqueeze(gaussian(_squeeze(img), sigma=s, mode="reflect", channel_axis=_channel_axis(img),
                                   preserve_range=True))

    return _per_image(_check(x), blur, blur_sigma)


def tv(x: torch.Tensor, weight: float | None = None) -> torch.Tensor:
    """Chambolle total-variation denoising; weight defaults to the noise estimate sigma."""
    from skimage.restoration import denoise_tv_chambolle

    def run(img, w):
        if w <= 0:
            return img  # no regularisation (and skimage divides by the weight)
        return _unsqueeze(denoise_tv_chambolle(_squeeze(img), weight=w, channel_axis=_channel_axis(img)))

    return _per_image(_check(x), run, weight)


def nlm(x: torch.Tensor, h: float | None = None, sigma: float | None = None,
        patch_size: int = 5, patch_distance: int = 6) -> torch.Tensor:
    """Non-local means (fast mode); sigma defaults to the noise estimate, h to 0.8 sigma.
    5x5 patches searched within 13x13: the images are only 28-32 pixels wide."""
    from skimage.restoration import denoise_nl_means

    def run(img, s):
        hh = 0.8 * s if h is None else float(h)
        if hh <= 0:
            return img  # a zero filtering strength keeps the image
        out = denoise_nl_means(_squeeze(img), h=hh, sigma=s, fast_mode=True, patch_size=patch_size,
                               patch_distance=patch_distance, channel_axis=_channel_axis(img))
        return _unsqueeze(out)

    return _per_image(_check(x), run, sigma)


def bm3d(x: torch.Tensor, sigma_psd: float | None = None) -> torch.Tensor:
    """BM3D (gray) or CBM3D (RGB); sigma_psd defaults to the noise estimate sigma."""
    _check(x)
    try:
        import bm3d as lib

        profile = lib.BM3DProfile()
    except Exception as err:  # checked at call time so the other purifiers work without it
        raise RuntimeError(f"the bm3d purifier needs the 'bm3d' package (pip install bm3d>=4.0): {err}") from err
    profile.num_threads = 1  # several threads sum in a varying order: outputs differ by ~1e-7

    def run(img, s):
        if s <= 0:
            return img  # nothing to remove (and BM3D needs a positive noise level)
        if img.shape[-1] == 1:
            return _unsqueeze(np.asarray(lib.bm3d(img[..., 0], sigma_psd=s, profile=profile)))
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.asarray(lib.bm3d_rgb(img, sigma_psd=s, profile=profile))
        if np.isfinite(out).all():
            return out
        # CBM3D scales each colour-opponent channel by its range: 0/0 on a gray (R = G = B) image
        return np.stack([lib.bm3d(img[..., ch], sigma_psd=s, profile=profile) for ch in range(3)], -1)

    return _per_image(x, run, sigma_psd)


def _grid(n: int, patch: int, stride: int) -> list[int]:
    """Reference-patch corners every `stride` pixels, the last one flush with the border."""
    last = n - patch
    return sorted(set(range(0, last + 1, stride)) | {last})


def _tucker_image(img: np.ndarray, sigma: float, tau: float, patch: int, stride: int, k: int,
                  window: int) -> np.ndarray:
    import tensorly as tl
    from tensorly.decomposition import tucker as tucker_decomposition

    h, w, c = img.shape
    # every patch at stride 1, flattened: (rows, cols, p*p*c)
    patches = np.lib.stride_tricks.sliding_window_view(img, (patch, patch), axis=(0, 1))
    rows, cols = patches.shape[:2]
    flat = patches.transpose(0, 1, 3, 4, 2).reshape(rows, cols, -1)
    acc, count = np.zeros_like(img), np.zeros((h, w, 1))
    for i in _grid(h, patch, stride):
        for j in _grid(w, patch, stride):
            # block matching: the k nearest patches (L2) within +-window pixels of the reference
            r0, c0 = max(0, i - window), max(0, j - window)
            cand = flat[r0:i + window + 1, c0:j + window + 1]
            dist = ((cand - flat[i, j]) ** 2).sum(-1).ravel()
            dist[(i - r0) * cand.shape[1] + (j - c0)] = -1  # the reference first, even among exact ties
            best = np.argsort(dist, kind="stable")[:k]
            ii, jj = np.unravel_index(best, cand.shape[:2])
            ii, jj = ii + r0, jj + c0
            group = flat[ii, jj].reshape(len(best), patch, patch, c).transpose(1, 2, 0, 3)  # (p, p, K, C)
            if group.any():  # an all-zero group (MNIST background) has nothing to denoise
                # full-rank Tucker = HOSVD: orthonormal factors, so the core's noise std is still sigma
                core, factors = tucker_decomposition(group, rank=list(group.shape), init="svd", n_iter_max=1)
                group = tl.tucker_to_tensor((np.where(np.abs(core) >= tau * sigma, core, 0.0), factors))
            est = group.transpose(2, 0, 1, 3)  # (K, p, p, C)
            for n in range(len(best)):
                acc[ii[n]:ii[n] + patch, jj[n]:jj[n] + patch] += est[n]
                count[ii[n]:ii[n] + patch, jj[n]:jj[n] + patch] += 1
    return acc / count  # every pixel lies in a reference patch, so count >= 1


def tucker(x: torch.Tensor, sigma: float | None = None, tau: float = TAU, patch: int = 6, stride: int = 3,
           k: int = 16, window: int = 6) -> torch.Tensor:
    """Tucker (HOSVD) group denoiser. For each reference patch (patch x patch, every `stride`
    pixels) the k most similar patches within +-window pixels form a (patch, patch, k, C)
    tensor; colour is a fourth mode, so RGB groups are matched on all channels and get their own
    colour basis (like BM3D's colour transform). The HOSVD core is hard-thresholded at
    tau * sigma (sigma defaults to the noise estimate), the group is rebuilt, and every patch is
    added back at its place; overlaps are averaged."""
    import tensorly as tl

    def run(img, s):
        if s <= 0:
            return img
        return _tucker_image(img, s, float(tau), int(patch), int(stride), int(k), int(window))

    with tl.backend_context("numpy"):  # the groups are numpy arrays, whatever the global backend
        return _per_image(_check(x), run, sigma)


CLASSICAL = {
    "median3": (median3, "3x3 median filter per channel"),
    "adaptive_median": (adaptive_median, "adaptive median (Hwang & Haddad), window 3 to 7, replaces impulses only"),
    "gaussian_blur": (gaussian_blur, "Gaussian blur, std min(5 sigma, 2) pixels"),
    "tv": (tv, "total-variation denoising (Chambolle), weight sigma"),
    "nlm": (nlm, "non-local means (fast), h = 0.8 sigma"),
    "bm3d": (bm3d, "BM3D / CBM3D, sigma_psd = sigma"),
    "tucker": (tucker, "Tucker (HOSVD) of similar-patch groups, core hard-thresholded at 2.7 sigma"),
}


def purify(name: str, x: torch.Tensor, **params) -> torch.Tensor:
    """Purify a batch in [0, 1] with the classical purifier `name` (see CLASSICAL)."""
    if name not in CLASSICAL:
        raise ValueError(f"unknown classical purifier {name!r}; choose one of {', '.join(CLASSICAL)}")
    return CLASSICAL[name][0](x, **params)


def available(name: str) -> bool:
    """Whether the classical purifier ``name`` can run here (BM3D needs the optional package)."""
    if name != "bm3d":
        return name in CLASSICAL
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True
