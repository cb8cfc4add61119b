"""Reliability: every kind of upload, many clients at once, determinism (issue 7).

Fast tests call the pipeline directly. Tests marked ``slow`` go through the running app with
gradio_client (the session's app from conftest.app_url), including the 20-client load test.
"""
from __future__ import annotations

import io
import resource
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from tendiff.inputs import prepare_image

ASSETS = ROOT / "assets"


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cifar_example() -> Image.Image:
    return Image.open(ASSETS / "cifar10_3_0.png").convert("RGB")


def float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32), "F"), "TIFF")


def truncated(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) * 2 // 3]  # header intact, image data cut off


def nan_array() -> np.ndarray:
    a = np.full((28, 28), 0.5, np.float32)
    a[3, 4], a[5, 6] = np.nan, np.inf
    return a


# Each upload either works (converted, and the message says how) or is refused with a message.
UPLOADS = {
    "truncated png": (lambda: truncated(ASSETS / "mnist_3_0.png"), "mnist", "damaged or truncated"),
    "cmyk jpeg -> rgb": (lambda: encode(cifar_example().convert("CMYK"), "JPEG"), "cifar10",
                         "converted from CMYK to RGB"),
    "cmyk jpeg -> gray": (lambda: encode(cifar_example().convert("CMYK"), "JPEG"), "mnist",
                          "converted from CMYK to grayscale"),
    "gray where rgb": (lambda: (ASSETS / "mnist_3_0.png").read_bytes(), "cifar10", "gray copied to 3 channels"),
    "rgb where gray": (lambda: (ASSETS / "cifar10_3_0.png").read_bytes(), "mnist", "converted from RGB to grayscale"),
    "10000x10000": (lambda: encode(Image.new("L", (10000, 10000))), "mnist", "limit is 4096"),
    "1x1": (lambda: encode(Image.new("L", (1, 1))), "mnist", "too small"),
    "rgba": (lambda: encode(Image.new("RGBA", (40, 40), (9, 9, 9, 100))), "mnist", "transparent"),
    "16-bit": (lambda: encode(Image.fromarray(np.full((40, 40), 999, np.uint16))), "mnist", "16-bit"),
    "animated gif": (lambda: encode(Image.new("L", (40, 40)), "GIF", save_all=True,
                                    append_images=[Image.new("L", (40, 40), 200)]), "mnist", "animated"),
    "float tiff in [0, 1]": (lambda: float_tiff(np.linspace(0, 1, 28 * 28).reshape(28, 28)), "mnist",
                             "from a 28x28 F image"),
    "float tiff with nan/inf": (lambda: float_tiff(nan_array()), "mnist", "NaN or infinite"),
    "float tiff out of range": (lambda: float_tiff(np.full((28, 28), 7.0)), "mnist", r"must lie in \[0, 1\]"),
    "not an image": (lambda: b"%PDF-1.4 not an image", "mnist", "not an image|could not be read as an image"),
}
WORKS = {"cmyk jpeg -> rgb", "cmyk jpeg -> gray", "gray where rgb", "rgb where gray", "float tiff in [0, 1]"}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_every_upload_is_converted_or_refused_with_a_message(name):
    make, dataset, message = UPLOADS[name]
    if name in WORKS:
        out = prepare_image(make(), dataset)
        c = 3 if dataset == "cifar10" else 1
        side = 32 if dataset == "cifar10" else 28
        assert out.tensor.shape == (1, c, side, side) and out.tensor.dtype == torch.float32
        assert torch.isfinite(out.tensor).all() and 0 <= out.tensor.min() and out.tensor.max() <= 1
        assert message in out.message, out.message
    else:
        with pytest.raises(ValueError, match=message):
            prepare_image(make(), dataset)


def test_gray_to_rgb_copies_the_gray_channel():
    out = prepare_image(ASSETS / "mnist_3_0.png", "cifar10").tensor
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


@pytest.mark.parametrize("bad", [nan_array(), np.full((28, 28, 3), -np.inf, np.float32),
                                 torch.full((1, 1, 28, 28), float("nan"))])
def test_nan_and_inf_arrays_are_refused(bad):
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_image(bad, "mnist")


def test_a_float_array_in_range_is_accepted_exactly():
    levels = torch.arange(28 * 28, dtype=torch.float32).remainder(256).div(255).reshape(1, 1, 28, 28)
    assert torch.equal(prepare_image(levels, "mnist").tensor, levels)


# ------------------------------------------------------------------ through the app
@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.mark.slow
def test_every_upload_through_the_api_gets_an_answer_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client import handle_file
    suffix = {"cmyk": ".jpg", "animated": ".gif", "tiff": ".tif"}
    for name, (make, dataset, message) in UPLOADS.items():
        path = tmp_path / (name.replace(" ", "_").replace("/", "") + next(
            (s for k, s in suffix.items() if k in name), ".png"))
        path.write_bytes(make())
        if name in WORKS:
            seen, text = client.predict(dataset, handle_file(str(path)), api_name="/prepare")
            assert Image.open(seen).size == (224, 224) and message in text, (name, text)
        else:
            with pytest.raises(Exception, match=message):
                client.predict(dataset, handle_file(str(path)), api_name="/prepare")
        # The next ordinary request still succeeds.
        seen, text = client.predict("mnist", handle_file(str(ASSETS / "mnist_1_0.png")), api_name="/prepare")
        assert "unchanged" in text, (name, text)


def purify_args(seed: int, model: str = "tt-r2", steps: int = 5, t_star: int = 150, kind: str = "gaussian"):
    from gradio_client import handle_file
    return ["mnist", handle_file(str(ASSETS / "mnist_7_0.png")), "7", kind, 0.3, 0.2, 0.2, 5, 1, 2, seed, model,
            t_star, "ddim", steps]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@pytest.mark.slow
def test_same_inputs_and_seed_give_the_same_purified_image_through_the_app(client):
    import app
    runs = []
    for seed in (5, 5, 6):
        app.studio.clear_cache()  # compute afresh each time: a cached replay would prove nothing
        final = client.predict(*purify_args(seed), api_name="/purify")
        assert final[2].startswith("Done") and "cached" not in final[2]
        runs.append((pixels(final[1]), pixels(final[3]), final[6]["label"], final[6]["confidences"]))
    (x0_a, corrupted_a, label_a, conf_a), (x0_b, corrupted_b, label_b, conf_b), (x0_c, corrupted_c, *_) = runs
    assert np.array_equal(corrupted_a, corrupted_b) and np.array_equal(x0_a, x0_b)
    assert label_a == label_b and conf_a == conf_b
    assert not np.array_equal(corrupted_a, corrupted_c)  # the seed does reach the noise


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_twenty_clients_with_five_mixed_requests_each(app_url):
    """20 gradio_client clients at once, 5 mixed requests each: every answer checked, none lost,
    memory of the (in-process) server bounded."""
    from gradio_client import Client, handle_file
    n_clients, per_client = 20, 5
    before = rss_mib()
    peak = [before]
    answers: dict[tuple[int, int], str] = {}
    errors: list[str] = []
    start = threading.Barrier(n_clients)

    def one_client(i: int):
        try:
            c = Client(app_url, verbose=False)
            start.wait(timeout=120)
            for j in range(per_client):
                kind = (i + j) % 5
                if kind == 0:
                    seen, text = c.predict("mnist", handle_file(str(ASSETS / f"mnist_{i % 10}_0.png")),
                                           api_name="/prepare")
                    ok = Image.open(seen).size == (224, 224) and "28x28 gray" in text
                elif kind == 1:
                    out, clean, corrupted, threat = c.predict(*purify_args(i)[:13], api_name="/corrupt")
                    ok = Image.open(out).size == (224, 224) and "no attacker" in threat
                elif kind == 2:
                    final = c.predict(*purify_args(seed=i, steps=3), api_name="/purify")
                    ok = final[2].startswith("Done") and final[6]["label"] in [str(d) for d in range(10)]
                elif kind == 3:
                    text, params = c.predict("mnist", 1 + i % 4, api_name="/learn_params")
                    ok = f"R = {1 + i % 4}" in text
                else:
                    args = purify_args(seed=i, model="dense", steps=2)
                    args[-2] = "one-step"
                    gallery, table, status, _csv = c.predict(*args, api_name="/compare")
                    ok = "purifier(s) done" in status and len(gallery) >= 1
                answers[(i, j)] = "ok" if ok else f"wrong answer from request kind {kind}"
                peak[0] = max(peak[0], rss_mib())
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(n_clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    print(f"load test: {len(answers)} answers in {time.perf_counter() - t0:.0f} s; "
          f"server+clients RSS {before:.0f} -> peak {peak[0]:.0f} MiB")
    assert not errors, errors[:5]
    assert len(answers) == n_clients * per_client, "requests were lost"
    assert set(answers.values()) == {"ok"}, [k for k, v in answers.items() if v != "ok"]
    # Run caches are bounded (Studio cache_size) and models load once: growth stays small.
    assert peak[0] - before < 600, f"memory grew by {peak[0] - before:.0f} MiB under load"


@pytest.mark.slow
def test_sessions_kept_in_memory_are_bounded(app_url):
    """Gradio keeps every session's updated components (about 2 MB each here): the app keeps the
    newest TENDIFF_SESSIONS (measured: RSS stops growing once that many sessions exist)."""
    import app
    from gradio_client import Client, handle_file
    assert app.launch_kwargs()["state_session_capacity"] == app.SESSIONS
    holder = app.demo.state_holder
    capacity = holder.capacity
    holder.capacity = 3
    before = len(holder.session_data)  # (earlier tests' sessions: Gradio evicts one per new access)
    try:
        for i in range(6):
            Client(app_url, verbose=False).predict("mnist", handle_file(str(ASSETS / f"mnist_{i}_0.png")),
                                                   api_name="/prepare")
        assert len(holder.session_data) <= max(before, 3)  # six new sessions, no growth
    finally:
        holder.capacity = capacity


@pytest.mark.slow
def test_sixty_purifications_from_twenty_clients(app_url):
    """scripts/load_test.py: 20 clients x 3 purifications at once, every one served; the median
    latency is printed (docs/performance.md has the figures; not asserted: machines differ)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), app_url, "--clients", "20",
                          "--per-client", "3"], capture_output=True, text=True, timeout=900)
    print(out.stdout)
    assert out.returncode == 0 and out.stdout.startswith("60 purifications from 20 clients"), out.stdout + out.stderr


@pytest.mark.slow
def test_memory_stays_flat_over_500_varied_requests(app_url):
    """The server's RSS after 500 varied requests (10 clients in another process: uploads,
    corruptions, attacks, purifications with every MNIST purifier, parameter plots) within 100 MiB
    of its RSS after the first 50."""
    import subprocess
    import sys

    def load(first: int, per_client: int) -> None:
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "load_test.py"), app_url, "--varied", "--clients",
                              "10", "--per-client", str(per_client), "--first", str(first)],
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stdout + out.stderr

    load(0, 5)
    first = rss_mib()
    load(50, 45)
    last = rss_mib()
    print(f"server RSS after 50 requests {first:.0f} MiB, after 500 {last:.0f} MiB")
    assert last - first < 100, (first, last)
