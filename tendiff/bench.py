"""Timing benchmark: ``python -m tendiff.bench``.

Prints, in one run on this machine: the parameter count and the median time of one U-Net
forward at each batch size for dense and for every TT rank and execution mode, with the ratio
to dense; the same for a few representative single layers; and whole purifications (same t*,
same steps). Weights are freshly initialised: timings do not depend on their values.
Ratios are (the faster of dense NCHW and dense channels-last) / model time, so > 1 means
faster than the best dense configuration.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from .diffusion import GaussianDiffusion, purify_batch
from .runtime import machine, tune_allocator
from .tt import MODES, TTConv2d, set_mode
from .unet import UNet, preset


def interleaved_median_ms(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median ms of each callable, timed round-robin (one call of each per round) so that a
    machine whose speed drifts during the run slows every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    return interleaved_median_ms({0: fn}, repeats, warmup)[0]


class _NoConv(torch.nn.Module):
    """Stands in for a residual block's 3x3 conv in the floor measurement: passes x through."""

    def forward(self, x, extra_bias=None):
        return x if extra_bias is None else x + extra_bias[:, None, None]


def floor_model(dataset: str) -> UNet:
    """The U-Net without its residual-block 3x3 convs: what any TT rank must still pay (norms,
    activations, time embedding, resampling, skips, the dense stem and head)."""
    model = UNet(preset(dataset)).eval()
    for block in list(model.enc) + [model.mid] + list(model.dec):
        block.conv1, block.conv2 = _NoConv(), _NoConv()
    return model


def model_variants(dataset: str, ranks, layouts=("tt",)):
    """(label, mode, model) for dense and each layout x rank x mode."""
    yield "dense", "nchw", UNet(preset(dataset)).eval()
    yield "dense", "channels-last", UNet(preset(dataset)).eval().use_channels_last()
    yield "floor (no 3x3 block convs)", "-", floor_model(dataset)
    for layout in layouts:
        for r in ranks:
            model = UNet(preset(dataset, layout, r)).eval()
            for mode in MODES:
                yield f"{layout}-r{r}", mode, set_mode(model, mode)


def bench_forward(dataset: str, batch_sizes, ranks, layouts, repeats: int) -> list[dict]:
    cfg = preset(dataset)
    rows = []
    for label, mode, model in model_variants(dataset, ranks, layouts):
        row = {"model": label, "mode": mode, "params": model.num_parameters()}
        for b in batch_sizes:
            x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size)
            t = torch.full((b,), 100)
            with torch.inference_mode():
                ms = median_ms(lambda: model(x, t), repeats if b == 1 else max(3, repeats // 4))
            row[f"b{b}_ms"] = ms
        rows.append(row)
    return with_ratios(rows, batch_sizes)


def with_ratios(rows: list[dict], batch_sizes) -> list[dict]:
    """Add b{b}_x = (the faster dense variant's time) / (this row's time) for each batch size."""
    for b in batch_sizes:
        best = min(r[f"b{b}_ms"] for r in rows if r["model"] == "dense")
        for r in rows:
            r[f"b{b}_x"] = best / r[f"b{b}_ms"]
    return rows


def bench_layers(dataset: str, batch_sizes, ranks, repeats: int) -> list[dict]:
    """Single 3x3 convs at the U-Net's width and each of its resolutions, plus a wider layer."""
    cfg = preset(dataset)
    sizes = [cfg.image_size // 2 ** i for i in range(len(cfg.channels))]
    rows = []
    for c, size in [(c, s) for c, s in zip(cfg.channels, sizes)] + [(128, 16)]:
        dense = torch.nn.Conv2d(c, c, 3, 1, 1)
        layers = {r: TTConv2d.from_conv(dense, r, "tt") for r in ranks}  # built outside inference mode
        for b in batch_sizes:
            x = torch.randn(b, c, size, size)
            with torch.inference_mode():
                d_ms = median_ms(lambda: dense(x), repeats)
                rows.append({"layer": f"{c}->{c} @{size}x{size}", "model": "dense", "mode": "-", "batch": b,
                             "ms": d_ms, "x": 1.0})
                for r, layer in layers.items():
                    for mode in ("chain", "cached"):
                        layer.mode = mode
                        ms = median_ms(lambda: layer(x), repeats)
                        rows.append({"layer": f"{c}->{c} @{size}x{size}", "model": f"tt-r{r}", "mode": mode,
                                     "batch": b, "ms": ms, "x": d_ms / ms})
    return rows


def on_threads(threads: int, fn):
    """fn, run with torch's intra-op thread count set to ``threads`` (restored afterwards)."""
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def bench_purify(dataset: str, batch_sizes, ranks, t_star: int, steps: int, repeats: int,
                 compile_models: bool = False, layouts=("tt",)) -> list[dict]:
    """Whole purifications, all models timed round-robin; with ``compile_models``, also
    torch.compile'd dense and tt-r2, with the seconds their first call took (compilation).
    Dense channels-last and tt-r2 are also timed on one thread: at batch 1 the TT model's ops are
    too small for a second thread to pay for its fork and join."""
    cfg = preset(dataset)
    diffusion = GaussianDiffusion()
    models = [("dense", "nchw", UNet(cfg).eval()), ("dense", "channels-last", UNet(cfg).eval().use_channels_last())]
    models += [(f"{layout}-r{r}", "auto", UNet(preset(dataset, layout, r)).eval()) for layout in layouts for r in ranks]
    if torch.get_num_threads() > 1:  # (dense too, so that the best dense is the best of every setting)
        models += [("dense", "channels-last, 1 thread", UNet(cfg).eval().use_channels_last()),
                   ("tt-r2", "auto, 1 thread", UNet(preset(dataset, "tt", 2)).eval())]
    rows = {(label, mode): {"model": label, "mode": mode} for label, mode, _ in models}
    if compile_models:
        compiled = [("dense", "channels-last, compiled", UNet(cfg).eval().use_channels_last()),
                    ("tt-r2", "auto, compiled", UNet(preset(dataset, "tt", 2)).eval())]
        models += [(label, mode, torch.compile(model, dynamic=False)) for label, mode, model in compiled]
        rows.update({(label, mode): {"model": label, "mode": mode} for label, mode, _ in compiled})
    for b in batch_sizes:
        x = torch.rand(b, cfg.in_channels, cfg.image_size, cfg.image_size)
        fns = {}
        for label, mode, model in models:
            fns[(label, mode)] = (lambda m: lambda: purify_batch(m, diffusion, x, t_star, num_steps=steps))(model)
            if "1 thread" in mode:
                fns[(label, mode)] = on_threads(1, fns[(label, mode)])
            if "compiled" in mode:
                t0 = time.perf_counter()
                fns[(label, mode)]()
                rows[(label, mode)][f"b{b}_compile_s"] = time.perf_counter() - t0
        for key, ms in interleaved_median_ms(fns, max(3, repeats // (4 if b == 1 else 8))).items():
            rows[key][f"b{b}_ms"] = ms
    out = list(rows.values())
    with_ratios([r for r in out if "compiled" not in r["mode"]], batch_sizes)
    if compile_models:  # compiled models are compared with compiled dense
        with_ratios([r for r in out if "compiled" in r["mode"]], batch_sizes)
    return out


def bench_long_purification(dataset: str, rank: int, steps: int, t_star: int, repeats: int) -> dict:
    """Batch-1 purification with many reverse steps (the issue's 100-step target), tt vs dense."""
    cfg = preset(dataset)
    diffusion = GaussianDiffusion()
    x = torch.rand(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    models = {"dense": UNet(cfg).eval(), "dense_channels_last": UNet(cfg).eval().use_channels_last(),
              f"tt-r{rank}": UNet(preset(dataset, "tt", rank)).eval()}
    fns = {f"{label}_ms": (lambda m: lambda: purify_batch(m, diffusion, x, t_star, num_steps=steps))(model)
           for label, model in models.items()}
    return {"steps": steps, "t_star": t_star, **interleaved_median_ms(fns, max(3, repeats // 6))}


def bench_throughput(dataset: str, rank: int, t_star: int, steps: int, batch: int, devices) -> list[dict]:
    """Images per second of batch purification, dense vs tt, in fp32 and under bf16 autocast,
    on each device (the CPU, and CUDA when there is one)."""
    cfg = preset(dataset)
    diffusion = GaussianDiffusion()
    rows = []
    for device in devices:
        x = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
        for label, model in (("dense", UNet(cfg)), (f"tt-r{rank}", UNet(preset(dataset, "tt", rank)))):
            model = model.to(device).eval()
            row = {"device": device, "model": label, "batch": batch}
            for dtype in (torch.float32, torch.bfloat16):
                def run():
                    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                        purify_batch(model, diffusion, x, t_star, num_steps=steps)
                    if device == "cuda":
                        torch.cuda.synchronize()
                ms = median_ms(run, 3, 1)
                row["fp32_img_s" if dtype == torch.float32 else "bf16_img_s"] = batch / (ms / 1000)
            rows.append(row)
    return rows


def bench_app(timeout: float = 120.0) -> dict:
    """Start ``python app.py`` as a user would and measure what a visitor meets: seconds until
    the page is served, the default click (MNIST example, Gaussian, tt-r2, default t* and steps)
    end to end through gradio_client (the first, the median of three new requests, and a cached
    replay), and the server's
    peak resident memory after every MNIST model has been loaded (one compare-ranks call)."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from gradio_client import Client, handle_file

    from .pipeline import DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_STEPS, DEFAULT_T_STAR

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError("app.py did not serve its page")
            time.sleep(0.1)
        startup = time.perf_counter() - t0
        client = Client(url, verbose=False, download_files=False)  # time the server, not file downloads
        args = ["mnist", handle_file(str(root / "assets" / "mnist_7_0.png")), "7", "gaussian", 0.2, 0.2, 0.2, 10,
                1, 2, 0, DEFAULT_MODEL, DEFAULT_T_STAR, DEFAULT_METHOD, DEFAULT_STEPS]
        clicks = []
        # Three new requests (seeds nobody asked for yet: no cache), then the first one again (a
        # cached replay). The first is sent the instant the page is served, as an eager visitor would.
        for seed in (12345, 12346, 12347, 12345):
            args[10] = seed
            t1 = time.perf_counter()
            client.predict(*args, api_name="/purify")
            clicks.append(time.perf_counter() - t1)
        client.predict(*args, api_name="/compare")  # loads every MNIST purifier
        status = Path(f"/proc/{proc.pid}/status")
        peak = next((int(line.split()[1]) / 1024 for line in status.read_text().splitlines()
                     if line.startswith("VmHWM:")), float("nan")) if status.exists() else float("nan")
        return {"startup_s": startup, "first_click_s": clicks[0], "click_s": statistics.median(clicks[:3]),
                "cached_click_s": clicks[3], "peak_rss_mib": peak}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tendiff.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "cifar10"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--layouts", nargs="+", default=["tt", "ttm", "authors"])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--t-star", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="reverse steps for the purification timing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--long-steps", type=int, default=100, help="reverse steps of the batch-1 long purification")
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "layers", "purify", "long", "throughput", "app"])
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd dense and tt-r2 purifications and their compile time")
    p.add_argument("--default-allocator", action="store_true",
                   help="keep glibc's malloc thresholds (see tendiff.runtime) to measure what tuning them buys")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = False if args.default_allocator else tune_allocator()
    if args.compile:
        # A fresh inductor cache, so compile_s is what a new process on a new machine (a
        # restarted Space) pays, not a replay of kernels compiled by an earlier run.
        import os
        import tempfile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tendiff-inductor-")
    torch.manual_seed(0)
    print(f"# tendiff.bench on {machine()}, dataset {args.dataset}, "
          f"allocator {'tuned (tendiff.runtime)' if tuned else 'glibc defaults'}")
    bs = args.batch_sizes
    cols = [c for b in bs for c in (f"b{b}_ms", f"b{b}_x")]
    if "forward" not in args.skip:
        print("\n## U-Net forward (median ms; x = speed-up over dense)\n")
        rows = bench_forward(args.dataset, bs, args.ranks, args.layouts, args.repeats)
        print(format_table(rows, ["model", "mode", "params"] + cols))
    if "layers" not in args.skip:
        print("\n## Single 3x3 conv layers (median ms)\n")
        print(format_table(bench_layers(args.dataset, bs, args.ranks, args.repeats), ["layer", "model", "mode", "batch", "ms", "x"]))
    if "purify" not in args.skip:
        print(f"\n## Whole purification, t*={args.t_star}, {args.steps} DDIM steps (median ms)\n")
        rows = bench_purify(args.dataset, bs, args.ranks, args.t_star, args.steps, args.repeats, args.compile,
                            args.layouts)
        extra = [f"b{b}_compile_s" for b in bs] if args.compile else []
        print(format_table(rows, ["model", "mode"] + cols + extra))
        if args.compile:
            print("\n(compiled rows: x is relative to compiled dense; compile_s is the first call, "
                  "compilation included, paid again for every new input shape and process)")
    if "long" not in args.skip:
        print(f"\n## Batch-1 purification, {args.long_steps} DDIM steps from t*={args.long_steps * 2} (median ms)\n")
        row = bench_long_purification(args.dataset, 2, args.long_steps, args.long_steps * 2, args.repeats)
        print(format_table([row], list(row)))
    if "throughput" not in args.skip:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        print(f"\n## Batch purification throughput, batch 256, t*={args.t_star}, {args.steps} DDIM steps "
              f"(images/s; bf16 = autocast){'' if 'cuda' in devices else '; no GPU on this machine'}\n")
        rows = bench_throughput(args.dataset, 2, args.t_star, args.steps, 256, devices)
        print(format_table(rows, ["device", "model", "batch", "fp32_img_s", "bf16_img_s"]))
    print(f"\npeak resident memory of this benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if "app" not in args.skip:
        print("\n## The app (python app.py on the committed checkpoints, driven by gradio_client)\n")
        row = bench_app()
        print(format_table([row], list(row)))


if __name__ == "__main__":
    main()
