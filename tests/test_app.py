"""The Studio pipeline (tendiff.pipeline) and the app (app.py) driven through gradio_client.

Fast tests cover upload handling and parameter validation and need no checkpoint. Tests marked
``slow`` launch the app on a free port and call every named endpoint with gradio_client; they
skip, with the reason, when the MNIST checkpoints they need are not in the manifest.
"""
from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conftest import missing_checkpoints  # noqa: E402
from tendiff.classical import CLASSICAL, estimate_noise  # noqa: E402
from tendiff.inputs import prepare_image, quantize  # noqa: E402
from tendiff.pipeline import CorruptionSpec, Limits, PurifySpec, Studio, check_label  # noqa: E402
from dataclasses import replace as replace_spec  # noqa: E402
from tendiff.protocol import parse_model_label, purifier_title  # noqa: E402

ASSETS = ROOT / "assets"


needs_mnist = pytest.mark.skipif(bool(missing_checkpoints()),
                                 reason=f"MNIST checkpoints not trained yet: {missing_checkpoints()}")


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------- uploads
def test_examples_are_small_labelled_pngs():
    for ds, n in (("mnist", 20), ("fashion_mnist", 20), ("cifar10", 20)):
        files = sorted(ASSETS.glob(f"{ds}_*.png"))
        assert len(files) == n, ds
        for f in files:
            assert re.fullmatch(rf"{ds}_\d_\d\.png", f.name)
            assert f.stat().st_size < 8_000
            prepared = prepare_image(f, ds)
            assert "unchanged" in prepared.message and not prepared.inverted


def test_prepare_converts_any_image_to_the_dataset_shape():
    photo = Image.new("RGB", (640, 480), (240, 240, 240))
    photo.paste((20, 20, 20), (300, 200, 340, 280))  # a dark object on a light background
    out = prepare_image(png_bytes(photo), "mnist")
    assert out.tensor.shape == (1, 1, 28, 28) and out.inverted
    assert 0 <= out.tensor.min() and out.tensor.max() <= 1
    assert "inverted" in out.message and "cropped" in out.message and "grayscale" in out.message
    assert out.tensor[0, 0, 0, 0] < 0.1 and out.tensor[0, 0, 14, 14] > 0.8  # now light on black
    rgb = prepare_image(photo, "cifar10")
    assert rgb.tensor.shape == (1, 3, 32, 32) and not rgb.inverted  # colour images are never inverted


def test_nearest_enlarged_image_comes_back_exactly():
    x = prepare_image(ASSETS / "mnist_3_0.png", "mnist").tensor
    from render import to_pil
    big = to_pil(x, 8)
    assert big.size == (224, 224)
    out = prepare_image(png_bytes(big), "mnist")
    assert torch.equal(out.tensor, x) and "centred" not in out.message  # already in MNIST's format
    shirt = prepare_image(ASSETS / "fashion_mnist_6_0.png", "fashion_mnist").tensor
    assert torch.equal(prepare_image(png_bytes(to_pil(shirt, 5)), "fashion_mnist").tensor, shirt)


def ink_geometry(x: torch.Tensor) -> tuple[int, float, float]:
    """(longer side of the ink's bounding box, centre of mass row, column) of a (1, 1, H, W) image."""
    a = x[0, 0].numpy()
    ys, xs = np.nonzero(a > 0.05)
    rows, cols = np.arange(a.shape[0]), np.arange(a.shape[1])
    return (max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1),
            float((a.sum(1) * rows).sum() / a.sum()), float((a.sum(0) * cols).sum() / a.sum()))


def test_a_drawing_is_centred_and_scaled_like_mnist_digits():
    from PIL import ImageDraw
    canvas = Image.new("L", (280, 280), 0)  # a small, off-centre blob, white on black
    ImageDraw.Draw(canvas).ellipse((20, 30, 50, 75), fill=255)
    out = prepare_image(png_bytes(canvas), "mnist")
    side, cy, cx = ink_geometry(out.tensor)
    assert side == 20 and abs(cy - 14) <= 1 and abs(cx - 14) <= 1, (side, cy, cx)
    assert "centred and scaled like MNIST digits" in out.message and not out.inverted
    # The same blob in black on white paper (the sketchpad's ink): inverted, then centred the same way.
    paper = Image.eval(canvas, lambda v: 255 - v)
    inverted = prepare_image(png_bytes(paper), "mnist")
    assert inverted.inverted and torch.equal(inverted.tensor, out.tensor)
    # Fashion-MNIST items fill the field: the longer side becomes 28, the box centred.
    side, cy, cx = ink_geometry(prepare_image(png_bytes(canvas), "fashion_mnist").tensor)
    assert side == 28 and abs(cx - 14) <= 1.5
    # A blank image has nothing to centre: converted as before. CIFAR-10 is never centred.
    assert "centred" not in prepare_image(png_bytes(Image.new("L", (280, 280))), "mnist").message
    assert "centred" not in prepare_image(png_bytes(canvas), "cifar10").message


def test_an_empty_drawing_is_refused_with_a_message():
    from tendiff.inputs import drawn_image
    with pytest.raises(ValueError, match="draw something first"):
        drawn_image(np.full((280, 280), 255, np.uint8))
    with pytest.raises(ValueError, match="draw something first"):
        drawn_image(np.zeros((280, 280, 4), np.uint8))  # transparent: white paper, no ink
    ink = np.full((280, 280), 255, np.uint8)
    ink[100:180, 130:150] = 0
    assert drawn_image(ink).size == (280, 280)


@pytest.mark.parametrize("make, message", [
    (lambda: b"this is not an image", "not an image"),
    (lambda: png_bytes(Image.new("L", (5000, 20))), "limit is 4096"),
    (lambda: png_bytes(Image.new("L", (4, 4))), "too small"),
    (lambda: png_bytes(Image.new("RGBA", (40, 40), (255, 0, 0, 0))), "transparent"),
    (lambda: png_bytes(Image.fromarray(np.full((40, 40), 40000, np.uint16))), "16-bit"),
    (lambda: png_bytes(Image.new("L", (40, 40)), format="GIF", save_all=True,
                       append_images=[Image.new("L", (40, 40), 255)]), "animated"),
    (lambda: b"\x89PNG" + b"0" * (11 * 2 ** 20), "limit is 10 MB"),
])
def test_bad_uploads_get_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        prepare_image(make(), "mnist")


def test_opaque_alpha_is_accepted():
    out = prepare_image(png_bytes(Image.new("RGBA", (28, 28), (0, 0, 0, 255))), "mnist")
    assert out.tensor.shape == (1, 1, 28, 28)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(t_star=0), r"t\* must be in 1..1000"),
    (dict(t_star=1001), r"t\* must be in 1..1000"),
    (dict(steps=0), "reverse steps must be in 1..100"),
    (dict(steps=10 ** 6), "reverse steps must be in 1..100"),
    (dict(t_star=5, steps=10), "reverse steps must be in 1..5"),
    (dict(model="tt-r17"), "rank must be in 1..16"),
    (dict(model="tt-r0"), "rank must be in 1..16"),
    (dict(model="cp-r2"), "unknown model"),
    (dict(model="big"), "unknown model"),
    (dict(method="euler"), "unknown method"),
    (dict(seed=-1), "seed must be in"),
    (dict(steps=2.5), "integer"),
    (dict(t_star=float("nan")), "integer"),
])
def test_purify_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PurifySpec(**kwargs).validated(1000, dataset="mnist")


def test_one_step_ignores_the_step_count():
    assert PurifySpec(method="one-step", steps=10 ** 6).validated(1000, dataset="mnist").steps == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="gaussian", sigma=-0.1), "sigma"),
    (dict(kind="salt_pepper", p=1.5), "p must be"),
    (dict(kind="pgd_linf", eps=1.5), "eps must be"),
    (dict(kind="pgd_linf", attack_steps=0), "attack steps"),
    (dict(kind="pgd_linf", attack_steps=10 ** 6), "attack steps must be in 1..40"),
    (dict(kind="adaptive", attack_steps=20), "attack steps must be in 1..10"),
    (dict(kind="adaptive", eot=100), "EOT"),
    (dict(kind="blur"), "unknown corruption"),
])
def test_corruption_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CorruptionSpec(**kwargs).validated(Limits())


def test_labels_and_models():
    assert parse_model_label("dense") == ("dense", None)
    assert parse_model_label("authors-r3") == ("authors", 3)
    assert parse_model_label("ttm-r4") == ("ttm", 4)
    assert purifier_title("tt-r8") == "tt-r8 (beyond the paper's R <= 4)" and purifier_title("tt-r4") == "tt-r4"
    assert check_label("mnist", "7") == 7 and check_label("fashion_mnist", "Sneaker") == 7
    assert check_label("mnist", "unknown (use the classifier's prediction)") is None
    with pytest.raises(ValueError):
        check_label("mnist", 10)


def test_validation_happens_before_any_work(monkeypatch):
    studio = Studio()
    monkeypatch.setattr(studio, "_load", lambda name: pytest.fail("loaded a model for an invalid request"))
    x = torch.zeros(1, 1, 28, 28)
    for bad in (dict(dataset="svhn"), dict(spec=PurifySpec(steps=0)), dict(corruption=CorruptionSpec(sigma=-1)),
                dict(y=12)):
        args = dict(dataset="mnist", x=x, y=None, corruption=CorruptionSpec(), spec=PurifySpec()) | bad
        with pytest.raises(ValueError):
            next(studio.run_stream(**args))
    with pytest.raises(ValueError, match="unknown corruption parameter"):
        studio.corrupt("mnist", "gaussian", x, params={"sigmaa": 0.1})


def test_purify_spec_defaults_to_the_datasets_t_star():
    from tendiff.protocol import T_STAR
    assert PurifySpec().validated(1000, dataset="cifar10").t_star == T_STAR["cifar10"]
    assert PurifySpec().validated(1000, dataset="fashion_mnist").t_star == T_STAR["fashion_mnist"]
    assert PurifySpec(t_star=50).validated(1000, dataset="cifar10").t_star == 50
    with pytest.raises(ValueError, match="no dataset"):
        PurifySpec().validated(1000)


def test_cifar10_without_checkpoints_says_so():
    studio = Studio()
    if studio.has_classifier("cifar10"):
        pytest.skip("CIFAR-10 is trained here")
    assert "not trained yet" in studio.status("cifar10")
    with pytest.raises(FileNotFoundError, match="not trained yet"):
        studio.validate_request("cifar10", None, CorruptionSpec(), PurifySpec())


# --------------------------------------------------------------------- pipeline
@needs_mnist
def test_pipeline_streams_every_step_and_caches():
    studio = Studio()
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    spec = PurifySpec(seed=123)
    events = list(studio.run_stream("mnist", x, 7, CorruptionSpec("gaussian"), spec))
    assert [f.index for f, _, _ in events] == list(range(11)) and not events[0][2]
    result = events[-1][1]
    assert result.purified.shape == x.shape and result.probs_purified.shape == (10,)
    assert torch.equal(result.corrupted.tensor, quantize(result.corrupted.tensor))
    again = list(studio.run_stream("mnist", x, 7, CorruptionSpec("gaussian"), spec))
    assert len(again) == 11 and all(cached for _, _, cached in again)
    assert torch.equal(again[-1][1].purified, result.purified)


@needs_mnist
def test_spread_purifies_one_input_many_times_and_votes():
    studio = Studio()
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    noisy, spec = CorruptionSpec("gaussian", sigma=0.4), PurifySpec("dense", t_star=300, steps=5, seed=3)
    eight = studio.spread("mnist", x, 7, noisy, spec, runs=8)
    assert eight.n == 8 and eight.images.shape == (8, 1, 28, 28) and eight.tracked == 7
    assert len(set(map(tuple, eight.images.flatten(1).tolist()))) == 8  # fresh noise: eight different images
    assert eight.agree == eight.predictions.count(7) and 0 <= eight.std <= 0.5
    votes = [eight.predictions.count(c) for c in range(10)]
    assert eight.vote == votes.index(max(votes)) and eight.vote_share == max(votes) / 8
    four = studio.spread("mnist", x, 7, noisy, spec, runs=4)  # the runs nest: 4 are the first of 8
    assert four.predictions == eight.predictions[:4]
    assert studio.spread("mnist", x, 7, noisy, spec, runs=8) is eight  # cached
    unknown = studio.spread("mnist", x, None, noisy, spec, runs=2)
    assert unknown.tracked == int(studio.probs("mnist", x).argmax())
    median = studio.spread("mnist", x, 7, CorruptionSpec("salt_pepper", p=0.2), PurifySpec("median3"), runs=3)
    assert median.deterministic and median.std < 1e-6 and len(set(median.predictions)) == 1
    for bad in (0, 17):
        with pytest.raises(ValueError, match="purification runs"):
            studio.spread("mnist", x, 7, noisy, spec, runs=bad)


@needs_mnist
def test_concurrent_purifications_share_a_batch_and_get_their_own_results():
    """Requests purified at once run as one batch (tendiff.batching), each streaming its own frames,
    identical to what it gets alone."""
    import threading
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    specs = [PurifySpec("tt-r2", t_star=150, steps=6, seed=s) for s in range(6)]
    alone = {}
    for spec in specs:
        alone[spec.seed] = [f.x_t for f in Studio().purify_stream("mnist", x, spec)]
    studio, together, start = Studio(), {}, threading.Barrier(len(specs))
    studio.batcher.window_s = 0.2  # (a slow test machine still gathers the racing requests)
    studio.purify_stream("mnist", x, specs[0]).__next__()  # (models loaded before the race)

    def run(spec):
        start.wait()
        together[spec.seed] = [f.x_t for f in studio.purify_stream("mnist", x, spec)]

    threads = [threading.Thread(target=run, args=(spec,)) for spec in specs]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert max(studio.batcher.batches) > 1, studio.batcher.batches  # some requests shared a batch
    for seed, frames in alone.items():
        assert len(together[seed]) == len(frames) == 7
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(frames, together[seed]))


@needs_mnist
def test_classical_purifier_runs_as_one_final_frame():
    studio = Studio()
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    events = list(studio.run_stream("mnist", x, 7, CorruptionSpec("salt_pepper", p=0.2), PurifySpec("median3")))
    assert len(events) == 1 and events[0][1] is not None
    result = events[0][1]
    noisy = result.corrupted.tensor
    assert (result.purified - x).abs().mean() < (noisy - x).abs().mean()  # the median removes most impulses
    assert "median3" in studio.available_purifiers("mnist") and "median3" not in studio.available_models("mnist")


def test_the_t_star_slider_is_set_aside_while_t_star_is_adaptive():
    import app
    update, text = app.t_mode_changed(200, "auto", "gaussian")  # the default: noisy input, t* from it
    assert update["interactive"] is False and "set aside" in text and text.startswith("**Auto")
    update, text = app.t_mode_changed(200, "auto", "exact")  # under attack auto keeps the slider's t*
    assert update["interactive"] is True and text.startswith("t* = 200 of T")
    update, text = app.t_mode_changed(200, "adaptive", "pgd_linf")
    assert update["interactive"] is False and text.startswith("**Adaptive t\\*")
    assert app.t_mode_changed(200, "fixed", "none")[0]["interactive"] is True
    assert app.noise_text(200, "auto", "salt_pepper") == app.t_mode_changed(50, "auto", "salt_pepper")[1]


def test_the_measured_line_follows_the_t_star_mode():
    import app
    fixed = app.evidence_text("fashion_mnist", "gaussian", "dense")
    adaptive = app.evidence_text("fashion_mnist", "gaussian", "dense", adaptive=True)
    if "No committed measurement" in adaptive:
        pytest.skip("no committed Fashion-MNIST measurement of dense/adaptive-t (docs/noise)")
    assert "**dense " in fixed and "**dense/adaptive-t " in adaptive and fixed != adaptive
    assert "**median3 " in app.evidence_text("fashion_mnist", "gaussian", "median3", adaptive=True)


def test_the_measured_line_compares_within_the_evaluation_that_measured_the_purifier(monkeypatch):
    import app

    def run(n, cells, costs=()):
        return {"config": {"dataset": "mnist", "n": n, "strength": {"gaussian": 0.2}}, "date": "today",
                "costs": [{"purifier": c, "parameters": 10} for c in costs],
                "cells": [{"corruption": "gaussian", "purifier": p, "accuracy": a, "ci95": [a - 0.02, a + 0.02], "n": n}
                          for p, a in cells.items()]}
    big = run(1000, {"none": 0.30, "dense": 0.90, "median3": 0.80}, costs=["dense"])
    small = run(200, {"none": 0.20, "tucker": 0.70, "median3": 0.75})  # other images: other numbers
    monkeypatch.setattr(app, "measured", lambda dataset: (big, small))
    line = app.evidence_text("mnist", "gaussian", "tucker")
    assert "On 200 test images" in line and "no purifier 20.0%" in line and "best classical median3 75.0%" in line
    assert "no purifier 30.0%" in app.evidence_text("mnist", "gaussian", "dense")


def test_the_measured_line_names_the_hybrid_chosen():
    import app
    line = app.evidence_text("fashion_mnist", "salt_pepper", "dense", adaptive=True, prefilter="median3")
    if "No committed measurement" in line:
        pytest.skip("no committed Fashion-MNIST measurement of median3+dense/adaptive-t (docs/noise)")
    assert "**median3+dense/adaptive-t " in line
    assert "No committed measurement of median3+tt-r9" in app.evidence_text("fashion_mnist", "salt_pepper", "tt-r9",
                                                                           prefilter="median3")
    points = app._measured_cells("fashion_mnist", "salt_pepper", prefilter="median3")[0]
    assert {p["name"].partition("+")[0] for p in points if "+" in p["name"]} == {"median3"}
    assert not [p for p in app._measured_cells("fashion_mnist", "salt_pepper")[0] if "+" in p["name"]]


@needs_mnist
def test_a_hybrid_runs_the_classical_step_then_the_purifier():
    """The classical step first, then the diffusion purifier on its output (the same seed: the same
    result as purifying the filtered image); its t* is chosen on the filtered image; the summary,
    run.json and the cache key say so; the surrogate attack, which has no classical step, is refused."""
    import app
    from tendiff.classical import purify as classical_purify
    from tendiff.pipeline import run_record
    studio = Studio()
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    noisy = studio.corrupt("mnist", "salt_pepper", x, 7, CorruptionSpec("salt_pepper", p=0.2), seed=0).tensor
    spec = PurifySpec("tt-r2", 100, 3, "ddim", 5, prefilter="median3")
    hybrid = list(studio.purify_stream("mnist", noisy, spec))[-1]
    plain = list(studio.purify_stream("mnist", classical_purify("median3", noisy), PurifySpec("tt-r2", 100, 3, "ddim", 5)))
    assert spec.label == "median3+tt-r2" and torch.equal(hybrid.x_t, plain[-1].x_t)
    auto = studio.run("mnist", x, 7, CorruptionSpec("salt_pepper", p=0.2), replace_spec(spec, t_star="auto"))
    filtered = classical_purify("median3", auto.corrupted.tensor)  # the t* rule reads the filtered input
    assert auto.spec.t_star == studio.resolve_t_star(replace_spec(spec, t_star="auto"), filtered)[0].t_star
    assert auto.spec.prefilter == "median3"
    result = studio.run("mnist", x, 7, CorruptionSpec("salt_pepper", p=0.2), spec)
    assert run_record(result)["purifier"]["classical_step_first"] == "median3"
    rows = list(studio.compare("mnist", x, 7, CorruptionSpec("salt_pepper", p=0.2), spec, models=["tt-r2", "tv"]))[-1]
    assert [r.model for r in rows] == ["median3+tt-r2", "median3+tv"]  # every row after the same classical step
    assert studio.run_key("mnist", x, 7, CorruptionSpec(), spec) != studio.run_key(
        "mnist", x, 7, CorruptionSpec(), replace_spec(spec, prefilter=None))
    final = list(app.purify("mnist", str(ASSETS / "mnist_7_0.png"), "7", "salt_pepper", 0.2, 0.2, 0.1, 2, 1, 2, 0,
                            "tt-r2", 100, "ddim", 3, "fixed", 1, "median3"))[-1]
    assert "the classical median3 filter, then 3 ddim step(s)" in final.progress
    with pytest.raises(ValueError, match="surrogate attack has no classical step"):
        studio.corrupt("mnist", "adaptive", x, 7, CorruptionSpec("adaptive", eps=0.1, attack_steps=1), 0, "tt-r2", 50,
                       prefilter="median3")
    with pytest.raises(ValueError, match="unknown classical step 'sharpen'"):
        PurifySpec("tt-r2", prefilter="sharpen").validated(1000)


@needs_mnist
def test_adaptive_t_star_follows_the_input_noise_and_says_why():
    studio = Studio()
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    spec = PurifySpec(t_star="auto", steps=10, seed=0)
    light = studio.run("mnist", x, 7, CorruptionSpec("gaussian", sigma=0.05), spec)
    heavy = studio.run("mnist", x, 7, CorruptionSpec("salt_pepper", p=0.3), spec)
    assert light.spec.t_star < heavy.spec.t_star and light.frames[0].t == light.spec.t_star
    assert f"t* = {heavy.spec.t_star}" in heavy.t_star_note and "estimated input noise" in heavy.t_star_note
    assert light.spec.steps <= light.spec.t_star
    # The input's own noise counts toward t*'s (the protocol's matched rule), and the run says so.
    assert heavy.spec.input_noise == pytest.approx(float(estimate_noise(heavy.corrupted.tensor)[0]))
    assert "only the rest is added" in heavy.t_star_note
    # More steps than the t* the input gets: as many as t* allows, and the note says so.
    many = studio.run("mnist", x, 7, CorruptionSpec("none"), PurifySpec(t_star="auto", steps=60, seed=0))
    assert many.spec.steps == many.spec.t_star < 60 and "not 60: no more steps than t*" in many.t_star_note


@pytest.mark.skipif(bool(missing_checkpoints("cifar10")), reason="CIFAR-10 checkpoints not trained yet")
def test_pipeline_purifies_cifar10_in_colour():
    studio = Studio()
    x = prepare_image(ASSETS / "cifar10_3_0.png", "cifar10").tensor
    events = list(studio.run_stream("cifar10", x, 3, CorruptionSpec("salt_pepper", p=0.15), PurifySpec(steps=3, seed=1)))
    result = events[-1][1]
    assert len(events) == 4 and result.purified.shape == (1, 3, 32, 32) and result.probs_purified.shape == (10,)
    assert "ready" in studio.status("cifar10")


@needs_mnist
@pytest.mark.parametrize("kind, t_star", [("pgd_linf", 100), ("gaussian", "auto")])
def test_purify_handler_offers_the_run_as_a_zip(kind, t_star):
    """The purify handler's final update: the perturbation, its sizes and a ZIP with the images,
    the steps, the GIF and run.json (settings, seed, t* also when adaptive, predictions, measures)."""
    import json
    import zipfile
    import app
    args = ["mnist", str(ASSETS / "mnist_7_0.png"), "7", kind, 0.3, 0.1, 0.2, 5, 1, 2, 4, "tt-r2",
            100 if t_star == "auto" else t_star, "ddim", 5, t_star == "auto"]
    final = list(app.purify(*args))[-1]
    summary, delta_png, sizes, archive = final[2], final[10], final[11], final[12]
    assert summary.startswith("Done") and "Perturbation" in sizes and "SSIM" in sizes
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        record = json.loads(zf.read("run.json"))
        clean = Image.open(io.BytesIO(zf.read("clean.png")))
        big = Image.open(io.BytesIO(zf.read("purified_x8.png")))
        with Image.open(io.BytesIO(zf.read("purification.gif"))) as gif:
            assert gif.n_frames == 6
    assert {"clean.png", "corrupted.png", "purified.png", "perturbation.png", "clean_x8.png", "corrupted_x8.png",
            "purified_x8.png", "perturbation_x8.png", "steps.png", "purification.gif", "run.json"} <= names
    assert clean.size == (28, 28) and big.size == (224, 224)
    assert {"dataset", "true_label", "corruption", "purifier", "seed", "t_star", "t_star_requested",
            "adaptive_t_star", "predictions", "measures", "checkpoints"} <= set(record)
    assert record["seed"] == 4 and record["true_label"] == "7" and record["corruption"]["kind"] == kind
    assert record["adaptive_t_star"] == (t_star == "auto") and isinstance(record["t_star"], int)
    assert record["t_star_requested"] == t_star and (record["t_star_note"] != "") == (t_star == "auto")
    for stage in ("clean", "corrupted", "purified"):
        probs = record["predictions"][stage]
        assert len(probs) == 10 and abs(sum(p["probability"] for p in probs) - 1) < 1e-3
    m = record["measures"]
    assert set(m) == {"linf", "l2", "psnr_corrupted", "ssim_corrupted", "psnr_purified", "ssim_purified"}
    if kind == "pgd_linf":
        assert abs(m["linf"] - 0.2) < 0.003 and m["l2"] > m["linf"]  # eps 0.2, up to 8-bit rounding
    assert m["psnr_corrupted"] < 100 and -1 <= m["ssim_purified"] <= 1
    assert image_size(delta_png) == (224, 224)


@needs_mnist
def test_a_drawing_becomes_the_input_through_the_handlers():
    import app
    paper = np.full((280, 280), 255, np.uint8)
    paper[63:217, 131:158] = 0  # a "1", black on white as the sketchpad draws it
    path, label, key = app.use_drawing({"background": None, "layers": [], "composite": paper})
    assert label == app.UNKNOWN and image_size(path) == (280, 280) and key
    seen, message = app.prepare("mnist", path)
    assert image_size(seen) == (224, 224) and "centred and scaled like MNIST digits" in message
    import gradio as gr
    skip = gr.skip()
    # The sketchpad shown again reports the same drawing: the input (maybe an example since) stays.
    assert app.use_drawing({"composite": paper}, key) == (skip, skip, key)
    # A drawing emptied (cleared, erased) says so and leaves the input as it was.
    blank = {"background": None, "layers": [], "composite": np.full((280, 280), 255, np.uint8)}
    with pytest.warns(UserWarning, match="draw something first"):
        assert app.use_drawing(blank, key) == (skip, skip, None)
    assert app.use_drawing(blank, None) == (skip, skip, None)  # an empty pad shown: nothing to say


# --------------------------------------------------------------------- the app
@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def run_args(seed=0, kind="gaussian", model="tt-r2", t_star=100, label="7", image="mnist_7_0.png"):
    from gradio_client import handle_file
    return ["mnist", handle_file(str(ASSETS / image)), label, kind, 0.3, 0.1, 0.2, 5, 1, 2, seed, model, t_star]


EXPECTED_ENDPOINTS = {"/prepare", "/corrupt", "/purify", "/compare", "/learn_layer", "/learn_params",
                      "/learn_schedule", "/guidance"}


@pytest.mark.slow
def test_named_endpoints(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == EXPECTED_ENDPOINTS
    assert not (ROOT / "app.pyi").exists()  # no Gradio stub written next to the app


@pytest.mark.slow
def test_prepare_endpoint(client):
    from gradio_client import handle_file
    seen, message = client.predict("mnist", handle_file(str(ASSETS / "mnist_3_0.png")), api_name="/prepare")
    assert image_size(seen) == (224, 224) and "28x28 gray" in message
    seen, message = client.predict("cifar10", handle_file(str(ASSETS / "cifar10_3_0.png")), api_name="/prepare")
    assert image_size(seen) == (224, 224) and "32x32 RGB" in message


@pytest.mark.slow
def test_bad_upload_gets_a_message_and_the_app_keeps_working(client, tmp_path):
    from gradio_client import handle_file
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(clear)
    with pytest.raises(Exception, match="transparent"):
        client.predict("mnist", handle_file(str(clear)), api_name="/prepare")
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(Exception, match="could not be read as an image|not an image"):
        client.predict("mnist", handle_file(str(text)), api_name="/prepare")
    seen, _ = client.predict("mnist", handle_file(str(ASSETS / "mnist_3_0.png")), api_name="/prepare")
    assert image_size(seen) == (224, 224)


@pytest.mark.slow
def test_corrupt_endpoint_states_the_threat_model(client):
    out, clean, corrupted, threat = client.predict(*run_args(kind="pgd_linf"), api_name="/corrupt")
    assert image_size(out) == (224, 224)
    assert len(clean["confidences"]) == 3 and len(corrupted["confidences"]) == 3
    assert "sees only the classifier" in threat
    _, _, _, threat = client.predict(*run_args(kind="gaussian"), api_name="/corrupt")
    assert "no attacker" in threat


@pytest.mark.slow
@pytest.mark.parametrize("method, steps, frames", [("ddim", 10, 11), ("ddpm", 4, 5), ("one-step", 10, 2)])
def test_purify_streams_one_update_per_step(client, method, steps, frames):
    for repeat in range(2):  # the second run is replayed from the cache, with the same frames
        job = client.submit(*run_args(seed=7), method, steps, api_name="/purify")
        final = job.result()
        outputs = job.outputs()
        assert len(outputs) == frames, (repeat, [o[2] for o in outputs])
        assert [o[2].split(" ·")[0] for o in outputs[:-1]] == [f"Step {i}/{frames - 1}" for i in range(frames - 1)]
        (x_t, x0, summary, corrupted, clean, attacked, purified, plot, strip, gif, delta, sizes, archive,
         spread, spread_image) = final
        assert summary.startswith("Done") and ("cached" in summary) == (repeat == 1)
        assert image_size(x_t) == image_size(x0) == image_size(corrupted) == (224, 224)
        for lab in (clean, attacked, purified):
            assert len(lab["confidences"]) == 3
        assert len(plot["data"]) == 2 * frames
        assert image_size(strip)[1] == 2 * 84 + 6
        with Image.open(gif) as im:
            assert im.n_frames == frames
        assert image_size(delta) == (224, 224) and "L∞ **" in sizes and "PSNR" in sizes
        assert Path(archive).name.endswith(".zip")
        if method != "one-step":  # 8 runs by default: their agreement, confidence spread and vote
            assert re.search(r"\*\*8 purifications\*\*.* in \*\*\d/8\*\*.*majority vote", spread), spread
            assert image_size(spread_image)[0] > image_size(spread_image)[1]  # a row of 8


@pytest.mark.slow
def test_adaptive_attack_goes_through_the_purifier(client):
    args = run_args(seed=11, kind="adaptive")
    args[7:10] = [1, 1, 1]  # attack steps, EOT samples, surrogate steps: the cheapest adaptive attack
    _, _, _, threat = client.predict(*args, api_name="/corrupt")
    assert "sees the purifier" in threat and "= 2 purifier-and-classifier forward/backward passes" in threat
    job = client.submit(*args, "ddim", 4, api_name="/purify")
    final = job.result()
    outputs = job.outputs()
    assert outputs[0][2].startswith("Running the adaptive attack first")
    assert len(outputs) == 1 + 5 and final[2].startswith("Done")


def test_default_click_reports_its_time(client):
    """The summary states the measured time (no timing assertion: machines are noisy)."""
    job = client.submit(*run_args(seed=0), "ddim", 10, api_name="/purify")
    summary = job.result()[2]
    seconds = float(re.search(r"in ([\d.]+) s", summary).group(1))
    assert seconds > 0, summary
    print(f"default click: {summary}")


@pytest.mark.slow
def test_purify_rejects_bad_parameters(client, capfd):
    """Out-of-range values are refused by Gradio (the message names the parameter), the rest by the
    pipeline; an ordinary user error prints no traceback in the server log."""
    capfd.readouterr()
    for bad, steps, message in ((dict(t_star=0), 10, r"t\* \(diffusion depth\): Value 0 is less than minimum"),
                                (dict(t_star=10), 20, r"reverse steps must be in 1..10"),
                                (dict(model="tt-r9"), 10, r"MNIST: the tt-r9 purifier is not trained yet .*its "
                                                          r"purifiers: dense, tt-r1"),
                                (dict(label="Sneaker"), 10, "'Sneaker' is not a MNIST class"),
                                (dict(), 10 ** 6, r"Reverse steps .*maximum value")):
        with pytest.raises(Exception, match=message):
            client.predict(*run_args(**bad), "ddim", steps, "fixed", api_name="/purify")  # (auto: t* from the input)
    with pytest.raises(Exception, match=r"t\* mode .*'sometimes'.* is not in the list of choices"):
        client.predict(*run_args(), "ddim", 10, "sometimes", api_name="/purify")
    assert "Traceback" not in "".join(capfd.readouterr())
    assert client.predict(*run_args(), "ddim", 10, api_name="/purify")[2].startswith("Done")


@pytest.mark.slow
def test_api_takes_labels_of_the_requested_dataset(client):
    if missing_checkpoints("cifar10"):
        pytest.skip("CIFAR-10 checkpoints not trained yet")
    args = run_args(label="cat", image="cifar10_3_0.png")
    args[0] = "cifar10"
    out, clean, corrupted, threat = client.predict(*args, api_name="/corrupt")
    assert len(clean["confidences"]) == 3
    args[2] = "seven"
    with pytest.raises(Exception, match="seven"):
        client.predict(*args, api_name="/corrupt")


@pytest.mark.slow
def test_api_takes_purifiers_of_the_requested_dataset(client):
    """The purifier list is checked per dataset by the pipeline, not by the first dataset's dropdown."""
    if missing_checkpoints("fashion_mnist"):
        pytest.skip("Fashion-MNIST checkpoints not trained yet")
    studio = Studio()
    model = studio.available_models("fashion_mnist")[-1]  # the last of its ladder (one MNIST lacked)
    args = run_args(label="Sneaker", image="fashion_mnist_7_0.png", model=model, t_star=20)
    args[0] = "fashion_mnist"
    assert client.predict(*args, "ddim", 2, "fixed", api_name="/purify")[2].startswith("Done")
    args[-2] = "tt-r9"
    with pytest.raises(Exception, match=r"Fashion-MNIST: the tt-r9 purifier is not trained yet .*its purifiers: dense"):
        client.predict(*args, "ddim", 2, "fixed", api_name="/purify")


@pytest.mark.slow
def test_compare_endpoint(client):
    gallery, table, status, csv = client.predict(*run_args(seed=3), "ddim", 5, api_name="/compare")
    expected = Studio().available_purifiers("mnist")
    refs = ["(clean input)", "(corrupted, no purifier)"]  # the references come first, no purifier
    assert [row[0] for row in table["data"]] == refs + expected and any(m in CLASSICAL for m in expected)
    assert len(gallery) == len(refs) + len(expected)
    clean, noisy = (dict(zip(table["headers"], values)) for values in table["data"][:2])
    assert clean["prediction"] == "7" and clean["parameters"] is None and 0 <= noisy["confidence"] <= 1
    for values in table["data"][2:]:
        row = dict(zip(table["headers"], values))
        assert 0 <= row["confidence"] <= 1 and row["seconds"] > 0
        assert (row["parameters"] == 0) if row["model"] in CLASSICAL else (row["parameters"] > 0 and row["compression"] > 0)
        runs_right, n = map(int, row["runs right"].split("/"))  # 8 runs each by default
        assert n == 8 and 0 <= runs_right <= 8 and 0 <= row["mean"] <= 1 and row["sd"] >= 0
        assert row["sd"] == 0 if row["model"] in CLASSICAL else True  # a filter is deterministic
    assert f"{len(expected)} purifier(s) done" in status
    import pandas as pd
    saved = pd.read_csv(csv)
    assert list(saved["model"]) == refs + expected and list(saved.columns) == table["headers"]


@pytest.mark.slow
def test_learn_endpoints(client):
    model, layer, plot, text = client.predict("mnist", "tt-r2", "", api_name="/learn_layer")
    assert "TT cores" in text and plot is not None
    with pytest.raises(Exception, match="has no TT layer 'enc.9.conv1'"):  # said, not silently another layer
        client.predict("mnist", "tt-r2", "enc.9.conv1", api_name="/learn_layer")
    with pytest.raises(Exception, match="tt-r7 is not trained for MNIST"):
        client.predict("mnist", "tt-r7", "", api_name="/learn_layer")
    text, params = client.predict("mnist", 3, api_name="/learn_params")
    assert "R = 3" in text and params is not None
    text, _ = client.predict("mnist", 16, api_name="/learn_params")  # the ladder's largest rank
    assert "R = 16" in text
    with pytest.raises(Exception, match="Rank R"):  # the range error names the parameter
        client.predict("mnist", 17, api_name="/learn_params")
    plot, text = client.predict(250, api_name="/learn_schedule")
    assert "t* = 250" in text and plot is not None


@pytest.mark.slow
def test_guidance_endpoint(client):
    gallery, text = client.predict(*run_args()[:3], 100, 0, api_name="/guidance")
    if missing_checkpoints(models=["dense-cond"]):
        assert "Not trained yet" in text and gallery == []
    else:
        assert len(gallery) == 3 and "true" in text


@pytest.mark.slow
def test_the_documented_api_example_runs(client):
    """The gradio_client example in app.py's docstring (and on the API tab) runs as written."""
    import app
    code = app.API_DOC.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('Client("http://127.0.0.1:7860/")', "Client(URL, verbose=False)")
    code = code.replace('handle_file("assets/', f'handle_file("{ASSETS}/')
    scope = {"URL": client.src}
    for _ in range(1200):  # (a stream an earlier test left running would thin this one's frames)
        if not app._streams.active:
            break
        time.sleep(0.1)
    exec(compile(code, "API_DOC", "exec"), scope)
    assert scope["final"][2].startswith("Done") and len(scope["frames"]) == 11
    assert len(scope["table"]["data"]) == 2 + len(Studio().available_purifiers("mnist"))  # clean and corrupted first
    assert "sees only the classifier" in scope["threat"]


def test_figures_draw_safely_from_many_threads():
    """The app draws the Learn tab's figures from Gradio's worker threads at once (on page load);
    matplotlib is not thread-safe (its mathtext parser failed on log axes drawn concurrently)."""
    from concurrent.futures import ThreadPoolExecutor
    from render import params_figure, schedule_figure
    from tendiff.anatomy import parameter_table
    rows = parameter_table("mnist", range(1, 9))
    stds = [0.01 * 1.005 ** t for t in range(1000)]
    jobs = [lambda r=r: params_figure(rows, r) for r in range(1, 9)] + [lambda t=t: schedule_figure(stds, t)
                                                                         for t in range(100, 900, 100)]
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda job: job(), jobs * 3))
    assert all(img.size[0] > 300 and img.size[1] > 200 for img in images)


def test_measured_numbers_come_from_the_committed_evaluation():
    """The app's "on 1000 test images" line and plots read the committed evaluations (the first of
    app.MEASURED that has the cell; no number typed in)."""
    import app
    from tendiff.evaluate import read_results

    def first(purifier):
        return next(c for path in app.MEASURED if path.exists() for r in read_results(path)
                    if r["config"]["dataset"] == "mnist" for c in r["cells"]
                    if c["corruption"] == "gaussian" and c["purifier"] == purifier)
    view = app.evidence("mnist", "gaussian", "dense", 200, "fixed")
    assert f"**dense {100 * first('dense')['accuracy']:.1f}%**" in view.evidence_line
    assert f"no purifier {100 * first('none')['accuracy']:.1f}%" in view.evidence_line
    assert "best classical" in view.evidence_line and "adaptive" not in view.evidence_line
    assert Image.open(view.evidence_plot).size[0] > 400
    assert "No committed measurement of ttm-r16" in app.evidence("mnist", "gaussian", "ttm-r16", 200).evidence_line
    line = app.evidence_text("mnist", "gaussian", "tt-r3", adaptive=True)  # adaptive row or the fixed one, said so
    assert "**tt-r3/adaptive-t " in line or ("**tt-r3 " in line and "at the fixed t*" in line)


def test_t_star_figure_draws_a_sweep():
    from render import t_star_figure
    rows = [{"purifier": p, "t_star": t, "adaptive_factor": None, "accuracy": {"gaussian": a}}
            for p, t, a in (("dense", 100, 0.8), ("dense", 200, 0.9), ("tt-r2", 100, 0.7), ("tt-r2", 200, 0.75))]
    rows += [{"purifier": "none", "t_star": None, "adaptive_factor": None, "accuracy": {"gaussian": 0.3}},
             {"purifier": "dense", "t_star": None, "adaptive_factor": 1.5, "median_t_star": {"gaussian": 150},
              "accuracy": {"gaussian": 0.92}}]
    assert t_star_figure(rows, "gaussian", "dense", 200, "test").size[0] > 400


def test_familiar_verdict_needs_a_reference_made_with_these_weights():
    from tendiff.familiar import verdict
    ref = {"threshold": 0.05, "quantile": 0.99, "sha256": "abc"}
    assert verdict(0.04, ref, "abc") is None  # below the threshold
    assert "unlike the dataset's images" in verdict(0.08, ref, "abc") and "99%" in verdict(0.08, ref, "abc")
    assert verdict(0.08, ref, "other weights") is None and verdict(0.08, None, "abc") is None


@needs_mnist
def test_an_input_unlike_the_dataset_gets_a_warning():
    """Fashion-MNIST and CIFAR-10 images given to the MNIST models are flagged, MNIST digits are not
    (checkpoints/familiar.json, measured with the committed dense purifier)."""
    import app
    studio = Studio()
    if studio.unfamiliar("mnist", torch.rand(1, 1, 28, 28)) is None:
        pytest.skip("no familiarity reference for the committed MNIST dense purifier (scripts/familiar_reference.py)")
    digits = [prepare_image(ASSETS / f"mnist_{k}_{c}.png", "mnist").tensor for k in range(10) for c in range(2)]
    assert sum(studio.unfamiliar("mnist", x) is not None for x in digits) <= 1
    others = [prepare_image(ASSETS / f"{ds}_{k}_0.png", "mnist").tensor for ds in ("fashion_mnist", "cifar10")
              for k in range(10)]
    assert sum(studio.unfamiliar("mnist", x) is not None for x in others) >= 14
    _, message = app.prepare("mnist", str(ASSETS / "cifar10_3_0.png"))
    assert "**Warning:** This input looks unlike" in message
    assert "Warning" not in app.prepare("mnist", str(ASSETS / "mnist_3_0.png"))[1]


@needs_mnist
def test_the_apps_exact_attack_goes_through_the_purifiers_real_steps():
    """The app's exact attack differentiates through the chosen purifier's own sampler and steps
    (attacks.pgd_eot_exact), stays in the eps-ball, and is cached per purification setting."""
    import app
    studio = Studio()
    x = prepare_image(ASSETS / "mnist_7_0.png", "mnist").tensor
    spec = CorruptionSpec("exact", eps=0.1, attack_steps=2, eot=1)
    out = studio.corrupt("mnist", "exact", x, 7, spec, seed=0, model="tt-r2", t_star=50, steps=3, method="ddim")
    assert (out.tensor - x).abs().max() <= 0.1 + 1 / 255 and not torch.equal(out.tensor, x)
    assert studio.corrupt("mnist", "exact", x, 7, spec, 0, "tt-r2", 50, 3, "ddim") is out  # cached
    other = studio.corrupt("mnist", "exact", x, 7, spec, 0, "tt-r2", 50, 2, "ddim")  # fewer steps: another attack
    assert other is not out
    # "Corrupt only" attacks the defense Purify would run (its steps and t* mode), not a default one.
    shown = app.corrupt("mnist", str(ASSETS / "mnist_7_0.png"), "7", "exact", 0.2, 0.2, 0.1, 2, 1, 2, 0, "tt-r2", 50,
                        "ddim", 3, "fixed").corrupted
    assert np.array_equal(np.asarray(Image.open(shown)), np.asarray(Image.open(app.show(out.tensor))))
    assert not np.array_equal(np.asarray(Image.open(shown)), np.asarray(Image.open(app.show(other.tensor))))
    with pytest.raises(ValueError, match="diffusion purifier"):
        studio.corrupt("mnist", "exact", x, 7, spec, 0, "median3", 50, 3, "ddim")
    threat = app.threat_text("exact", 0.1, 2, 1, 2, 3)
    assert "exactly through the defense" in threat and "2 PGD steps x 1 EOT samples x 3 reverse steps" in threat
    updates = list(app.purify("mnist", str(ASSETS / "mnist_7_0.png"), "7", "exact", 0.2, 0.2, 0.1, 2, 1, 2, 0,
                              "tt-r2", 50, "ddim", 3, False, 1))
    assert updates[0].progress.startswith("Running the adaptive attack first") and updates[-1].progress.startswith("Done")
