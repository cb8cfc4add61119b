"""TendiffPure Studio: diffusion purification with tensor-train U-Nets, as a Gradio app.

    python app.py                      # http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT)

The same file runs as a Hugging Face Space (``demo`` is defined at module level). Checkpoints
are resolved local-first (``checkpoints/``), then from the Hub (see tendiff.checkpoints). This
file only wires the UI: each handler asks :mod:`tendiff.pipeline` for one thing and returns a
named view (a NamedTuple whose fields are the components it updates, in its API output order).

Every main action is a named endpoint, usable from Python with ``gradio_client``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")   # this app's address, or a Space's "owner/name"
    img = handle_file("assets/mnist_7_0.png")   # any image file: a path or a URL
    # what the model sees: (image, message)
    seen, message = client.predict("mnist", img, api_name="/prepare")
    # corrupt: (corrupted image, clean top-3, corrupted top-3, threat model line)
    corrupted, clean, attacked, threat = client.predict(
        "mnist", img, "7", "pgd_linf", 0.3, 0.1, 0.2, 10, 1, 2, 0, "tt-r2", 100, api_name="/corrupt")
    # purify (streams one output per reverse step; .outputs() keeps every one)
    job = client.submit("mnist", img, "7", "gaussian", 0.3, 0.1, 0.2, 10, 1, 2, 0,
                        "tt-r2", 100, "ddim", 10, api_name="/purify")
    final = job.result()      # x_t, purified, progress, corrupted, 3 x top-3, plot, strip, GIF,
                              # perturbation, its sizes (L-inf, L2, PSNR, SSIM), the run as a ZIP,
                              # the spread over 8 purifications (text, picture)
    frames = job.outputs()    # every streamed update
    # compare every purifier: (gallery, table, status, table as CSV)
    gallery, table, status, csv = client.predict("mnist", img, "7", "gaussian", 0.3, 0.1, 0.2, 10, 1, 2, 0,
                                                 "tt-r2", 100, "ddim", 10, api_name="/compare")

The inputs of /corrupt, /purify and /compare are, in order: dataset, image, true label (a class
name, or "unknown"), corruption (none, gaussian, salt_pepper, pgd_linf, adaptive, exact), sigma, p, eps,
attack steps, EOT samples, surrogate DDIM steps, seed, model (dense, tt-r1..tt-r16, ttm-r1..ttm-r4,
authors-r3, or a classical filter), t*, and for /purify and /compare the method (ddpm, ddim,
one-step), the number of steps, the t* mode (auto, the default: from the input for clean or noisy
inputs, the given t* under attack; fixed; adaptive) and how many purifications make the spread
(runs; the final update of /purify ends with the spread's text and picture).
``client.view_api()`` lists every endpoint with its parameters and named outputs.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import gradio as gr
import pandas as pd
import torch

from render import (display_scale, evidence_figure, gif_bytes, layer_figure, params_figure, perturbation_image,
                    run_zip, runs_image, schedule_figure, strip_image, t_star_figure, to_pil)
from tendiff import anatomy
from tendiff.checkpoints import CheckpointIntegrityError, CheckpointNotFoundError, checkpoint_name
from tendiff.classical import CLASSICAL, available as classical_available
from tendiff.data import CLASS_NAMES, DATASETS, IMAGE_SHAPE
from tendiff.diffusion import METHODS
from tendiff.evaluate import read_results
from tendiff.inputs import CENTRING, drawn_image, prepare_image
from tendiff.pipeline import (APP_CORRUPTIONS, THROUGH_PURIFIER, DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_STEPS, DEFAULT_T_STAR,
                              CorruptionSpec, PurifySpec, Studio, attack_measures, check_dataset, check_label,
                              run_record, topk)
from tendiff.protocol import (ADAPTIVE_T_STAR, CORRUPTIONS, DATASET_TITLES, MAX_RANK, PAPER_MAX_RANK, STRENGTH, T_STAR,
                              T_STAR_MODES, adaptive_t_star, purifier_title)
from tendiff.runtime import tune_allocator
from tendiff.train import TrainConfig
from tendiff.tt import channel_modes, tt_param_count
from tendiff.unet import preset

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
UNKNOWN = "unknown (use the classifier's prediction)"
# The example on screen at start: with the committed checkpoints, Gaussian sigma 0.2 makes the
# classifier misread this digit and purification at the default t* brings it back.
DEFAULT_EXAMPLE = "mnist_7_0.png"
DEFAULT_DATASET = "mnist"
DISPLAY = 224  # display size of the small images (nearest-neighbour enlargement)
HEAVY_CONCURRENCY = int(os.environ.get("TENDIFF_CONCURRENCY", "1"))  # heavy runs at a time (2-core CPU: 1)
# Purify requests run concurrently: their purifications share one batch (tendiff.batching), and
# attacks queue inside the pipeline.
PURIFY_CONCURRENCY = int(os.environ.get("TENDIFF_PURIFY_CONCURRENCY", "16"))
BUSY_FRAMES = 3  # intermediate frames a purification streams while others run too
SESSIONS = int(os.environ.get("TENDIFF_SESSIONS", "100"))  # visitors' sessions kept in memory
MAX_GIFS = 128  # GIFs kept in the app's temp folder (and as many run ZIPs, compare CSVs)
MAX_PNG_FOLDERS = 4000  # displayed PNGs kept in the app's temp folder
FRAME_INTERVAL = float(os.environ.get("TENDIFF_FRAME_INTERVAL", "0.1"))  # seconds between streamed frames
# Frames that compute faster than the eye are paced FRAME_INTERVAL apart, but never by more than
# STREAM_BUDGET seconds in all: pacing must not delay the final result (docs/performance.md, 'Why the code is shaped this way').
STREAM_BUDGET = float(os.environ.get("TENDIFF_STREAM_BUDGET", "0.25"))
DEFAULT_RUNS = 8  # purifications per input for the spread: one run alone is an anecdote
DEFAULT_T_MODE = "auto"  # (protocol.T_STAR_MODES)
NO_PREFILTER = "none"  # the classical step's "no step" choice (PurifySpec.prefilter None)
TRAINED_T = TrainConfig.t_max  # the purifiers never saw a deeper t
KNOWN, GUESSED = "true-class confidence", "confidence in the clean input's predicted class"  # what is tracked
RMSE = "RMSE to the clean image"
# The committed measurements the app shows beside a single run (written by tendiff.evaluate and
# scripts/sweep_t_star.py; read once: they change only with a commit).
# Committed evaluations, newest weights first: the campaign's noise columns, the full protocol, classical filters.
MEASURED = tuple(ROOT / "docs" / d / "results.json" for d in ("noise", ".", "classical"))
T_STAR_SWEEP = ROOT / "docs" / "t_star.json"
CSS = """
.pixelated img, img.pixelated, .gallery img, #input-image img { image-rendering: pixelated; }
#input-image img { width: 100% !important; height: 100% !important; object-fit: contain; }
#perturbation img { image-rendering: pixelated; }
#threat-line { font-weight: 600; }
#examples .grid-container { grid-template-columns: repeat(20, minmax(0, 1fr)) !important; }
#examples .caption-label { display: none; }
#compare-gallery .grid-container { grid-template-columns: repeat(6, minmax(0, 1fr)) !important; }
#title h1 { margin-bottom: 0; }
.captioned > label[data-testid="block-label"] { position: static !important; margin: 0 0 4px 0; }
.captioned .icon-button-wrapper { display: none !important; }
@media (max-width: 700px) {
  #examples .grid-container { grid-template-columns: repeat(5, minmax(0, 1fr)) !important; }
  #examples, #examples .grid-wrap { height: auto !important; }
  #compare-gallery .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
}
"""

studio = Studio()  # cheap: models load on first use


@functools.cache
def tmp_dir() -> Path:
    """The app's folder for displayed PNGs, GIFs, ZIPs and CSVs (made on first use)."""
    return Path(tempfile.mkdtemp(prefix="tendiff-studio-"))


# ------------------------------------------------------------------------ named views
class RunView(NamedTuple):
    """What /purify shows, in the order of its API outputs."""
    x_t: Any
    purified: Any
    progress: Any
    corrupted: Any
    clean_top: Any
    corrupted_top: Any
    purified_top: Any
    trajectory: Any
    strip: Any
    gif: Any
    perturbation: Any
    attack_sizes: Any
    run_zip: Any
    spread: Any
    spread_image: Any


class CorruptView(NamedTuple):
    corrupted: Any
    clean_top: Any
    corrupted_top: Any
    threat: Any


class CompareView(NamedTuple):
    compare_gallery: Any
    compare_table: Any
    compare_status: Any
    compare_csv: Any


class LayerView(NamedTuple):
    learn_model: Any
    learn_layer: Any
    layer_plot: Any
    layer_text: Any


class DatasetView(NamedTuple):
    """What switching the dataset changes: its examples, input, label, purifiers, strengths, t*."""
    examples: Any
    image: Any
    true_label: Any
    model: Any
    status: Any
    sigma: Any
    p: Any
    eps: Any
    t_star: Any
    draw_box: Any


class EvidenceView(NamedTuple):
    evidence_plot: Any
    t_star_plot: Any
    evidence_text: Any
    evidence_line: Any


class KindView(NamedTuple):
    sigma: Any
    p: Any
    attack_box: Any
    adaptive_box: Any
    surrogate: Any
    threat: Any


def view(cls, fill=None, **named):
    """A named view with the given fields and ``fill`` (None clears, gr.skip() keeps) elsewhere."""
    return cls(**{field: named.get(field, fill) for field in cls._fields})


def outputs(ui, cls) -> list:
    """The components a view updates, in its order."""
    return [getattr(ui, field) for field in cls._fields]


# --------------------------------------------------------------------------- helpers
def user_errors(fn):
    """Turn the pipeline's ValueErrors and missing checkpoints into gr.Error messages (an ordinary
    user error: no traceback in the server log)."""
    errors = (ValueError, CheckpointNotFoundError, CheckpointIntegrityError)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except errors as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


def named_errors(component, message: str | None = None):
    """Make a component's preprocessing failure a clear message that names it (Gradio's own says
    "Value 0 is less than minimum value 1." without saying which value), with no traceback in the
    server log. Patches the instance, once: a subclass defined here would make Gradio write an
    ``app.pyi`` stub next to this file."""
    if getattr(component, "_named_errors", False):
        return component
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error as exc:
            text = exc.message if message else f"{component.label}: {exc.message}"
            raise gr.Error(text, print_exception=False) from None
        except Exception as exc:
            text = message.format(type(exc).__name__) if message else f"{component.label}: {exc}"
            raise gr.Error(text, print_exception=False) from None

    component.preprocess = preprocess
    component._named_errors = True
    return component


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
    folder = tmp_dir() / "png" / hashlib.sha1(data).hexdigest()[:20]
    path = folder / f"{name}.png"
    with _png_lock:
        if path.exists():
            os.utime(folder)  # just used: the pruning below forgets the least recently used
            return str(path)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{name}.tmp"
        staging.write_bytes(data)
        staging.replace(path)
        folders = list((tmp_dir() / "png").iterdir())
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
           steps=DEFAULT_STEPS, t_mode="fixed", prefilter=NO_PREFILTER):
    corruption = CorruptionSpec(kind, sigma, p, eps, attack_steps, eot, surrogate)
    spec = PurifySpec(model or DEFAULT_MODEL, "auto" if adaptive_t_star(kind, t_mode) else t_star, steps, method, seed,
                      prefilter=None if prefilter in (None, "", NO_PREFILTER) else prefilter)
    return corruption, spec


def _input(dataset, image):
    check_dataset(dataset)
    if image is None:
        raise ValueError("pick an example or upload an image first")
    return prepare_image(image, dataset, studio.limits.upload)


# What "model input" says after an upload that could not be prepared (the error toast says why).
UNUSABLE_UPLOAD = "**This upload is not usable** (see the message). Upload another image or pick an example."


def noise_text(t_star, t_mode="fixed", corruption="gaussian") -> str:
    if adaptive_t_star(corruption, t_mode):
        why = "Auto, and this input is clean or noisy" if t_mode == "auto" else "Adaptive t\\*"
        return (f"**{why}**: the slider is set aside; " + ADAPTIVE_T_STAR.rule().replace("*", "\\*")
                + " The t\\* chosen is shown after Purify.")
    try:
        t = int(t_star)
        return (f"t* = {t} of T = {studio.num_timesteps}: the input is diffused to noise std "
                f"**{studio.noise_std(t):.3f}** (pixel units, images in [0, 1])"
                + (f" — beyond the t <= {TRAINED_T} the purifiers were trained on." if t > TRAINED_T else "."))
    except Exception:
        return ""


def t_mode_changed(t_star, t_mode, corruption):
    """The t* slider is idle while t* is chosen per input: greyed out, and its line says so."""
    return gr.update(interactive=not adaptive_t_star(corruption, t_mode)), noise_text(t_star, t_mode, corruption)


def prefilter_choices() -> list[tuple[str, str]]:
    return [("none", NO_PREFILTER)] + [(f"{m} ({CLASSICAL[m][1]})", m) for m in CLASSICAL if classical_available(m)]


def model_choices(labels) -> list[tuple[str, str]]:
    """Dropdown (shown, value) pairs: diffusion purifiers (ranks beyond the paper's R <= 4 say
    so), then the classical ones, marked as such."""
    return [(f"classical: {m} ({CLASSICAL[m][1]})" if m in CLASSICAL else purifier_title(m), m) for m in labels]


def corruption_choices() -> list[tuple[str, str]]:
    """The app's corruptions, named by their titles without the parenthesis (the threat line says more)."""
    return [(CORRUPTIONS[k].title.split(" (")[0], k) for k in APP_CORRUPTIONS]


def threat_text(corruption, eps=0.2, attack_steps=10, eot=1, surrogate=2, steps=DEFAULT_STEPS) -> str:
    try:
        spec = CorruptionSpec(corruption, eps=eps, attack_steps=attack_steps, eot=eot, surrogate_steps=surrogate)
        text = f"**{spec.threat}**"
        if corruption == "exact":  # (what the app's exact attack goes through, where it differs from the evaluation's)
            text += ("  \nHere: through the purifier, t*, sampler and steps chosen on this page; with adaptive t* "
                     "on, through the dataset's fixed t*.")
        if not CORRUPTIONS[corruption].random and corruption != "none":
            text += f"  \nCost: {spec.cost(int(steps))}"
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


_files_lock = threading.Lock()


def kept_file(path: Path, make, pattern: str, keep: int = MAX_GIFS) -> str:
    """``path``, written from ``make()`` unless it exists, and marked as just used; of the files
    matching ``pattern``, only the ``keep`` most recently used stay (concurrent requests: a file
    about to be served is the newest, never the one pruned)."""
    with _files_lock:
        if path.exists():
            os.utime(path)
            return str(path)
    data = make()  # (outside the lock: encoding takes a while)
    with _files_lock:
        _write(path, data)
        for old in sorted(tmp_dir().glob(pattern), key=lambda f: f.stat().st_mtime)[:-keep]:
            old.unlink(missing_ok=True)
    return str(path)


def _write(path: Path, data: bytes) -> str:
    """Write a file atomically (a client may be downloading the previous run's) and return its path."""
    staging = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    staging.write_bytes(data)
    staging.replace(path)
    return str(path)


def run_files(dataset, key, result, requested: PurifySpec, y, measures) -> tuple[str, str]:
    """The run's GIF and its ZIP (images, steps, GIF, run.json), written once per run and kept for a while."""
    tag = abs(hash(key))
    gif = Path(kept_file(tmp_dir() / f"purification_{tag}.gif", lambda: gif_bytes(result.frames), "purification_*.gif"))
    done = result.spec

    def archive() -> bytes:
        names = [checkpoint_name(dataset, "classifier")] + ([] if done.model in CLASSICAL else
                                                             [checkpoint_name(dataset, done.model)])
        entries = studio.manifest_entries()
        record = run_record(result, requested, y, measures, {n: entries.get(n, {}).get("sha256") for n in names})
        return run_zip(result, record, gif.read_bytes(), display_scale(result.clean, DISPLAY))

    name = f"tendiff_{dataset}_{done.label}_{result.corrupted.spec.kind}_seed{done.seed}_{tag % 10 ** 8}.zip"
    return str(gif), kept_file(tmp_dir() / name, archive, "tendiff_*.zip")


def csv_file(table: pd.DataFrame, name: str) -> str:
    """A table as a CSV file named ``name`` (plus a short content hash), for download."""
    data = table.to_csv(index=False).encode()
    return kept_file(tmp_dir() / f"{name}_{hashlib.sha1(data).hexdigest()[:8]}.csv", lambda: data, "*.csv")


def tracked(known: bool) -> str:
    """What the confidence curve follows: the true class, or (label unknown) the clean input's prediction."""
    return KNOWN if known else GUESSED


def _plot_frame(frames, known: bool) -> pd.DataFrame:
    rows = []
    for f in frames:
        rows.append({"step": f.index, "value": f.confidence, "series": tracked(known)})
        rows.append({"step": f.index, "value": f.distance, "series": RMSE})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- handlers
@user_errors
def prepare(dataset: str, image):
    """What the model sees: the input converted to the dataset's size and colour mode."""
    if image is None:  # the input was cleared
        return None, ""
    prepared = _input(dataset, image)
    warning = studio.unfamiliar(dataset, prepared.tensor)
    return show(prepared.tensor, "model_input"), prepared.message + (f"  \n**Warning:** {warning}" if warning else "")


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
def corrupt(dataset, image, true_label, corruption, sigma, p, eps, attack_steps, eot, surrogate, seed, model,
            t_star, method=DEFAULT_METHOD, steps=DEFAULT_STEPS, t_mode=DEFAULT_T_MODE,
            prefilter=NO_PREFILTER) -> CorruptView:
    """Corrupt the input (an attack through the purifier as Purify would run it: its sampler, steps,
    t* mode and classical step); returns the corrupted image, the clean and corrupted top classes and
    the threat model."""
    request, spec = _specs(corruption, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star, method, steps,
                           t_mode, prefilter)
    y, request, spec = studio.validate_request(dataset, true_label, request, spec)
    x = _input(dataset, image).tensor
    out = studio.corrupt_for(dataset, x, y, request, spec)
    return CorruptView(show(out.tensor, "corrupted"), label_dict(dataset, studio.probs(dataset, x)[0]),
                       label_dict(dataset, studio.probs(dataset, out.tensor)[0]),
                       threat_text(corruption, eps, attack_steps, eot, surrogate, spec.steps))


def _summary(result, cached: bool) -> str:
    done = result.spec
    how = (f"one pass of the classical {done.model} filter" if done.model in CLASSICAL else
           f"{done.steps} {done.method} step(s) from t* = {done.t_star} with {done.model}")
    how = f"the classical {done.prefilter} filter, then {how}" if done.prefilter else how
    return (f"Done: {how} in {result.seconds:.2f} s{' (cached)' if cached else ''}. "
            f"Purified prediction: {topk(result.dataset, result.probs_purified, 1)[0][0]}."
            + (f"  \n{result.t_star_note}" if result.t_star_note else ""))


def spread_text(dataset, spread, known: bool) -> str:
    """One paragraph: how several purifications of the same input ended."""
    names = CLASS_NAMES[dataset]
    if spread.deterministic:
        return "A classical filter is deterministic: every run gives the same result."
    what = f"true class {names[spread.tracked]}" if known else f"clean input's predicted class {names[spread.tracked]}"
    conf = torch.tensor(spread.confidences)
    return (f"**{spread.n} purifications** of the same corrupted input, fresh noise each ({spread.seconds:.2f} s): "
            f"read as the {what} in **{spread.agree}/{spread.n}**; its confidence {spread.mean:.2f} ± {spread.std:.2f} "
            f"(lowest {float(conf.min()):.2f}); majority vote **{names[spread.vote]}** ({spread.vote_share:.0%} of the "
            "votes). One run is one draw of the purifier's noise: trust the spread.")


def _spread_view(dataset, x, y, request, spec, runs) -> dict:
    if int(runs) <= 1:
        return dict(spread="One purification run (set more runs under More settings to see the spread).",
                    spread_image=None)
    spread = studio.spread(dataset, x, y, request, spec, runs)
    names = CLASS_NAMES[dataset]
    captions = [f"{names[p]} {c:.0%}" for p, c in zip(spread.predictions, spread.confidences)]
    return dict(spread=spread_text(dataset, spread, y is not None),
                spread_image=png_file(runs_image(spread.images, captions, scale=max(2, 96 // x.shape[-1])), "runs"))


def _final_view(dataset, x, y, corrupted, request, spec, result, cached, clean_probs, corrupted_probs,
                runs=1) -> RunView:
    """The last update of a run: every picture, number and file of it, and the spread over ``runs``."""
    measures = attack_measures(result)
    gif, archive = run_files(dataset, studio.run_key(dataset, x, y, request, spec), result, spec, y, measures)
    last, warning = result.frames[-1], studio.unfamiliar(dataset, x)
    return RunView(
        x_t=show(last.x_t, "x_t"), purified=show(last.pred_x0, "purified"),
        progress=_summary(result, cached) + (f"  \n**Warning:** {warning}" if warning else ""),
        corrupted=show(corrupted.tensor, "corrupted"), clean_top=clean_probs, corrupted_top=corrupted_probs,
        purified_top=label_dict(dataset, result.probs_purified), trajectory=_plot_frame(result.frames, y is not None),
        strip=png_file(strip_image(result.frames, scale=max(1, 84 // IMAGE_SHAPE[dataset][1])), "steps"), gif=gif,
        perturbation=png_file(perturbation_image(x, corrupted.tensor, display_scale(x, DISPLAY)), "perturbation"),
        attack_sizes=attack_text(measures), run_zip=archive, **_spread_view(dataset, x, y, request, spec, runs))


@user_errors
def purify(dataset, image, true_label, corruption, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star,
           method, steps, t_mode=DEFAULT_T_MODE, runs=DEFAULT_RUNS, prefilter=NO_PREFILTER):
    """Corrupt then purify, streaming x_t and the predicted clean image at every reverse step, then
    the spread over ``runs`` purifications (RunView updates)."""
    request, spec = _specs(corruption, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star, method, steps,
                           t_mode, prefilter)
    y, request, spec = studio.validate_request(dataset, true_label, request, spec)
    x = _input(dataset, image).tensor
    if request.kind in THROUGH_PURIFIER:  # can take a while: say so before it starts (one extra update)
        yield view(RunView, gr.skip(), progress=f"Running the adaptive attack first: {request.cost(spec.steps)}")
    corrupted = studio.corrupt_for(dataset, x, y, request, spec)
    clean_probs = label_dict(dataset, studio.probs(dataset, x)[0])
    corrupted_probs = label_dict(dataset, studio.probs(dataset, corrupted.tensor)[0])
    interval = min(FRAME_INTERVAL, STREAM_BUDGET / (spec.steps + 1))
    last, first = time.perf_counter(), True
    with _streams:
        stride = _streams.stride(spec.steps)
        for frame, result, cached in studio.run_stream(dataset, x, y, request, spec):
            if result is not None:
                yield _final_view(dataset, x, y, corrupted, request, spec, result, cached, clean_probs,
                                  corrupted_probs, runs)
                return
            if frame.index % stride == 0:
                yield _step_view(frame, cached, corrupted, clean_probs, corrupted_probs, first, interval, last)
                last, first = time.perf_counter(), False


class _Streams:
    """How many purifications stream now. A busy server streams fewer intermediate frames: every
    update costs the server more than the step it shows."""

    def __init__(self):
        self.active, self._lock = 0, threading.Lock()

    def __enter__(self):
        with self._lock:
            self.active += 1

    def __exit__(self, *exc):
        with self._lock:
            self.active -= 1

    def stride(self, steps: int) -> int:
        return 1 if self.active <= 1 else max(1, steps // BUSY_FRAMES)


_streams = _Streams()


def _step_view(frame, cached, corrupted, clean_probs, corrupted_probs, first, interval, last) -> RunView:
    """One streamed step (paced: frames faster than the eye are spread over STREAM_BUDGET)."""
    wait = interval - (time.perf_counter() - last)
    if wait > 0 and not first:  # (cached replays too: a replay streams like a run)
        time.sleep(wait)
    progress = (f"Step {frame.index}/{frame.num_steps} · t = {frame.t} · noise std {frame.noise_std:.3f} · "
                f"{'replayed from cache' if cached else f'{frame.seconds:.2f} s'}")
    step = dict(x_t=show(frame.x_t, "x_t"), purified=show(frame.pred_x0, "predicted_x0"), progress=progress)
    if first:  # the inputs' pictures once, and the last run's results cleared
        step.update(corrupted=show(corrupted.tensor, "corrupted"), clean_top=clean_probs,
                    corrupted_top=corrupted_probs)
    return view(RunView, None if first else gr.skip(), **step)


def _compare_columns(tracked_name: str) -> list[str]:
    return ["model", "prediction", "confidence", tracked_name, "runs right", "mean", "sd", "vote", "parameters",
            "compression", "seconds"]


def _compare_row(r, names) -> list:
    """One row of the comparison table; the spread columns empty when one run was made."""
    s = r.spread
    spread = ([f"{s.agree}/{s.n}", round(s.mean, 3), round(s.std, 3), f"{names[s.vote]} ({s.vote_share:.0%})"]
              if s is not None else [None] * 4)
    return ([r.model, r.prediction, round(r.confidence, 3), round(r.true_confidence, 3)] + spread
            + [r.parameters, round(r.compression, 2) if r.parameters else None, round(r.seconds, 3)])


@user_errors
def compare(dataset, image, true_label, corruption, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star,
            method, steps, t_mode=DEFAULT_T_MODE, runs=DEFAULT_RUNS, prefilter=NO_PREFILTER):
    """The same input, corruption and seed through every available purifier (after the classical
    step, if one is chosen), each also ``runs`` times for its spread (CompareView updates)."""
    request, spec = _specs(corruption, sigma, p, eps, attack_steps, eot, surrogate, seed, model, t_star, method, steps,
                           t_mode, prefilter)
    x = _input(dataset, image).tensor
    y, request, spec = studio.validate_request(dataset, true_label, request, spec)
    columns = _compare_columns(tracked(y is not None))
    corrupted = studio.corrupt_for(dataset, x, y, request, spec)  # (the same, cached, that every purifier gets)
    refs = _reference_rows(dataset, x, corrupted.tensor, y, len(columns))
    models = studio.available_purifiers(dataset)  # fixed now: a checkpoint added meanwhile joins the next run
    for rows in studio.compare(dataset, x, y, request, spec, models=models, runs=runs):
        gallery, table = [g for g, _ in refs], [row for _, row in refs]
        for r in rows:
            if not r.available:
                table.append([r.model, r.note] + [None] * (len(columns) - 2))
                continue
            size = "classical" if not r.parameters else f"{r.compression:.0f}x"
            gallery.append((show(r.image, r.model), f"{r.model}: {r.prediction} ({r.confidence:.0%}), {size}"))
            table.append(_compare_row(r, CLASS_NAMES[dataset]))
        status = (f"{len(rows)} of {len(models)} purifier(s) done; the same corrupted input and seed {spec.seed} "
                  f"for every one, each purified once for the picture and {runs} time(s) for the spread ('runs "
                  "right' of the tracked class, its mean confidence and sd, the majority vote). One image is still "
                  "an anecdote: the 1000-image numbers are in docs/results.md.")
        frame = pd.DataFrame(table, columns=columns)
        last = len(rows) == len(models)  # the final update carries the table as a CSV file
        yield CompareView(gallery, frame, status,
                          csv_file(frame, f"tendiff_compare_{dataset}_seed{spec.seed}") if last else None)


def _reference_rows(dataset, clean, corrupted, y, width) -> list[tuple]:
    """The comparison's two references, (gallery item, table row) each: the clean input and the
    corrupted one, classified with no purifier."""
    clean_probs = studio.probs(dataset, clean)[0]
    tracked_class = y if y is not None else int(clean_probs.argmax())
    out = []
    for name, short, img, probs in (("(clean input)", "clean", clean, clean_probs),
                                    ("(corrupted, no purifier)", "corrupted", corrupted,
                                     studio.probs(dataset, corrupted)[0])):
        pred, conf = topk(dataset, probs, 1)[0]
        out.append(((show(img, short), f"{name}: {pred} ({conf:.0%})"),
                    [name, pred, round(conf, 3), round(float(probs[tracked_class]), 3)] + [None] * (width - 4)))
    return out


def _tt_models(dataset) -> list[str]:
    return [m for m in studio.available_models(dataset) if m != "dense"]


def _formula(view: dict) -> str:
    """A layer's TT parameter formula with its numbers."""
    o, i, kh, kw = view["shape"]
    n = f"**{view['tt_parameters']:,}**"
    if view["layout"] == "tt":
        r1, r2, r3 = view["ranks"]
        return f"I·R1 + kh·R1·R2 + kw·R2·R3 + R3·O = {i}·{r1} + {kh}·{r1}·{r2} + {kw}·{r2}·{r3} + {r3}·{o} = {n}"
    if view["layout"] == "ttm":
        (r0, r1), ((c1, c2), (s1, s2)) = view["ranks"], (channel_modes(i), channel_modes(o))
        return (f"kh·kw·R0 + R0·c1·s1·R1 + R1·c2·s2 = {kh}·{kw}·{r0} + {r0}·{c1}·{s1}·{r1} + {r1}·{c2}·{s2}"
                f" = {n} (I = {c1}·{c2}, O = {s1}·{s2})")
    r0, r1 = view["ranks"]
    return f"O·I·r0 + r0·kh·r1 + r1·kw = {o}·{i}·{r0} + {r0}·{kh}·{r1} + {r1}·{kw} = {n}"


@user_errors
def learn_layer(dataset, model, layer=None) -> LayerView:
    """The TT cores of one layer and the kernel they rebuild next to the dense one."""
    available = _tt_models(check_dataset(dataset))
    if not available:
        raise CheckpointNotFoundError(f"{DATASET_TITLES[dataset]}: no TT purifier is trained yet")
    if not model:
        model = DEFAULT_MODEL if DEFAULT_MODEL in available else available[0]
    elif model not in available:
        raise ValueError(f"{model} is not trained for {DATASET_TITLES[dataset]}; choose one of {', '.join(available)}")
    net = studio.purifier(dataset, model)
    dense = studio.purifier(dataset, "dense") if "dense" in studio.available_models(dataset) else None
    layers = anatomy.layer_view(net, layer or None, dense, model)  # (an unknown layer: a message naming the layers)
    o, i, kh, kw = layers["shape"]
    err = (f"Relative distance to the dense kernel: **{layers['relative_error']:.3f}** (TT-SVD initialisation, then "
           "fine-tuning moves the cores)." if layers["relative_error"] is not None else "No dense checkpoint to compare.")
    text = (f"**{layers['layer']}** of {model}: kernel O x I x kh x kw = {o} x {i} x {kh} x {kw} = "
            f"{layers['dense_parameters']:,} dense weights; TT cores: {_formula(layers)} weights, "
            f"{layers['dense_parameters'] / layers['tt_parameters']:.1f}x fewer.  \n" + err)
    return LayerView(gr.update(choices=model_choices(available), value=model),
                     gr.update(choices=anatomy.layer_names(net), value=layers["layer"]),
                     png_file(layer_figure(layers), "cores"), text)


def learn_models(dataset) -> LayerView:
    """The Learn tab's lists for another dataset: its TT models, no layer chosen yet."""
    models = _tt_models(dataset)
    return LayerView(gr.update(choices=model_choices(models), value=DEFAULT_MODEL if DEFAULT_MODEL in models else None),
                     gr.update(choices=[], value=None), None, "")


@user_errors
def learn_params(dataset, rank):
    """The parameter formula as the rank changes, for one of the model's 3x3 layers and the whole U-Net."""
    check_dataset(dataset)
    r = int(rank)
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank must be in 1..{MAX_RANK}, got {r}")
    c = preset(dataset).channels[0]
    a, b = channel_modes(c)
    dense = c * c * 9
    tt, ttm, au = (tt_param_count(c, c, 3, r, layout, bias=False) for layout in ("tt", "ttm", "authors"))
    text = (f"One of the U-Net's {c} -> {c} 3x3 convolutions at rank R = {r}:  \n"
            f"- dense: O·I·k·k = {c}·{c}·9 = **{dense:,}**  \n"
            f"- TT (one core per mode): I·R + 3R² + 3R² + R·O = {c}·{r} + 3·{r * r} + 3·{r * r} + {r}·{c} = **{tt:,}** "
            f"({dense / tt:.0f}x fewer; linear in the channels)  \n"
            f"- TT-matrix ({c} = {a}·{b} channels each side): 9R + R·{a}·{a}·R + R·{b}·{b} = 9·{r} + {a * a}·{r * r} + "
            f"{b * b}·{r} = **{ttm:,}** ({dense / ttm:.0f}x fewer; O(N R²))  \n"
            f"- authors' layout: O·I·R + 3R² + 3R = {c * c}·{r} + 3·{r * r} + 3·{r} = **{au:,}** "
            f"({dense / au:.1f}x fewer; still quadratic in the channels)")
    figure = params_figure(anatomy.parameter_table(dataset, range(1, MAX_RANK + 1)), r, PAPER_MAX_RANK)
    return text, png_file(figure, "parameters")


def learn_schedule(t_star):
    """The noise std over t, with t* marked."""
    stds = [studio.noise_std(t) for t in range(1, studio.num_timesteps + 1)]
    try:
        t_star = int(t_star)
    except (TypeError, ValueError):
        t_star = None
    return png_file(schedule_figure(stds, t_star, trained_to=TRAINED_T), "schedule"), noise_text(t_star)


@user_errors
def guidance(dataset, image, true_label, t_star, seed):
    """The guidance lesson: a class-conditional purifier guided with no label, the true label, a wrong label.
    The text reads the run's own predictions (it says what happened, not what should)."""
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
    return gallery, guidance_text(out)


def guidance_text(out: dict) -> str:
    """What the guidance run showed, from its predictions: which label each purification ended on."""
    lines = [f"- {name}: purified image read as **{preds[0][0]}** ({preds[0][1]:.0%})" for name, (_, preds) in out.items()]
    (_, (_, free)), (true_name, (_, led)), (wrong_name, (_, misled)) = out.items()
    followed = [name.endswith(" " + preds[0][0]) for name, preds in ((true_name, led), (wrong_name, misled))]
    verdict = {(True, True): "Both labels were obeyed: the guided purifier turns the image into whatever class it is "
                             "told, so a guided defense is told the answer and its accuracy says nothing about robustness.",
               (True, False): "The true label was obeyed, the wrong one was not on this image and seed: guidance "
                              "helps most when it agrees with the image, and a defense told the true label still "
                              "cheats.",
               (False, True): "The wrong label was obeyed and the true one was not: guidance can overrule the image.",
               (False, False): "Neither label decided the outcome on this image and seed."}[tuple(followed)]
    return "\n".join(lines) + f"\n\n{verdict} Without a label (a fair defense) it was read as **{free[0][0]}**."


@functools.cache
def measured(dataset: str) -> tuple[dict, ...]:
    """The dataset's committed evaluations: diffusion purifiers first, then classical filters."""
    return tuple(r for path in MEASURED if path.exists() for r in read_results(path) if r["config"]["dataset"] == dataset)


@functools.cache
def swept(dataset: str) -> tuple[dict, ...]:
    """The dataset's rows of the committed t* sweep made with the protocol's sampler."""
    rows = json.loads(T_STAR_SWEEP.read_text())["rows"] if T_STAR_SWEEP.exists() else []
    return tuple(r for r in rows if r["dataset"] == dataset and r.get("method", "ddim") == DEFAULT_METHOD)


def _measured_cells(dataset: str, corruption: str, variant: str | None = None, prefilter: str | None = None,
                    runs: tuple[dict, ...] | None = None) -> tuple[list[dict], list[dict], dict | None]:
    """(diffusion points, lines for no purifier and classical filters, the evaluation's config) of
    one corruption; each purifier from the first evaluation that measured it (of ``runs``, default
    :func:`measured`; ``run``: its index there; ``variant``, e.g. "/adaptive-t", and hybrids with
    the classical step ``prefilter``: their rows too). A point says whether it was measured with the
    weights now committed (``current``: True, False, or None when unknown)."""
    points, lines, seen, config = [], [], set(), None
    shas = {name: e.get("sha256") for name, e in studio.manifest_entries().items()}
    for run, res in enumerate(measured(dataset) if runs is None else runs):
        costs = {c["purifier"]: c for c in res["costs"]}
        for cell in res["cells"]:
            name = cell["purifier"]
            pre, _, base = name.rpartition("+")
            plain = "/" not in base or (variant and base.count("/") == 1 and base.endswith(variant))
            if cell["corruption"] != corruption or name in seen or not plain or (pre and pre != prefilter):
                continue
            seen.add(name)
            config = config or {**res["config"], "date": res.get("date", "?")}
            cost = costs.get(name, {})
            entry = {"name": name, "accuracy": cell["accuracy"], "ci95": cell["ci95"], "n": cell["n"],
                     "date": res.get("date", "?"), "run": run,
                     # (no weights of its own: only the classifier's, which the campaign does not retrain)
                     "current": True if not cost.get("parameters") else
                     (cost["sha256"] == shas.get(cost["file"])) if "sha256" in cost else None}
            if cost.get("parameters"):
                points.append({**entry, "parameters": cost["parameters"]})
            else:
                lines.append(entry)
    return points, lines, config


def _best_classical(lines: list[dict]) -> dict | None:
    classical = [r for r in lines if r["name"] in CLASSICAL]
    return max(classical, key=lambda r: r["accuracy"]) if classical else None


def evidence_text(dataset: str, corruption: str, model: str, adaptive: bool = False, prefilter: str | None = None
                  ) -> str:
    """One line: what the committed evaluation measured for this purifier and corruption (with
    the adaptive t*: its ``<model>/adaptive-t`` row; after a classical step: ``<step>+<model>``)."""
    variant = "/adaptive-t" if adaptive else None
    points, lines, _ = _measured_cells(dataset, corruption, variant, prefilter)
    model = f"{prefilter}+{model}" if prefilter else model
    rows = {r["name"]: r for r in points + lines}
    unmeasured = ""
    if adaptive and model.rpartition("+")[2] not in CLASSICAL:
        if f"{model}/adaptive-t" in rows:
            model = f"{model}/adaptive-t"
        else:
            unmeasured = f" (at the fixed t*: {model} with the adaptive t* is not measured yet)"
    if model not in rows:
        return (f"No committed measurement of {model} on {CORRUPTIONS[corruption].short} for "
                f"{DATASET_TITLES[dataset]} yet (docs/results.md).")
    mine = rows[model]
    # (its comparisons from the same evaluation: the same images, runs and noise draws)
    _, lines, config = _measured_cells(dataset, corruption, variant, prefilter, runs=(measured(dataset)[mine["run"]],))
    same, best = {r["name"]: r for r in lines}, _best_classical(lines)
    strength = config.get("strength", {}).get(corruption)
    fresh = {True: "", None: f" (measured {mine['date']}, possibly with earlier weights)",
             False: f" (measured {mine['date']} with earlier weights: re-run tendiff.evaluate)"}[mine["current"]]
    at = f" ({CORRUPTIONS[corruption].short} at {strength:g})" if strength else ""
    return (f"**On {mine['n']} test images**{at}: **{model} "
            f"{100 * mine['accuracy']:.1f}%** (95% CI {100 * mine['ci95'][0]:.1f}–{100 * mine['ci95'][1]:.1f})"
            + (f" · no purifier {100 * same['none']['accuracy']:.1f}%" if "none" in same else "")
            + (f" · best classical {best['name']} {100 * best['accuracy']:.1f}%" if best else "") + fresh
            + unmeasured + ". Details: Compare tab, docs/results.md.")


def evidence(dataset, corruption, model, t_star, t_mode=DEFAULT_T_MODE, prefilter=NO_PREFILTER):
    """The committed measurements around the current choice: accuracy against parameters and
    against t*, the chosen purifier marked, and the line for the Purify tab."""
    check_dataset(dataset)
    prefilter = None if prefilter in (None, "", NO_PREFILTER) else prefilter
    points, lines, config = _measured_cells(dataset, corruption, prefilter=prefilter)
    label = f"{prefilter}+{model}" if prefilter else model
    title = CORRUPTIONS[corruption].short
    best = _best_classical(lines)
    lines = [r for r in lines if r["name"] in ("none", label) or r is best]  # a readable few
    params = (png_file(evidence_figure(points, lines, label, f"{DATASET_TITLES[dataset]}, {title}: accuracy on "
                                       f"{config['n']} test images, measured {config['date']}"), "evidence")
              if config else None)
    rows = [r for r in swept(dataset) if corruption in r["accuracy"]]
    sweep = (png_file(t_star_figure(rows, corruption, model, int(t_star), f"{DATASET_TITLES[dataset]}, {title}: "
                                    f"accuracy against t* on {rows[0]['n']} held-out images"), "t_star")
             if rows else None)
    text = evidence_text(dataset, corruption, model, adaptive_t_star(corruption, t_mode), prefilter)
    return EvidenceView(params, sweep, text + ("" if rows else "  \nNo t* sweep committed for this dataset yet "
                                               "(scripts/sweep_t_star.py --out docs/t_star.json)."), text)


def dataset_changed(dataset) -> DatasetView:
    check_dataset(dataset)
    ex = examples(dataset)
    models = studio.available_purifiers(dataset)
    model = DEFAULT_MODEL if DEFAULT_MODEL in models else (models[0] if models else None)
    first = ex[0][0] if ex else None
    strength = STRENGTH[dataset]  # the protocol's strengths for this dataset (e.g. eps 8/255 on CIFAR-10)
    return DatasetView(
        examples=gr.update(value=ex), image=gr.update(value=first),
        true_label=gr.update(choices=[UNKNOWN] + CLASS_NAMES[dataset], value=label_from_path(dataset, first) or UNKNOWN),
        model=gr.update(choices=model_choices(models), value=model), status=studio.status(dataset),
        sigma=strength["gaussian"], p=strength["salt_pepper"], eps=round(strength["pgd_linf"], 3),
        t_star=T_STAR[dataset], draw_box=gr.update(visible=dataset in CENTRING))  # drawings: gray datasets only


def example_selected(dataset, evt: gr.SelectData):
    path = examples(dataset)[evt.index][0]
    return path, label_from_path(dataset, path) or UNKNOWN


def kind_changed(corruption, eps, attack_steps, eot, surrogate, steps=DEFAULT_STEPS) -> KindView:
    attack = corruption == "pgd_linf" or corruption in THROUGH_PURIFIER
    return KindView(gr.update(visible=corruption == "gaussian"), gr.update(visible=corruption == "salt_pepper"),
                    gr.update(visible=attack), gr.update(visible=corruption in THROUGH_PURIFIER),
                    gr.update(visible=corruption == "adaptive"),
                    threat_text(corruption, eps, attack_steps, eot, surrogate, steps))


def stopped(progress: str | None = None) -> str:
    """Said after Stop, with the step the run had reached (from the progress line it replaces)."""
    reached = (progress or "").split(" · ")[0]
    where = f" at {reached[0].lower()}{reached[1:]}" if reached.startswith("Step") else ""
    return f"Stopped{where}: the run was cancelled; change a setting or press Purify again."


API_DOC = "```python\n" + __doc__.split("::\n\n", 1)[1].split("\n\nThe inputs")[0].replace("\n    ", "\n").strip() + "\n```\n\n" \
          + "The inputs" + __doc__.split("\n\nThe inputs", 1)[1]

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


# --------------------------------------------------------------------------- the page
def header(ui) -> None:
    with gr.Row(equal_height=True):
        gr.Markdown("# TendiffPure Studio\nDiffusion purification with tensor-train compressed U-Nets: corrupt an "
                    "image, let a small diffusion model wash the corruption out, and see what the classifier says.",
                    elem_id="title")
        ui.dataset = gr.Radio([(DATASET_TITLES[d], d) for d in DATASETS], value=DEFAULT_DATASET, label="Dataset",
                              elem_id="dataset", min_width=380)
    ui.status = gr.Markdown(studio.status(DEFAULT_DATASET), elem_id="status-line", label="status")


def input_panel(ui) -> None:
    """The input: dataset, examples, upload or drawing, true label, and what the model sees."""
    ds, default_image = DEFAULT_DATASET, str(ASSETS / DEFAULT_EXAMPLE)
    ui.image = named_errors(gr.Image(
        value=default_image, type="filepath", image_mode=None, format="png", sources=["upload", "clipboard"],
        label="Input image (an example, or upload any image)", height=200, elem_id="input-image",
        elem_classes=["pixelated", "captioned"]),
        "The upload could not be read as an image ({}); upload a PNG or JPEG.")
    ui.true_label = gr.Dropdown([UNKNOWN] + CLASS_NAMES[ds], value=label_from_path(ds, default_image),
                                label="True label", elem_id="true-label",
                                # The choices follow the dataset in the browser, but an API call sees the
                                # initial (MNIST) list: the pipeline checks the label against the request's dataset.
                                allow_custom_value=True)
    with gr.Accordion("Draw your own", open=False, elem_id="draw", visible=ds in CENTRING) as ui.draw_box:
        # Black ink on white paper: prepare_image inverts it, then centres and scales it.
        ui.sketch = gr.Sketchpad(
            label="Draw with the mouse", show_label=False, type="numpy", image_mode="L", format="png",
            canvas_size=(280, 280), fixed_canvas=True, height=320,
            brush=gr.Brush(default_size=22, colors=["#000000"], color_mode="fixed"), layers=False, transforms=(),
            elem_id="sketch")
        ui.drawn = gr.State(None)  # the hash of the drawing last made the input


def settings_panel(ui) -> None:
    """Corruption and purifier, the Purify button near the top; the finer settings under it."""
    strength, limits = STRENGTH[DEFAULT_DATASET], studio.limits
    models = studio.available_purifiers(DEFAULT_DATASET)
    ui.kind = gr.Dropdown(corruption_choices(), value="gaussian", label="Corruption", elem_id="corruption")
    ui.sigma = gr.Slider(0, 1, strength["gaussian"], step=0.01, label="Gaussian sigma")
    ui.p = gr.Slider(0, 1, strength["salt_pepper"], step=0.01, label="Salt-and-pepper p", visible=False)
    with gr.Group(visible=False) as ui.attack_box:
        ui.eps = gr.Slider(0, 0.5, strength["pgd_linf"], step=0.001, label="eps (L-inf, pixel units; 8/255 = 0.031)")
        ui.attack_steps = gr.Slider(1, limits.max_attack_steps, 10, step=1, label=(
            f"Attack steps (through the purifier: at most {limits.max_adaptive_steps})"))
    with gr.Group(visible=False) as ui.adaptive_box:
        ui.eot = gr.Slider(1, limits.max_eot, 1, step=1, label="EOT samples")
        ui.surrogate = gr.Slider(1, limits.max_surrogate_steps, 2, step=1, label="Surrogate DDIM steps")
    ui.threat = gr.Markdown(threat_text("gaussian"), elem_id="threat-line", label="threat model")
    # (custom values: the API takes any dataset's purifiers, not only the first dataset's; the pipeline checks them)
    ui.model = gr.Dropdown(model_choices(models), value=DEFAULT_MODEL if DEFAULT_MODEL in models else None,
                           label="Purifier (dense, TT or classical)", elem_id="model", allow_custom_value=True)
    ui.t_star = gr.Slider(1, studio.num_timesteps, DEFAULT_T_STAR, step=1, label="t* (diffusion depth)",
                          elem_id="t-star", interactive=not adaptive_t_star("gaussian", DEFAULT_T_MODE))
    with gr.Row():
        ui.purify_btn = gr.Button("Purify", variant="primary", elem_id="purify-btn", scale=2)
        ui.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
    ui.t_mode = gr.Radio([(title, mode) for mode, title in T_STAR_MODES.items()], value=DEFAULT_T_MODE, elem_id="t-mode",
                         label="t* mode (adaptive: the input's estimated noise counts toward t*'s)")
    ui.t_text = gr.Markdown(noise_text(DEFAULT_T_STAR, DEFAULT_T_MODE, "gaussian"))
    # (below the Purify button: the button stays above the fold at 1366x900)
    ui.prefilter = gr.Dropdown(prefilter_choices(), value=NO_PREFILTER, elem_id="prefilter",
                               label="Classical step first (a hybrid: this filter, then the purifier)")
    with gr.Accordion("More settings: sampler, steps, seed", open=False, elem_id="more-settings"):
        ui.method = gr.Radio(list(METHODS), value=DEFAULT_METHOD, label="Sampler", elem_id="method")
        ui.steps = gr.Slider(1, limits.max_reverse_steps, DEFAULT_STEPS, step=1,
                             label="Reverse steps (one-step ignores this)", elem_id="steps")
        ui.seed = gr.Number(0, precision=0, minimum=0, label="Seed (noise, attack start, purification)",
                            elem_id="seed")
        ui.runs = gr.Slider(1, limits.max_runs, DEFAULT_RUNS, step=1, elem_id="runs",
                            label="Purification runs for the spread (one batch; 1 = the shown run only)")
        ui.corrupt_btn = gr.Button("Corrupt only (no purification)", elem_id="corrupt-btn", size="sm")


def result_panel(ui) -> None:
    """The result beside the settings: corrupted, x_t, purified, and the three predictions."""
    with gr.Row():
        picture = dict(format="png", interactive=False, height=175, min_width=100, elem_classes=["captioned"])
        ui.corrupted = gr.Image(label="Corrupted image", elem_id="corrupted", **picture)
        ui.x_t = gr.Image(label="Diffused x_t", elem_id="x-t", **picture)
        ui.purified = gr.Image(label="Purified image", elem_id="pred-x0", **picture)
    ui.progress = gr.Markdown(elem_id="progress", label="progress")
    with gr.Row():
        top3 = dict(num_top_classes=3, min_width=110)
        ui.clean_top = gr.Label(label="Clean", elem_id="pred-clean", **top3)
        ui.corrupted_top = gr.Label(label="Corrupted", elem_id="pred-corrupted", **top3)
        ui.purified_top = gr.Label(label="Purified", elem_id="pred-purified", **top3)
    ui.spread = gr.Markdown(elem_id="spread", label="spread over runs")
    ui.evidence_line = gr.Markdown(elem_id="evidence-line", label="measured")
    ui.seen = gr.Image(label="What the model sees", format="png", interactive=False, height=150,
                       elem_id="model-view", elem_classes=["captioned"])
    ui.seen_msg = gr.Markdown(elem_id="prepare-message", label="model input")


def details_panel(ui) -> None:
    """Below the fold: the run step by step, the perturbation, and downloads."""
    gr.Markdown("### The run step by step")
    with gr.Row(equal_height=True):
        ui.trajectory = gr.LinePlot(
            x="step", y="value", color="series", y_lim=[0, 1], height=280, scale=2, elem_id="trajectory",
            label="Along the reverse steps: confidence (blue; the true class, or the clean input's predicted class "
                  "when the label is unknown) and RMSE to the clean image (orange)",
            color_map={KNOWN: "#1f77b4", GUESSED: "#1f77b4", RMSE: "#ff7f0e"})
        ui.perturbation = gr.Image(label="Perturbation, amplified", format="png", interactive=False, height=220,
                                   scale=1, min_width=180, elem_id="perturbation", elem_classes=["captioned"])
    ui.strip = gr.Image(label="Steps: x_t (top), predicted clean image (bottom)", format="png", interactive=False,
                        height=220, elem_id="strip", elem_classes=["captioned"])
    ui.spread_image = gr.Image(label="The same input purified again and again (fresh noise): each run's prediction",
                               format="png", interactive=False, height=220, elem_id="spread-image", elem_classes=["captioned"])
    ui.attack_sizes = gr.Markdown(elem_id="attack-line", label="perturbation sizes")
    with gr.Row():
        ui.gif = gr.File(label="GIF of the run", height=90, elem_id="gif")
        ui.run_zip = gr.File(label="The run as a ZIP: PNGs (native and enlarged), steps, GIF, run.json (settings, "
                                   "seed, t*, predictions, sizes)", height=90, elem_id="run-zip")


def purify_tab(ui) -> None:
    ui.examples = gr.Gallery(value=examples(DEFAULT_DATASET), label="Examples (click one): two per class", columns=20,
                             height=128, object_fit="contain", allow_preview=False, format="png", elem_id="examples",
                             elem_classes=["pixelated", "captioned"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=260):
            input_panel(ui)
        with gr.Column(scale=4, min_width=280):
            settings_panel(ui)
        with gr.Column(scale=5, min_width=320):
            result_panel(ui)
    details_panel(ui)


def compare_tab(ui) -> None:
    gr.Markdown("### What the committed evaluation measured\nFor the dataset, corruption and purifier chosen on the "
                "Purify tab (marked in red): accuracy on 1000 test images against each purifier's size, and "
                "against t* on held-out images.")
    with gr.Row():
        ui.evidence_plot = gr.Image(label="Accuracy against parameters", format="png", interactive=False,
                                    elem_id="evidence-plot", elem_classes=["captioned"])
        ui.t_star_plot = gr.Image(label="Accuracy against t*", format="png", interactive=False, elem_id="t-star-plot", elem_classes=["captioned"])
    ui.evidence_text = gr.Markdown(elem_id="evidence-text", label="measured")
    gr.Markdown("### This input through every purifier")
    gr.Markdown("Runs the input, corruption, t*, sampler, steps and seed set on the Purify tab through every "
                "purifier: dense, every TT rank and layout, and the classical filters. Compression is the dense "
                "U-Net's parameter count over the model's; seconds are the measured purification time here.")
    with gr.Row():
        ui.compare_btn = gr.Button("Compare every purifier", variant="primary", elem_id="compare-btn")
        ui.compare_stop = gr.Button("Stop", variant="stop")
    ui.compare_status = gr.Markdown(elem_id="compare-status", label="status")
    ui.compare_gallery = gr.Gallery(label="Purified by each purifier", columns=6, height=320, format="png",
                                    allow_preview=False, elem_id="compare-gallery", elem_classes=["pixelated"])
    ui.compare_table = gr.Dataframe(label="Results", elem_id="compare-table", interactive=False)
    ui.compare_csv = gr.File(label="The table as CSV", elem_id="compare-csv")


def learn_tab(ui) -> None:
    gr.Markdown("### Tensor-train cores\nEach 3x3 convolution kernel W[o, i, a, b] of a TT purifier is "
                "stored as small cores, one per mode, and rebuilt as their contraction.")
    with gr.Row():
        tt_models = _tt_models(DEFAULT_DATASET)
        # (custom values: an API call may name another dataset's model; learn_layer checks it)
        ui.learn_model = gr.Dropdown(model_choices(tt_models), label="TT model", allow_custom_value=True,
                                     value=DEFAULT_MODEL if DEFAULT_MODEL in tt_models else None)
        ui.learn_layer = gr.Dropdown([], label="Layer", allow_custom_value=True)
        ui.learn_btn = gr.Button("Show cores", elem_id="learn-btn")
    ui.layer_plot = gr.Image(label="Cores and kernels", format="png", interactive=False, elem_id="layer-plot", elem_classes=["captioned"])
    ui.layer_text = gr.Markdown(label="layer")
    gr.Markdown("### Parameters as the rank changes")
    ui.rank = gr.Slider(1, MAX_RANK, 2, step=1, label="Rank R")
    ui.params_text = gr.Markdown(label="formula")
    ui.params_plot = gr.Image(label="Whole U-Net parameters by layout and rank", format="png", interactive=False,
                              elem_id="params-plot", elem_classes=["captioned"])
    gr.Markdown("### Noise std over t")
    ui.schedule_plot = gr.Image(label="Noise schedule", format="png", interactive=False, elem_id="schedule-plot", elem_classes=["captioned"])
    ui.schedule_text = gr.Markdown(elem_id="schedule-text", label="t*")
    gr.Markdown("### The guidance lesson\nThe authors guide the purifier with the label. Compare the input purified "
                "by a class-conditional purifier with no label, the true label and a wrong label (uses the Purify "
                "tab's input, t* and seed).")
    ui.guide_btn = gr.Button("Run the guidance lesson", elem_id="guide-btn")
    ui.guide_gallery = gr.Gallery(label="No label / true label / wrong label", columns=3, height="auto", format="png",
                                  elem_id="guide-gallery",
                                  object_fit="contain", allow_preview=False, elem_classes=["pixelated"])
    ui.guide_text = gr.Markdown(elem_id="guide-text", label="what the run showed")


def wire_input(ui) -> None:
    """The input is prepared once per user action (upload, example, drawing, dataset). Not on
    image.change: the browser fires that two or three times for one upload, and a bad upload then
    showed its error toast as many times."""
    light = dict(concurrency_id="light", concurrency_limit=4)
    private = dict(api_visibility="private", queue=False)
    seen = [ui.seen, ui.seen_msg]
    cleared = outputs(ui, RunView)  # the previous dataset's or input's results
    ui.dataset.change(lambda ds: dataset_changed(ds) + (None,) * len(cleared), ui.dataset,
                      outputs(ui, DatasetView) + cleared, **private).then(
        prepare, [ui.dataset, ui.image], seen, api_name="prepare_dataset_default", api_visibility="private", **light)
    ui.examples.select(example_selected, ui.dataset, [ui.image, ui.true_label], **private).then(
        prepare, [ui.dataset, ui.image], seen, api_name="prepare_example", api_visibility="private", **light)
    ui.image.upload(lambda: UNKNOWN, None, ui.true_label, **private)  # an upload's label is unknown
    # A failed upload leaves no stale input behind: the image and its label are cleared too.
    ui.image.upload(prepare, [ui.dataset, ui.image], seen, api_name="prepare", **light).failure(
        lambda: (None, UNUSABLE_UPLOAD, None, UNKNOWN), None, seen + [ui.image, ui.true_label], **private)
    ui.image.clear(lambda: (None, "No input image: upload one or pick an example."), None, seen, **private)
    ui.image.change(lambda: (None,) * len(cleared), None, cleared, **private)  # new input: old results go
    ui.draw_box.expand(None, js=PICK_BRUSH)  # the sketchpad opens with its brush in hand
    # A drawing takes the upload's path: it becomes the input image, the label unknown, then prepared.
    ui.sketch.change(use_drawing, [ui.sketch, ui.drawn], [ui.image, ui.true_label, ui.drawn], api_name="use_drawing",
                     api_visibility="private", **light).success(
        prepare, [ui.dataset, ui.image], seen, api_name="prepare_drawing", api_visibility="private", **light)
    kind_inputs = [ui.kind, ui.eps, ui.attack_steps, ui.eot, ui.surrogate, ui.steps]
    ui.kind.change(kind_changed, kind_inputs, outputs(ui, KindView), **private)
    for c in (ui.eps, ui.attack_steps, ui.eot, ui.surrogate, ui.steps):
        c.release(threat_text, kind_inputs, ui.threat, **private)
    ui.t_star.change(noise_text, [ui.t_star, ui.t_mode, ui.kind], ui.t_text, **private)
    for c in (ui.t_mode, ui.kind):
        c.change(t_mode_changed, [ui.t_star, ui.t_mode, ui.kind], [ui.t_star, ui.t_text], **private)


def run_inputs(ui) -> list:
    return [ui.dataset, ui.image, ui.true_label, ui.kind, ui.sigma, ui.p, ui.eps, ui.attack_steps, ui.eot,
            ui.surrogate, ui.seed, ui.model, ui.t_star]


def wire_runs(ui, demo) -> list:
    """Corrupt, purify (also once on load: the first visit shows a result) and compare; returns the events."""
    heavy = dict(concurrency_id="heavy", concurrency_limit=HEAVY_CONCURRENCY, time_limit=600)
    batched = dict(concurrency_id="purify", concurrency_limit=PURIFY_CONCURRENCY, time_limit=600)
    inputs = run_inputs(ui) + [ui.method, ui.steps, ui.t_mode, ui.runs, ui.prefilter]
    corrupt_outputs = outputs(ui, CorruptView)
    ui.corrupt_btn.click(lambda: (None,) * len(RunView._fields), None, outputs(ui, RunView), api_visibility="private",
                         queue=False)
    events = [ui.corrupt_btn.click(corrupt, run_inputs(ui) + [ui.method, ui.steps, ui.t_mode, ui.prefilter],
                                   corrupt_outputs, api_name="corrupt",
                                   show_progress="minimal", **heavy),
              ui.purify_btn.click(purify, inputs, outputs(ui, RunView), api_name="purify", show_progress="hidden",
                                  **batched),
              demo.load(purify, inputs, outputs(ui, RunView), api_name="initial_purify", api_visibility="private",
                        show_progress="hidden", **batched),
              ui.compare_btn.click(compare, inputs, outputs(ui, CompareView), api_name="compare",
                                   show_progress="minimal", **heavy)]
    demo.load(prepare, [ui.dataset, ui.image], [ui.seen, ui.seen_msg], api_name="initial_prepare",
              api_visibility="private")
    return events


def wire_learn(ui, demo) -> list:
    heavy = dict(concurrency_id="heavy", concurrency_limit=HEAVY_CONCURRENCY, time_limit=600)
    params, schedule = [ui.params_text, ui.params_plot], [ui.schedule_plot, ui.schedule_text]
    demo.load(learn_params, [ui.dataset, ui.rank], params, api_name="initial_params", api_visibility="private")
    demo.load(learn_schedule, ui.t_star, schedule, api_name="initial_schedule", api_visibility="private")
    # The dataset's t* moves the slider: the schedule plot follows it; its TT models fill the Learn list.
    ui.dataset.change(learn_schedule, ui.t_star, schedule, api_name="dataset_schedule", api_visibility="private")
    ui.t_star.release(learn_schedule, ui.t_star, schedule, api_name="learn_schedule")
    ui.rank.release(learn_params, [ui.dataset, ui.rank], params, api_name="learn_params")
    # The cores show as soon as the tab opens, and follow the model and layer picked (user input
    # only: learn_layer itself updates both lists); another dataset brings its own TT models.
    layer_inputs, private = [ui.dataset, ui.learn_model, ui.learn_layer], dict(api_visibility="private", **heavy)
    ui.learn_tab.select(learn_layer, layer_inputs, outputs(ui, LayerView), api_name="learn_tab", **private)
    ui.learn_model.input(learn_layer, [ui.dataset, ui.learn_model], outputs(ui, LayerView), api_name="learn_model",
                         **private)
    ui.learn_layer.input(learn_layer, layer_inputs, outputs(ui, LayerView), api_name="learn_pick_layer", **private)
    ui.dataset.change(learn_models, ui.dataset, outputs(ui, LayerView), api_name="learn_models",
                      api_visibility="private", queue=False)
    ui.dataset.change(learn_params, [ui.dataset, ui.rank], params, api_name="dataset_params", api_visibility="private")
    return [ui.learn_btn.click(learn_layer, [ui.dataset, ui.learn_model, ui.learn_layer], outputs(ui, LayerView),
                               api_name="learn_layer", **heavy),
            ui.guide_btn.click(guidance, [ui.dataset, ui.image, ui.true_label, ui.t_star, ui.seed],
                               [ui.guide_gallery, ui.guide_text], api_name="guidance", **heavy)]


def wire_evidence(ui, demo) -> None:
    """The measured numbers follow the dataset, corruption, purifier and t* chosen."""
    args = dict(fn=evidence, inputs=[ui.dataset, ui.kind, ui.model, ui.t_star, ui.t_mode, ui.prefilter],
                outputs=outputs(ui, EvidenceView),
                api_visibility="private", concurrency_id="light", concurrency_limit=4)
    demo.load(**args, api_name="initial_evidence")
    ui.kind.input(**args, api_name="corruption_evidence")
    ui.model.input(**args, api_name="model_evidence")
    ui.t_star.release(**args, api_name="t_star_evidence")
    ui.t_mode.input(**args, api_name="t_mode_evidence")
    ui.prefilter.input(**args, api_name="prefilter_evidence")
    ui.dataset.change(**args, api_name="dataset_evidence")


def build_demo() -> gr.Blocks:
    ui = SimpleNamespace()
    with gr.Blocks(title="TendiffPure Studio", delete_cache=(3600, 3600)) as demo:
        header(ui)
        with gr.Tabs():
            with gr.Tab("Purify", id="purify"):
                purify_tab(ui)
            with gr.Tab("Compare purifiers", id="compare"):
                compare_tab(ui)
            with gr.Tab("Learn", id="learn") as ui.learn_tab:
                learn_tab(ui)
            with gr.Tab("API", id="api"):
                gr.Markdown("Every main action is a named endpoint. With the app running:\n\n" + API_DOC)
        for component in run_inputs(ui) + [ui.method, ui.steps, ui.t_mode, ui.runs, ui.learn_model, ui.rank]:
            named_errors(component)  # (the input image has its own message, set where it is made)
        wire_input(ui)
        cancels = wire_runs(ui, demo) + wire_learn(ui, demo)
        wire_evidence(ui, demo)
        for stop in (ui.stop_btn, ui.compare_stop):
            # (after a pause: the cancelled run's last queued update would overwrite the message)
            stop.click(None, cancels=cancels, api_visibility="private", queue=False).then(
                lambda: time.sleep(0.5), None, None, api_visibility="private", queue=False).then(
                stopped, ui.progress, ui.progress, api_visibility="private", queue=False)
    demo.queue(default_concurrency_limit=1, max_size=32)
    return demo


def launch_kwargs() -> dict:
    # Gradio keeps each session's updated components in memory (about 2 MB of RSS per gradio_client
    # session of 10 purifications here, and 10,000 sessions by default): the oldest are dropped.
    return dict(theme=gr.themes.Soft(), css=CSS, allowed_paths=[str(ASSETS)], max_file_size="10mb",
                show_error=True, state_session_capacity=SESSIONS)


WARM_UP_TIMEOUT_S = 60
# The request the page makes on load (the default example, corruption, purifier and seed).
WARM_UP_ARGS = [DEFAULT_DATASET, str(ASSETS / DEFAULT_EXAMPLE), label_from_path(DEFAULT_DATASET, DEFAULT_EXAMPLE),
                "gaussian", STRENGTH[DEFAULT_DATASET]["gaussian"], STRENGTH[DEFAULT_DATASET]["salt_pepper"],
                STRENGTH[DEFAULT_DATASET]["pgd_linf"], 10, 1, 2, 0, DEFAULT_MODEL, DEFAULT_T_STAR, DEFAULT_METHOD,
                DEFAULT_STEPS]


def warm_up() -> None:
    """Run the page's first request once before the page is public, so that the first visitor's
    result is there at once: through the handler (models, PNG/GIF encoders, plot code), then through
    a server on a private port, closed afterwards: a server's first queued request is slower than
    later ones (docs/performance.md, 'Why the code is shaped this way')."""
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
            args[10] = 1  # another seed: a run, not a replay of the one above
            client.submit(*args, api_name="/purify").result(timeout=WARM_UP_TIMEOUT_S)
        finally:
            demo.close()
    except Exception:
        pass  # missing checkpoints (the UI says so when used)


def main() -> None:
    # One thread: batch-1 inference gains nothing from a second, which stalls on a busy machine
    # (docs/performance.md, 'Why the code is shaped this way').
    torch.set_num_threads(int(os.environ.get("TENDIFF_THREADS", "1")))
    tune_allocator()
    warm_up()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", "7860"))),
                **launch_kwargs())


demo = build_demo()

if __name__ == "__main__":
    main()
