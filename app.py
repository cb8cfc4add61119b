"""TendiffPure Studio: diffusion purification with tensor-train U-Nets, as a Gradio app.

    python app.py                      # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT)

The same file runs as a Hugging Face Space (``demo`` is defined at module level). Checkpoints
are resolved local-first (``checkpoints/``), then from the Hub (see tendiff.checkpoints). This
file only wires the UI; everything it computes comes from :mod:`tendiff.pipeline`.

Every main action is a named endpoint, usable from Python with ``gradio_client``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    img = handle_file("assets/mnist_7_0.png")
    # what the model sees: (image, message)
    seen, message = client.predict("mnist", img, api_name="/prepare")
    # corrupt: (corrupted image, clean top-3, corrupted top-3, threat model line)
    corrupted, clean, attacked, threat = client.predict(
        "mnist", img, "7", "pgd_linf", 0.3, 0.1, 0.2, 10, 1, 2, 0, "tt-r2", 100, api_name="/corrupt")
    # purify (streams one output per reverse step; .outputs() keeps every one)
    job = client.submit("mnist", img, "7", "gaussian", 0.3, 0.1, 0.2, 10, 1, 2, 0,
                        "tt-r2", 100, "ddim", 10, api_name="/purify")
    final = job.result()      # x_t, predicted x_0, progress, corrupted, 3 x top-3, plot, strip, GIF,
                              # perturbation, its sizes (L-inf, L2, PSNR, SSIM), the run as a ZIP
    frames = job.outputs()    # every streamed update
    # compare dense and every TT rank: (gallery, table, status, table as CSV)
    gallery, table, status, csv = client.predict("mnist", img, "7", "gaussian", 0.3, 0.1, 0.2, 10, 1, 2, 0,
                                                 "tt-r2", 100, "ddim", 10, api_name="/compare")

The inputs of /corrupt, /purify and /compare are, in order: dataset, image, true label (a class
name, or "unknown"), corruption (none, gaussian, salt_pepper, pgd_linf, adaptive), sigma, p, eps,
attack steps, EOT samples, surrogate DDIM steps, seed, model (dense, tt-r1..tt-r4, authors-r3),
t*, and for /purify and /compare the method (ddpm, ddim, one-step) and the number of steps.
``client.view_api()`` lists every endpoint with its parameters.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from tendiff.classical import CLASSICAL
from tendiff.checkpoints import CheckpointIntegrityError, CheckpointNotFoundError, checkpoint_name
from tendiff.data import CLASS_NAMES, DATASETS, IMAGE_SHAPE
from tendiff.diffusion import METHODS
from render import display_scale, gif_bytes, layer_figure, perturbation_image, run_zip, strip_image, to_pil
from tendiff.pipeline import (APP_CORRUPTIONS, CENTRING, DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_STEPS,
                              DEFAULT_T_STAR, CorruptionSpec, PurifySpec, Studio, attack_measures, check_dataset,
                              check_label, drawn_image, parameter_table, prepare_image, run_record, topk)
from tendiff.protocol import CORRUPTIONS, DATASET_TITLES, STRENGTH, T_STAR, purifier_title
from tendiff.runtime import tune_allocator
from tendiff.tt import channel_modes, tt_param_count
from tendiff.unet import preset

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
UNKNOWN = "unknown (use the classifier's prediction)"
# The example on screen at start: with the committed checkpoints, Gaussian sigma 0.2 makes the
# classifier misread this digit and purification at the default t* brings it back.
DEFAULT_EXAMPLE = "mnist_7_0.png"
DISPLAY = 224  # display size of the small images (nearest-neighbour enlargement)
HEAVY_CONCURRENCY = int(os.environ.get("TENDIFF_CONCURRENCY", "1"))  # heavy runs at a time (2-core CPU: 1)
MAX_GIFS = 128  # GIFs kept in the app's temp folder (and as many run ZIPs, compare CSVs)
MAX_PNG_FOLDERS = 4000  # displayed PNGs kept in the app's temp folder
FRAME_INTERVAL = float(os.environ.get("TENDIFF_FRAME_INTERVAL", "0.1"))  # seconds between streamed frames
# Frames that compute faster than the eye are paced FRAME_INTERVAL apart, but never by more than
# STREAM_BUDGET seconds in all: pacing must not delay the final result (docs/performance.md, 'Why the code is shaped this way').
STREAM_BUDGET = float(os.environ.get("TENDIFF_STREAM_BUDGET", "0.25"))
CSS = """
.pixelated img, img.pixelated, .gallery img, #input-image img { image-rendering: pixelated; }
#input-image img { width: 100% !important; height: 100% !important; object-fit: contain; }
#perturbation img { image-rendering: pixelated; }
#threat-line { font-weight: 600; }
#examples .grid-container { grid-template-columns: repeat(10, minmax(0, 1fr)) !important; }
#compare-gallery .grid-container { grid-template-columns: repeat(5, minmax(0, 1fr)) !important; }
#title h1 { margin-bottom: 0; }
"""

# One thread: batch-1 inference gains nothing from a second, which stalls on a busy machine (docs/performance.md, 'Why the code is shaped this way').
torch.set_num_threads(int(os.environ.get("TENDIFF_THREADS", "1")))
tune_allocator()
studio = Studio()
_tmp = Path(tempfile.mkdtemp(prefix="tendiff-studio-"))


# --------------------------------------------------------------------------- helpers
def user_errors(fn):
    """Turn the pipeline's ValueErrors and missing checkpoints into gr.Error messages."""
    errors = (ValueError, CheckpointNotFoundError, CheckpointIntegrityError)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except errors as exc:
                raise gr.Error(str(exc)) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors as exc:
            raise gr.Error(str(exc)) from None
    return wrapper


def readable_upload_errors(image: gr.Image) -> gr.Image:
    """Make an image input's preprocessing failure (a file that is not an image) a clear message.

    Patches the instance rather than subclassing gr.Image: a subclass defined here would make
    Gradio write an ``app.pyi`` stub next to this file at import.
    """
    original = image.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(f"The upload could not be read as an image ({type(exc).__name__}); "
                           "upload a PNG or JPEG.") from None

    image.preprocess = preprocess
    return image


def examples(dataset: str) -> list[tuple[str, str]]:
    """(path, caption) of the bundled example images of a dataset: one row per copy, classes in order."""
    names = CLASS_NAMES[dataset]
    out = []
    for path in sorted(ASSETS.glob(f"{dataset}_*.png"), key=lambda p: (int(p.stem.split("_")[-1]), int(p.stem.split("_")[-2]))):
        label = int(path.stem.split("_")[-2])
        out.append((str(path), names[label]))
    return out


def label_from_path(dataset: str, path) -> str | None:
    """The true label of a bundled example, from its name (``mnist_3_0.png`` -> '3')."""
    if not path:
        return None
    stem = Path(str(path)).stem
    parts = stem.split("_")
    if stem.startswith(dataset + "_") and len(parts) >= 3 and parts[-2].isdigit():
        return CLASS_NAMES[dataset][int(parts[-2])]
    return None


_png_lock = threading.Lock()


def png_file(img, name: str = "image") -> str:
    """Write a PIL image as a PNG named by its content and return the path.

    Handing Gradio paths rather than PIL images matters for streaming: Gradio re-writes a PIL
    image's cache file on every update that contains the same picture, so a client still
    downloading it from the previous update gets a truncated file (seen as "Too little data for
    declared Content-Length" on the server). Files are copied into Gradio's cache only once.
    """
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    folder = _tmp / "png" / hashlib.sha1(data).hexdigest()[:20]
    path = folder / f"{name}.png"
    if not path.exists():
        with _png_lock:
            folder.mkdir(parents=True, exist_ok=True)
            staging = folder / f".{name}.tmp"
            staging.write_bytes(data)
            staging.replace(path)
            folders = list((_tmp / "png").iterdir())
            if len(folders) > MAX_PNG_FOLDERS:  # forget the oldest half
                folders.sort(key=lambda f: f.stat().st_mtime)
                for old in folders[: len(folders) // 2]:
                    shutil.rmtree(old, ignore_errors=True)
    return str(path)


def show(x, name: str = "image") -> str:
    """A (1, C, H, W) image enlarged (nearest-neighbour) for display, as a PNG path."""
    return png_file(to_pil(x, display_scale(x, DISPLAY)), name)


def label_dict(dataset: str, probs) -> dict[str, float]:
    return {name: p for name, p in topk(dataset, probs, 10)}


def _specs(kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star, method=DEFAULT_METHOD,
           steps=DEFAULT_STEPS, adaptive_t=False):
    corruption = CorruptionSpec(kind, sigma, p, eps, attack_steps, eot, surrogate)
    spec = PurifySpec(model or DEFAULT_MODEL, "auto" if adaptive_t else t_star, steps, method, seed)
    return corruption, spec


def _input(dataset, image):
    check_dataset(dataset)
    if image is None:
        raise ValueError("pick an example or upload an image first")
    return prepare_image(image, dataset, studio.limits)


# What "model input" says after an upload that could not be prepared (the error toast says why),
# instead of the previous image's description.
UNUSABLE_UPLOAD = "**This upload is not usable** (see the message). Upload another image or pick an example."


def noise_text(t_star) -> str:
    try:
        t = int(t_star)
        return (f"t* = {t} of T = {studio.num_timesteps}: the input is diffused to noise std "
                f"**{studio.noise_std(t):.3f}** (pixel units, images in [0, 1])"
                + (" — beyond the t <= 400 the purifiers were trained on." if t > 400 else "."))
    except Exception:
        return ""


def model_choices(labels) -> list[tuple[str, str]]:
    """Dropdown (shown, value) pairs: diffusion purifiers (ranks beyond the paper's R <= 4 say
    so), then the classical ones, marked as such."""
    return [(f"classical: {m} ({CLASSICAL[m][1]})" if m in CLASSICAL else purifier_title(m), m) for m in labels]


def threat_text(kind, eps=0.2, attack_steps=10, eot=1, surrogate=2) -> str:
    try:
        spec = CorruptionSpec(kind, eps=eps, attack_steps=attack_steps, eot=eot, surrogate_steps=surrogate)
        text = f"**{spec.threat}**"
        if kind in ("pgd_linf", "adaptive"):
            text += f"  \nCost: {spec.cost()}"
        return text
    except Exception as exc:  # a half-typed value: say nothing wrong, the run will validate
        return str(exc)


def attack_text(measures: dict) -> str:
    """One line: the perturbation's size and how close the corrupted and purified images are to the clean one."""
    m = measures
    if m["linf"] == 0:
        head = "No perturbation (the corrupted image is the clean one)"
        corrupted = "identical"
    else:
        head = (f"Perturbation (corrupted − clean; shown amplified, gray = no change): L∞ **{m['linf']:.3f}**, "
                f"L2 **{m['l2']:.2f}** (pixel units, [0, 1])")
        corrupted = f"PSNR {m['psnr_corrupted']:.1f} dB, SSIM {m['ssim_corrupted']:.3f}"
    return (f"{head} · against the clean image: corrupted {corrupted}; "
            f"purified PSNR {m['psnr_purified']:.1f} dB, SSIM {m['ssim_purified']:.3f}")


def _keep_newest(pattern: str, keep: int = MAX_GIFS) -> None:
    for old in sorted(_tmp.glob(pattern), key=lambda f: f.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)


def _write(path: Path, data: bytes) -> str:
    """Write a file atomically (a client may be downloading the previous run's) and return its path."""
    staging = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    staging.write_bytes(data)
    staging.replace(path)
    return str(path)


def run_files(dataset, key, result, requested: PurifySpec, y, measures) -> tuple[str, str]:
    """The run's GIF and its ZIP (images, steps, GIF, run.json), written once per run and kept for a while."""
    tag = abs(hash(key))
    gif = _tmp / f"purification_{tag}.gif"
    if not gif.exists():
        _write(gif, gif_bytes(result.frames))
        _keep_newest("purification_*.gif")
    done = result.spec
    archive = _tmp / f"tendiff_{dataset}_{done.model}_{result.corrupted.spec.kind}_seed{done.seed}_{tag % 10 ** 8}.zip"
    if not archive.exists():
        names = [checkpoint_name(dataset, "classifier")] + ([] if done.model in CLASSICAL else
                                                             [checkpoint_name(dataset, done.model)])
        entries = studio.manifest_entries()
        record = run_record(result, requested, y, measures, {n: entries.get(n, {}).get("sha256") for n in names})
        _write(archive, run_zip(result, record, gif.read_bytes(), display_scale(result.clean, DISPLAY)))
        _keep_newest("tendiff_*.zip")
    return str(gif), str(archive)


def csv_file(table: pd.DataFrame, name: str) -> str:
    """A table as a CSV file named ``name`` (plus a short content hash), for download."""
    data = table.to_csv(index=False).encode()
    path = _tmp / f"{name}_{hashlib.sha1(data).hexdigest()[:8]}.csv"
    if not path.exists():
        _write(path, data)
        _keep_newest("*.csv")
    return str(path)


# ------------------------------------------------------------------------- handlers
@user_errors
def prepare(dataset: str, image):
    """What the model sees: the input converted to the dataset's size and colour mode."""
    if image is None:  # the input was cleared
        return None, ""
    prepared = _input(dataset, image)
    return show(prepared.tensor, "model_input"), prepared.message


def use_drawing(drawing, last: str | None = None):
    """A sketchpad drawing becomes the input image, as an upload would (the true label becomes
    unknown); prepare() then shows it centred and scaled like the dataset's images. Returns (image,
    true label, the drawing's hash, kept as ``last`` in the page's state).

    The sketchpad reports a change also when it is shown again (the dataset switched back): the same
    drawing as ``last`` changes nothing, so an example picked since stays the input. An emptied
    drawing says "draw something first" (a warning: the input stays as it was)."""
    composite = drawing.get("composite") if isinstance(drawing, dict) else drawing
    try:
        img = drawn_image(composite)
    except ValueError as exc:
        if last:  # the drawing that was the input has been cleared or erased
            gr.Warning(f"{exc}; the input is still the last drawing")
        return gr.skip(), gr.skip(), None
    key = hashlib.sha1(img.tobytes()).hexdigest()
    if key == last:
        return gr.skip(), gr.skip(), last
    return png_file(img, "drawing"), UNKNOWN, key


@user_errors
def corrupt(dataset, image, true_label, kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star):
    """Corrupt the input; returns the corrupted image, the clean and corrupted top classes and the threat model."""
    corruption, spec = _specs(kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star)
    y, corruption, spec = studio.validate_request(dataset, true_label, corruption, spec)
    x = _input(dataset, image).tensor
    out = studio.corrupt(dataset, corruption.kind, x, y, corruption, spec.seed, spec.model, spec.t_star)
    return (show(out.tensor, "corrupted"), label_dict(dataset, studio.probs(dataset, x)[0]),
            label_dict(dataset, studio.probs(dataset, out.tensor)[0]), threat_text(kind, eps, attack_steps, eot, surrogate))


def _plot_frame(frames) -> pd.DataFrame:
    rows = []
    for f in frames:
        rows.append({"step": f.index, "value": f.confidence, "series": "true-class confidence"})
        rows.append({"step": f.index, "value": f.distance, "series": "RMSE to clean image"})
    return pd.DataFrame(rows)


@user_errors
def purify(dataset, image, true_label, kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star,
           method, steps, adaptive_t=False):
    """Corrupt then purify, streaming x_t and the predicted clean image at every reverse step."""
    corruption, spec = _specs(kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star, method, steps,
                              adaptive_t)
    y, corruption, spec = studio.validate_request(dataset, true_label, corruption, spec)
    x = _input(dataset, image).tensor
    skip = gr.skip()
    if corruption.kind == "adaptive":  # can take a while: say so before it starts (one extra update)
        yield (skip, skip, f"Running the adaptive attack first: {corruption.cost()}") + (skip,) * 10
    corrupted = studio.corrupt(dataset, corruption.kind, x, y, corruption, spec.seed, spec.model, spec.t_star)
    clean_probs = label_dict(dataset, studio.probs(dataset, x)[0])
    corrupted_probs = label_dict(dataset, studio.probs(dataset, corrupted.tensor)[0])
    n_frames = spec.steps + 1
    interval = min(FRAME_INTERVAL, STREAM_BUDGET / n_frames)
    last = time.perf_counter()
    first = True
    for frame, result, cached in studio.run_stream(dataset, x, y, corruption, spec):
        progress = (f"Step {frame.index}/{frame.num_steps} · t = {frame.t} · noise std {frame.noise_std:.3f} · "
                    f"{'replayed from cache' if cached else f'{frame.seconds:.2f} s'}")
        if not cached:
            wait = interval - (time.perf_counter() - last)
            if wait > 0 and not first:
                time.sleep(wait)
            last = time.perf_counter()
        head = (show(frame.x_t, "x_t"), show(frame.pred_x0, "predicted_x0"), progress)
        if result is None:
            rest = ((show(corrupted.tensor, "corrupted"), clean_probs, corrupted_probs) if first else (skip, skip, skip))
            yield head + rest + ((None,) * 7 if first else (skip,) * 7)  # clear the last run
            first = False
            continue
        measures = attack_measures(result)
        gif, archive = run_files(dataset, studio.run_key(dataset, x, y, corruption, spec), result, spec, y, measures)
        done = result.spec
        how = (f"one pass of the classical {done.model} filter" if done.model in CLASSICAL else
               f"{done.steps} {done.method} step(s) from t* = {done.t_star} with {done.model}")
        summary = (f"Done: {how} in {result.seconds:.2f} s{' (cached)' if cached else ''}. "
                   f"Purified prediction: {topk(dataset, result.probs_purified, 1)[0][0]}."
                   + (f"  \n{result.t_star_note}" if result.t_star_note else ""))
        yield (show(frame.x_t, "x_t"), show(frame.pred_x0, "purified"), summary, show(corrupted.tensor, "corrupted"),
               clean_probs, corrupted_probs,
               label_dict(dataset, result.probs_purified), _plot_frame(result.frames),
               png_file(strip_image(result.frames, scale=max(1, 84 // IMAGE_SHAPE[dataset][1])), "steps"), gif,
               png_file(perturbation_image(x, corrupted.tensor, display_scale(x, DISPLAY)), "perturbation"),
               attack_text(measures), archive)


@user_errors
def compare(dataset, image, true_label, kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star,
            method, steps, adaptive_t=False):
    """The same input, corruption and seed through every available purifier."""
    corruption, spec = _specs(kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star, method, steps,
                              adaptive_t)
    x = _input(dataset, image).tensor
    columns = ["model", "prediction", "confidence", "true-class confidence", "parameters", "compression", "seconds"]
    models = studio.available_purifiers(dataset)  # fixed now: a checkpoint added meanwhile joins the next run
    for rows in studio.compare(dataset, x, true_label, corruption, spec, models=models):
        gallery, table = [], []
        for r in rows:
            if not r.available:
                table.append([r.model, r.note, None, None, None, None, None])
                continue
            size = "classical" if not r.parameters else f"{r.compression:.0f}x"
            gallery.append((show(r.image, r.model), f"{r.model}: {r.prediction} ({r.confidence:.0%}), {size}"))
            table.append([r.model, r.prediction, round(r.confidence, 3), round(r.true_confidence, 3), r.parameters,
                          round(r.compression, 2) if r.parameters else None, round(r.seconds, 3)])
        status = f"{len(rows)} purifier(s) done; the same corrupted input and seed {spec.seed} for every one."
        frame = pd.DataFrame(table, columns=columns)
        last = len(rows) == len(models)  # the final update carries the table as a CSV file
        yield gallery, frame, status, (csv_file(frame, f"tendiff_compare_{dataset}_seed{spec.seed}") if last else None)


@user_errors
def learn_layer(dataset, model, layer):
    """The TT cores of one layer and the kernel they rebuild next to the dense one."""
    available = [m for m in studio.available_models(dataset) if m != "dense"]
    if not available:
        raise CheckpointNotFoundError(f"{DATASET_TITLES[dataset]}: no TT purifier is trained yet")
    if not model:
        model = "tt-r2" if "tt-r2" in available else available[0]
    elif model not in available:
        raise ValueError(f"{model} is not trained for {DATASET_TITLES[dataset]}; choose one of {', '.join(available)}")
    names = studio.tt_layer_names(dataset, model)
    view = studio.layer_view(dataset, model, layer or None)  # (an unknown layer: a message naming the layers)
    layer = view["layer"]
    o, i, kh, kw = view["shape"]
    if view["layout"] == "tt":
        r1, r2, r3 = view["ranks"]
        formula = (f"I·R1 + kh·R1·R2 + kw·R2·R3 + R3·O = {i}·{r1} + {kh}·{r1}·{r2} + {kw}·{r2}·{r3} + {r3}·{o}"
                   f" = **{view['tt_parameters']:,}**")
    elif view["layout"] == "ttm":
        (r0, r1), ((c1, c2), (s1, s2)) = view["ranks"], (channel_modes(i), channel_modes(o))
        formula = (f"kh·kw·R0 + R0·c1·s1·R1 + R1·c2·s2 = {kh}·{kw}·{r0} + {r0}·{c1}·{s1}·{r1} + {r1}·{c2}·{s2}"
                   f" = **{view['tt_parameters']:,}** (I = {c1}·{c2}, O = {s1}·{s2})")
    else:
        r0, r1 = view["ranks"]
        formula = f"O·I·r0 + r0·kh·r1 + r1·kw = {o}·{i}·{r0} + {r0}·{kh}·{r1} + {r1}·{kw} = **{view['tt_parameters']:,}**"
    err = (f"Relative distance to the dense kernel: **{view['relative_error']:.3f}** (TT-SVD initialisation, then "
           "fine-tuning moves the cores)." if view["relative_error"] is not None else "No dense checkpoint to compare.")
    text = (f"**{layer}** of {model}: kernel O x I x kh x kw = {o} x {i} x {kh} x {kw} = {view['dense_parameters']:,} "
            f"dense weights; TT cores: {formula} weights, {view['dense_parameters'] / view['tt_parameters']:.1f}x fewer.  \n"
            + err)
    return (gr.update(choices=model_choices(available), value=model), gr.update(choices=names, value=layer),
            layer_figure(view), text)


@user_errors
def learn_params(dataset, rank):
    """The parameter formula as the rank changes, for one of the model's 3x3 layers and the whole U-Net."""
    check_dataset(dataset)
    r = int(rank)
    if not 1 <= r <= 16:
        raise ValueError(f"rank must be in 1..16, got {r}")
    c = preset(dataset).channels[0]
    a, b = channel_modes(c)
    dense = c * c * 9
    tt = tt_param_count(c, c, 3, r, "tt", bias=False)
    ttm = tt_param_count(c, c, 3, r, "ttm", bias=False)
    au = tt_param_count(c, c, 3, r, "authors", bias=False)
    text = (f"One of the U-Net's {c} -> {c} 3x3 convolutions at rank R = {r}:  \n"
            f"- dense: O·I·k·k = {c}·{c}·9 = **{dense:,}**  \n"
            f"- TT (one core per mode): I·R + 3R² + 3R² + R·O = {c}·{r} + 3·{r * r} + 3·{r * r} + {r}·{c} = **{tt:,}** "
            f"({dense / tt:.0f}x fewer; linear in the channels)  \n"
            f"- TT-matrix ({c} = {a}·{b} channels each side): 9R + R·{a}·{a}·R + R·{b}·{b} = 9·{r} + {a * a}·{r * r} + "
            f"{b * b}·{r} = **{ttm:,}** ({dense / ttm:.0f}x fewer; O(N R²))  \n"
            f"- authors' layout: O·I·R + 3R² + 3R = {c * c}·{r} + 3·{r * r} + 3·{r} = **{au:,}** "
            f"({dense / au:.1f}x fewer; still quadratic in the channels)")
    rows = parameter_table(dataset, range(1, 9))
    df = pd.DataFrame([{"rank": row["rank"], "parameters": row[k], "model": k} for row in rows
                       for k in ("dense", "tt", "ttm", "authors")])
    return text, df


def learn_schedule(t_star):
    """The noise std over t, with t* marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(1, studio.num_timesteps + 1)
    std = np.array([studio.noise_std(int(k)) for k in t])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.semilogy(t, std, color="#1f77b4")
    try:
        ts = int(t_star)
        ax.axvline(ts, color="#d62728", ls="--")
        ax.annotate(f"t* = {ts}: std {studio.noise_std(ts):.3f}", (ts, studio.noise_std(ts)), xytext=(10, -15),
                    textcoords="offset points", color="#d62728")
    except Exception:
        pass
    ax.axvspan(400, t[-1], color="0.9")
    ax.text(700, std[5], "beyond the training range (t > 400)", ha="center", fontsize=8)
    ax.set_xlabel("t"), ax.set_ylabel("noise std (pixel units)")
    ax.set_title("Diffusing to t adds this much Gaussian noise", fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig, noise_text(t_star)


@user_errors
def guidance(dataset, image, true_label, t_star, seed):
    """The guidance lesson: a class-conditional purifier guided with no label, the true label, a wrong label."""
    x = _input(dataset, image).tensor
    y = check_label(dataset, true_label)
    if y is None:
        raise ValueError("the guidance lesson needs the true label: pick an example, or set the true label")
    spec = PurifySpec("dense", t_star, DEFAULT_STEPS, "ddim", seed)
    try:
        out = studio.guidance_lesson(dataset, x, y, spec=spec)
    except CheckpointNotFoundError as exc:
        return [], (f"**Not trained yet.** The guidance lesson (no label vs the true label vs a wrong label) needs a "
                    f"class-conditional purifier: {exc}")
    gallery = [(show(img), f"{name} -> {preds[0][0]} ({preds[0][1]:.0%})") for name, (img, preds) in out.items()]
    text = ("Guiding the purifier with the **true** label makes the purified image look like that class whatever the "
            "input was: the defense is told the answer, so its accuracy says nothing about robustness. A **wrong** label "
            "pulls the image towards the wrong class just as easily. Only the unguided row is a fair defense.")
    return gallery, text


# ------------------------------------------------------------------------ the page
# Gradio's sketchpad starts with no tool chosen ("select the draw tool to start"): once it is on
# screen (the accordion opened), choose the brush. Tries for about 3 s.
PICK_BRUSH = """() => {
  let tries = 0;
  const pick = () => {
    const brush = document.querySelector('#sketch button[aria-label="Brush"]');
    const waiting = document.querySelector('#sketch')?.innerText.includes('select the draw tool');
    if (brush && waiting) brush.click();
    if ((!brush || waiting) && tries++ < 15) setTimeout(pick, 200);
  };
  setTimeout(pick, 100);
}"""


def dataset_changed(dataset):
    check_dataset(dataset)
    ex = examples(dataset)
    models = studio.available_purifiers(dataset)
    model = DEFAULT_MODEL if DEFAULT_MODEL in models else (models[0] if models else None)
    first = ex[0][0] if ex else None
    cleared = (None,) * 13  # the previous dataset's results
    strength = STRENGTH[dataset]  # the protocol's strengths for this dataset (e.g. eps 8/255 on CIFAR-10)
    return (gr.update(value=ex), gr.update(value=first),
            gr.update(choices=[UNKNOWN] + CLASS_NAMES[dataset], value=label_from_path(dataset, first) or UNKNOWN),
            gr.update(choices=model_choices(models), value=model), studio.status(dataset)) + cleared + (
            strength["gaussian"], strength["salt_pepper"], round(strength["pgd_linf"], 3), T_STAR[dataset],
            gr.update(visible=dataset in CENTRING))  # drawing: only where drawings are centred like the data


def example_selected(dataset, evt: gr.SelectData):
    ex = examples(dataset)
    path = ex[evt.index][0]
    return path, label_from_path(dataset, path) or UNKNOWN


def kind_changed(kind, eps, attack_steps, eot, surrogate):
    attack = kind in ("pgd_linf", "adaptive")
    return (gr.update(visible=kind == "gaussian"), gr.update(visible=kind == "salt_pepper"),
            gr.update(visible=attack), gr.update(visible=attack), gr.update(visible=kind == "adaptive"),
            threat_text(kind, eps, attack_steps, eot, surrogate))


API_DOC = "```python\n" + __doc__.split("::\n\n", 1)[1].split("\n\nThe inputs")[0].replace("\n    ", "\n").strip() + "\n```\n\n" \
          + "The inputs" + __doc__.split("\n\nThe inputs", 1)[1]


def build_demo() -> gr.Blocks:
    default_ds = "mnist"
    ex = examples(default_ds)
    default_image = str(ASSETS / DEFAULT_EXAMPLE)
    models = studio.available_purifiers(default_ds)
    heavy = dict(concurrency_id="heavy", concurrency_limit=HEAVY_CONCURRENCY, time_limit=600)
    with gr.Blocks(title="TendiffPure Studio", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# TendiffPure Studio\nDiffusion purification with tensor-train compressed U-Nets: corrupt an "
                    "image, let a small diffusion model wash the corruption out, and see what the classifier says.",
                    elem_id="title")
        status = gr.Markdown(studio.status(default_ds), elem_id="status-line")
        with gr.Tabs():
            with gr.Tab("Purify", id="purify"):
                gr.Markdown("### 1 · Pick or upload")
                with gr.Row(equal_height=False):
                    dataset = gr.Radio([(DATASET_TITLES[d], d) for d in DATASETS], value=default_ds,
                                       label="Dataset", elem_id="dataset", scale=1, min_width=200)
                    gallery = gr.Gallery(value=ex, label="Examples (click one): two per class", columns=10, height=210,
                                         object_fit="contain", allow_preview=False, format="png", elem_id="examples",
                                         elem_classes=["pixelated"], scale=5)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=280):
                        image = readable_upload_errors(gr.Image(
                            value=default_image, type="filepath", image_mode=None, format="png",
                            sources=["upload", "clipboard"], label="Input image (upload any image)", height=200,
                            elem_id="input-image", elem_classes=["pixelated"]))
                        # Only for the gray datasets, whose drawings prepare_image centres like their images.
                        with gr.Accordion("Draw your own", open=False, elem_id="draw",
                                          visible=default_ds in CENTRING) as draw_box:
                            # Black ink on white paper: prepare_image inverts it, then centres and scales it.
                            sketch = gr.Sketchpad(
                                label="Draw with the mouse", show_label=False, type="numpy",
                                image_mode="L", format="png", canvas_size=(280, 280), fixed_canvas=True, height=320,
                                brush=gr.Brush(default_size=22, colors=["#000000"], color_mode="fixed"),
                                layers=False, transforms=(), elem_id="sketch")
                            drawn = gr.State(None)  # the hash of the drawing last made the input
                        true_label = gr.Dropdown([UNKNOWN] + CLASS_NAMES[default_ds], value=label_from_path(default_ds, default_image),
                                                 label="True label", elem_id="true-label",
                                                 # The choices follow the dataset in the browser, but an API
                                                 # call sees the initial (MNIST) list: the pipeline checks
                                                 # the label against the request's dataset instead.
                                                 allow_custom_value=True)
                        with gr.Row():
                            seen = gr.Image(label="What the model sees", format="png", interactive=False, height=170,
                                            elem_id="model-view")
                        seen_msg = gr.Markdown(elem_id="prepare-message")
                    with gr.Column(scale=1, min_width=280):
                        gr.Markdown("### 2 · Corrupt")
                        kind = gr.Radio([(CORRUPTIONS[k].title, k) for k in APP_CORRUPTIONS], value="gaussian",
                                        label="Corruption", elem_id="corruption")
                        sigma = gr.Slider(0, 1, STRENGTH["mnist"]["gaussian"], step=0.01, label="Gaussian sigma")
                        p = gr.Slider(0, 1, STRENGTH["mnist"]["salt_pepper"], step=0.01, label="Salt-and-pepper p",
                                      visible=False)
                        eps = gr.Slider(0, 0.5, STRENGTH["mnist"]["pgd_linf"], step=0.001, visible=False,
                                        label="eps (L-inf, pixel units; 8/255 = 0.031)")
                        attack_steps = gr.Slider(1, studio.limits.max_attack_steps, 10, step=1,
                                                 label="Attack steps (adaptive: at most "
                                                       f"{studio.limits.max_adaptive_steps})", visible=False)
                        with gr.Group(visible=False) as adaptive_box:
                            eot = gr.Slider(1, studio.limits.max_eot, 1, step=1, label="EOT samples")
                            surrogate = gr.Slider(1, studio.limits.max_surrogate_steps, 2, step=1,
                                                  label="Surrogate DDIM steps")
                        threat = gr.Markdown(threat_text("gaussian"), elem_id="threat-line")
                        seed = gr.Number(0, precision=0, minimum=0, label="Seed (noise, attack start, purification)")
                        corrupt_btn = gr.Button("Corrupt", elem_id="corrupt-btn")
                        corrupted = gr.Image(label="Corrupted input", format="png", interactive=False, height=170,
                                             elem_id="corrupted")
                    with gr.Column(scale=1, min_width=280):
                        gr.Markdown("### 3 · Purify")
                        model = gr.Dropdown(model_choices(models), value=DEFAULT_MODEL if DEFAULT_MODEL in models else None,
                                            label="Purifier (dense; TT layouts tt, ttm, authors)", elem_id="model")
                        t_star = gr.Slider(1, studio.num_timesteps, DEFAULT_T_STAR, step=1, label="t* (diffusion depth)",
                                           elem_id="t-star")
                        adaptive_t = gr.Checkbox(False, label="Adaptive t*: choose t* from the input's estimated noise",
                                                 elem_id="adaptive-t")
                        t_text = gr.Markdown(noise_text(DEFAULT_T_STAR))
                        method = gr.Radio(list(METHODS), value=DEFAULT_METHOD, label="Sampler", elem_id="method")
                        steps = gr.Slider(1, studio.limits.max_reverse_steps, DEFAULT_STEPS, step=1,
                                          label="Reverse steps (one-step ignores this)", elem_id="steps")
                        with gr.Row():
                            purify_btn = gr.Button("Purify", variant="primary", elem_id="purify-btn")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                        with gr.Row():
                            x_t = gr.Image(label="x_t", format="png", interactive=False, height=170, elem_id="x-t")
                            x0 = gr.Image(label="predicted clean image", format="png", interactive=False, height=170,
                                          elem_id="pred-x0")
                        progress = gr.Markdown(elem_id="progress")
                gr.Markdown("### 4 · Predictions")
                with gr.Row():
                    lab_clean = gr.Label(num_top_classes=3, label="Clean", elem_id="pred-clean")
                    lab_corrupt = gr.Label(num_top_classes=3, label="Corrupted", elem_id="pred-corrupted")
                    lab_pure = gr.Label(num_top_classes=3, label="Purified", elem_id="pred-purified")
                    plot = gr.LinePlot(x="step", y="value", color="series",
                                       label="Along the reverse steps: true-class confidence (blue), RMSE to the "
                                             "clean image (orange)",
                                       color_map={"true-class confidence": "#1f77b4", "RMSE to clean image": "#ff7f0e"},
                                       y_lim=[0, 1], height=300, scale=2, elem_id="trajectory")
                with gr.Row(equal_height=True):
                    strip = gr.Image(label="Steps: x_t (top), predicted clean image (bottom)", format="png",
                                     interactive=False, scale=3, height=220, elem_id="strip")
                    perturb = gr.Image(label="Perturbation, amplified", format="png",
                                       interactive=False, height=220, scale=1, min_width=180, elem_id="perturbation")
                attack_line = gr.Markdown(elem_id="attack-line")
                with gr.Row():
                    gif = gr.File(label="GIF of the run", height=90, elem_id="gif")
                    run_zip_file = gr.File(label="The run as a ZIP: PNGs (native and enlarged), steps, GIF, run.json "
                                                 "(settings, seed, t*, predictions, sizes)", height=90, elem_id="run-zip")
            with gr.Tab("Compare ranks", id="compare"):
                gr.Markdown("Runs the input, corruption, t*, sampler, steps and seed set on the Purify tab through "
                            "the dense purifier and every TT rank. Compression is the dense U-Net's parameter count "
                            "over the model's; seconds are the measured purification time on this machine.")
                with gr.Row():
                    compare_btn = gr.Button("Compare dense and every TT rank", variant="primary", elem_id="compare-btn")
                    stop2 = gr.Button("Stop", variant="stop")
                compare_status = gr.Markdown(elem_id="compare-status")
                compare_gallery = gr.Gallery(label="Purified by each model", columns=5, height=300, format="png",
                                             allow_preview=False, elem_id="compare-gallery", elem_classes=["pixelated"])
                compare_table = gr.Dataframe(label="Results", elem_id="compare-table", interactive=False)
                compare_csv = gr.File(label="The table as CSV", elem_id="compare-csv")
            with gr.Tab("Learn", id="learn"):
                gr.Markdown("### Tensor-train cores\nEach 3x3 convolution kernel W[o, i, a, b] of a TT purifier is "
                            "stored as small cores, one per mode, and rebuilt as their contraction.")
                with gr.Row():
                    tt_models = [m for m in studio.available_models(default_ds) if m != "dense"]
                    # (custom values: an API call may name another dataset's model; learn_layer checks it)
                    learn_model = gr.Dropdown(model_choices(tt_models), value="tt-r2" if "tt-r2" in tt_models else None,
                                              label="TT model", allow_custom_value=True)
                    learn_layer_dd = gr.Dropdown([], label="Layer", allow_custom_value=True)
                    learn_btn = gr.Button("Show cores", elem_id="learn-btn")
                layer_plot = gr.Plot(label="Cores and kernels", elem_id="layer-plot")
                layer_text = gr.Markdown()
                gr.Markdown("### Parameters as the rank changes")
                rank = gr.Slider(1, 8, 2, step=1, label="Rank R")
                params_text = gr.Markdown()
                params_plot = gr.LinePlot(x="rank", y="parameters", color="model",
                                          label="Whole U-Net parameters: dense (gray), TT (blue), TT-matrix (green), authors' layout (red)",
                                          color_map={"dense": "#7f7f7f", "tt": "#1f77b4", "ttm": "#2ca02c", "authors": "#d62728"},
                                          height=320, elem_id="params-plot")
                gr.Markdown("### Noise std over t")
                schedule_plot = gr.Plot(label="Noise schedule", elem_id="schedule-plot")
                schedule_text = gr.Markdown(elem_id="schedule-text")
                gr.Markdown("### The guidance lesson\nThe authors guide the purifier with the label. Compare the "
                            "input purified by a class-conditional purifier with no label, the true label and a "
                            "wrong label (uses the Purify tab's input, t* and seed).")
                guide_btn = gr.Button("Run the guidance lesson", elem_id="guide-btn")
                guide_gallery = gr.Gallery(label="No label / true label / wrong label", columns=3, height=260,
                                           format="png", allow_preview=False, elem_classes=["pixelated"])
                guide_text = gr.Markdown(elem_id="guide-text")
            with gr.Tab("API", id="api"):
                gr.Markdown("Every main action is a named endpoint. With the app running:\n\n" + API_DOC)

        # ---------------------------------------------------------------- events
        run_inputs = [dataset, image, true_label, kind, sigma, p, eps, attack_steps, eot, surrogate, seed, model,
                      t_star]
        # The input is prepared once per user action (upload, example, drawing, dataset). Not on image.change:
        # the browser fires that two or three times for one upload, and a bad upload then showed
        # its error toast as many times.
        light = dict(concurrency_id="light", concurrency_limit=4)
        dataset_ev = dataset.change(dataset_changed, dataset, [gallery, image, true_label, model, status, corrupted, x_t,
                                                               x0, progress, lab_clean, lab_corrupt, lab_pure, plot,
                                                               strip, gif, perturb, attack_line, run_zip_file, sigma,
                                                               p, eps, t_star, draw_box],
                                    api_visibility="private", queue=False)
        dataset_ev.then(prepare, [dataset, image], [seen, seen_msg], api_name="prepare_dataset_default",
                        api_visibility="private", **light)
        # The dataset's t* moved the slider: the Learn tab's schedule plot follows it.
        dataset_ev.then(learn_schedule, t_star, [schedule_plot, schedule_text], api_name="dataset_schedule",
                        api_visibility="private", **light)
        gallery.select(example_selected, dataset, [image, true_label], api_visibility="private", queue=False).then(
            prepare, [dataset, image], [seen, seen_msg], api_name="prepare_example", api_visibility="private", **light)
        image.upload(lambda: UNKNOWN, None, true_label, api_visibility="private", queue=False)  # label unknown
        image.upload(prepare, [dataset, image], [seen, seen_msg], api_name="prepare", **light).failure(
            lambda: (None, UNUSABLE_UPLOAD), None, [seen, seen_msg], api_visibility="private", queue=False)
        image.clear(lambda: (None, "No input image: upload one or pick an example."), None, [seen, seen_msg],
                    api_visibility="private", queue=False)
        draw_box.expand(None, js=PICK_BRUSH)  # the sketchpad opens with its brush in hand
        # A drawing takes the upload's path: it becomes the input image, the label unknown, then prepared.
        sketch.change(use_drawing, [sketch, drawn], [image, true_label, drawn], api_name="use_drawing",
                      api_visibility="private", **light).success(
            prepare, [dataset, image], [seen, seen_msg], api_name="prepare_drawing", api_visibility="private", **light)
        demo.load(prepare, [dataset, image], [seen, seen_msg], api_name="initial_prepare", api_visibility="private")
        demo.load(learn_params, [dataset, rank], [params_text, params_plot], api_name="initial_params",
                  api_visibility="private")
        demo.load(learn_schedule, t_star, [schedule_plot, schedule_text], api_name="initial_schedule",
                  api_visibility="private")
        kind_inputs = [kind, eps, attack_steps, eot, surrogate]
        kind.change(kind_changed, kind_inputs, [sigma, p, eps, attack_steps, adaptive_box, threat],
                    api_visibility="private", queue=False)
        for c in (eps, attack_steps, eot, surrogate):
            c.release(threat_text, kind_inputs, threat, api_visibility="private", queue=False)
        t_star.change(noise_text, t_star, t_text, api_visibility="private", queue=False)
        t_star.release(learn_schedule, t_star, [schedule_plot, schedule_text], api_name="learn_schedule")
        results = [x_t, x0, progress, lab_pure, plot, strip, gif, perturb, attack_line, run_zip_file]  # what a run shows
        corrupt_btn.click(lambda: (None,) * len(results), None, results, api_visibility="private", queue=False)
        image.change(lambda: (None,) * (len(results) + 3), None, results + [corrupted, lab_clean, lab_corrupt],
                     api_visibility="private", queue=False)  # a new input: the old results no longer apply
        corrupt_ev = corrupt_btn.click(corrupt, run_inputs, [corrupted, lab_clean, lab_corrupt, threat],
                                       api_name="corrupt", show_progress="minimal", **heavy)
        purify_ev = purify_btn.click(
            purify, run_inputs + [method, steps, adaptive_t],
            [x_t, x0, progress, corrupted, lab_clean, lab_corrupt, lab_pure, plot, strip, gif, perturb, attack_line,
             run_zip_file],
            api_name="purify", show_progress="hidden", **heavy)
        compare_ev = compare_btn.click(compare, run_inputs + [method, steps, adaptive_t],
                                       [compare_gallery, compare_table, compare_status, compare_csv], api_name="compare",
                                       show_progress="minimal", **heavy)
        learn_ev = learn_btn.click(learn_layer, [dataset, learn_model, learn_layer_dd],
                                   [learn_model, learn_layer_dd, layer_plot, layer_text], api_name="learn_layer", **heavy)
        rank.release(learn_params, [dataset, rank], [params_text, params_plot], api_name="learn_params")
        guide_ev = guide_btn.click(guidance, [dataset, image, true_label, t_star, seed], [guide_gallery, guide_text],
                                   api_name="guidance", **heavy)
        cancels = [corrupt_ev, purify_ev, compare_ev, learn_ev, guide_ev]
        stop_btn.click(None, cancels=cancels, api_visibility="private")
        stop2.click(None, cancels=cancels, api_visibility="private")
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch_kwargs() -> dict:
    return dict(theme=gr.themes.Soft(), css=CSS, allowed_paths=[str(ASSETS)], max_file_size="10mb",
                show_error=True)


WARM_UP_TIMEOUT_S = 60
WARM_UP_ARGS = ["mnist", str(ASSETS / DEFAULT_EXAMPLE), UNKNOWN, "gaussian", 0.2, 0.2, 0.2, 10, 1, 2,
                # seed 1, not the default 0: the visitor's first default click still runs (and streams) live
                1, DEFAULT_MODEL, DEFAULT_T_STAR, DEFAULT_METHOD, DEFAULT_STEPS]


def warm_up() -> None:
    """Run the default request once before the page is public, so that the first visitor's click
    is fast: through the click's own handler (models, PNG/GIF encoders, plot code), then through
    a server on a private port, closed afterwards: a server's first queued request is slower than
    later ones, and a visitor's click must not queue behind the warm-up
    (docs/performance.md, 'Why the code is shaped this way')."""
    args = list(WARM_UP_ARGS)
    try:
        for _ in purify(*args):
            pass
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    **launch_kwargs())
        try:
            from gradio_client import Client, handle_file
            args[1] = handle_file(args[1])
            client = Client(demo.local_url, verbose=False, download_files=False, httpx_kwargs={"timeout": 30})
            # (bounded: a warm-up that hangs must not keep the app from starting)
            client.submit(*args, api_name="/purify").result(timeout=WARM_UP_TIMEOUT_S)
        finally:
            demo.close()
    except Exception:
        pass  # missing checkpoints (the UI says so when used)


demo = build_demo()

if __name__ == "__main__":
    warm_up()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
                **launch_kwargs())
