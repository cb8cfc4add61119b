"""Pictures for the Studio UI: images enlarged for display, the step strip, the GIF of a run, the
perturbation made visible, a run's ZIP archive and the Learn tab's core figure. Pure functions of
tensors and frames (no Gradio)."""
from __future__ import annotations

import functools
import io
import json
import threading
import zipfile
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from tendiff.pipeline import Frame, RunResult


def to_pil(x: torch.Tensor, scale: int = 1) -> Image.Image:
    """(1, C, H, W) or (C, H, W) in [0, 1] -> PIL image, enlarged ``scale`` times (nearest)."""
    x = x.detach().cpu()
    x = x[0] if x.ndim == 4 else x
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def display_scale(x: torch.Tensor, target: int = 224) -> int:
    return max(1, target // max(x.shape[-2:]))


def gif_bytes(frames: Sequence[Frame], scale: int = 6, duration_ms: int = 150) -> bytes:
    """An animated GIF of the purification: x_t | predicted x_0 side by side per step."""
    images = []
    # Gray images stay gray: a grayscale GIF needs no per-frame colour quantisation (the slow part).
    mode = "L" if frames[0].x_t.shape[1] == 1 else "RGB"
    for f in frames:
        a, b = to_pil(f.x_t, scale).convert(mode), to_pil(f.pred_x0, scale).convert(mode)
        canvas = Image.new(mode, (a.width * 2 + scale, a.height), 255 if mode == "L" else (255, 255, 255))
        canvas.paste(a, (0, 0))
        canvas.paste(b, (a.width + scale, 0))
        images.append(canvas)
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms,
                   loop=0, disposal=1)
    return buf.getvalue()


def strip_image(frames: Sequence[Frame], max_frames: int = 11, scale: int = 3) -> Image.Image:
    """Two rows (x_t on top, predicted x_0 below) of at most ``max_frames`` evenly chosen steps."""
    n = len(frames)
    idx = sorted(set(np.linspace(0, n - 1, min(n, max_frames)).round().astype(int).tolist()))
    tiles = [(to_pil(frames[i].x_t, scale).convert("RGB"), to_pil(frames[i].pred_x0, scale).convert("RGB"))
             for i in idx]
    w, h = tiles[0][0].size
    gap = 2 * scale
    canvas = Image.new("RGB", (len(tiles) * (w + gap) - gap, 2 * h + gap), (255, 255, 255))
    for k, (a, b) in enumerate(tiles):
        canvas.paste(a, (k * (w + gap), 0))
        canvas.paste(b, (k * (w + gap), h + gap))
    return canvas


def runs_image(images: torch.Tensor, captions: Sequence[str], scale: int = 3, columns: int = 8) -> Image.Image:
    """Several purifications of one input in a grid, each captioned (e.g. with its prediction)."""
    from PIL import ImageDraw

    tiles = [to_pil(img, scale).convert("RGB") for img in images]
    w, h = tiles[0].size
    gap, text_h = 2 * scale, 14
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    canvas = Image.new("RGB", (cols * (w + gap) - gap, rows * (h + text_h + gap) - gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        x, y = (k % columns) * (w + gap), (k // columns) * (h + text_h + gap)
        canvas.paste(tile, (x, y))
        draw.text((x + 2, y + h + 1), caption[: max(4, w // 6)], fill=(0, 0, 0))
    return canvas


def perturbation_image(clean: torch.Tensor, corrupted: torch.Tensor, scale: int = 1) -> Image.Image:
    """The perturbation delta = corrupted - clean made visible: 0.5 + delta / (2 max|delta|), so
    mid-gray is no change, white the largest increase, black the largest decrease (all mid-gray
    when nothing changed); per channel for colour images."""
    delta = (corrupted - clean).detach().cpu().float()
    peak = float(delta.abs().max())
    return to_pil(0.5 + delta / (2 * peak) if peak > 0 else torch.full_like(delta, 0.5), scale)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def run_zip(result: RunResult, record: dict, gif: bytes | None = None, scale: int | None = None) -> bytes:
    """A run as a ZIP: clean, corrupted, purified and the visible perturbation as PNGs at native size
    and enlarged ``scale`` times (nearest; default: to about 224 pixels), the step strip, the GIF
    (``gif``, or made here) and ``run.json`` (``record``: settings, seed, t*, predictions, measures)."""
    scale = scale or display_scale(result.clean)
    images = {"clean": to_pil(result.clean), "corrupted": to_pil(result.corrupted.tensor),
              "purified": to_pil(result.purified),
              "perturbation": perturbation_image(result.clean, result.corrupted.tensor)}
    files = {}
    for name, img in images.items():
        files[f"{name}.png"] = _png(img)
        files[f"{name}_x{scale}.png"] = _png(img.resize((img.width * scale, img.height * scale), Image.NEAREST))
    files["steps.png"] = _png(strip_image(result.frames, scale=max(1, 84 // result.clean.shape[-1])))
    files["purification.gif"] = gif if gif is not None else gif_bytes(result.frames)
    record = dict(record, files={
        "clean.png, corrupted.png, purified.png": "native size (the model's input and output)",
        f"*_x{scale}.png": f"the same, enlarged {scale}x (nearest neighbour)",
        "perturbation.png": "0.5 + delta / (2 max|delta|), delta = corrupted - clean",
        "steps.png": "evenly chosen reverse steps: x_t (top), predicted clean image (bottom)",
        "purification.gif": "every reverse step: x_t | predicted clean image",
    })
    files["run.json"] = json.dumps(record, indent=2).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


_MATPLOTLIB = threading.Lock()  # matplotlib, its mathtext parser too, is not thread-safe; the app draws from many


def rendered(draw):
    """Run a figure-drawing function under one lock and return its figure as a PIL image (PNG)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs) -> Image.Image:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with _MATPLOTLIB:
            fig = draw(*args, **kwargs)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            plt.close(fig)
        buf.seek(0)
        return Image.open(buf)
    return wrapper


@rendered
def layer_figure(view: dict):
    """A TT layer's cores (top row) and the kernel they rebuild beside the dense model's (bottom row)."""
    import matplotlib.pyplot as plt

    cores = view["cores"]
    n = len(cores)
    fig = plt.figure(figsize=(12, 7.5))
    grid = fig.add_gridspec(2, 2 * n, height_ratios=[1, 1.6])
    for k, core in enumerate(cores):
        ax = fig.add_subplot(grid[0, 2 * k: 2 * k + 2])
        c = core.numpy()
        mat = c if c.ndim == 2 else c.reshape(c.shape[0], -1)
        ax.imshow(mat, cmap="RdBu_r", aspect="auto", interpolation="nearest")
        ax.set_title(f"core {k + 1} {tuple(c.shape)}", fontsize=11)
        ax.set_xticks([]), ax.set_yticks([])

    def tiles(kernel):  # the first 8x8 (out, in) channel pairs, each a 3x3 kernel
        k = kernel[:8, :8].numpy()
        o, i, kh, kw = k.shape
        pad = np.full((o, i, kh + 1, kw + 1), np.nan)
        pad[:, :, :kh, :kw] = k
        return pad.transpose(0, 2, 1, 3).reshape(o * (kh + 1), i * (kw + 1))

    vmax = float(view["rebuilt"][:8, :8].abs().max())
    rebuilt, dense = fig.add_subplot(grid[1, :n]), fig.add_subplot(grid[1, n:])
    rebuilt.imshow(tiles(view["rebuilt"]), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    rebuilt.set_title("kernel rebuilt from the cores", fontsize=11)
    if view["dense"] is not None:
        dense.imshow(tiles(view["dense"]), cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
        dense.set_title("dense model's kernel", fontsize=11)
    else:
        dense.text(0.5, 0.5, "dense checkpoint\nnot available", ha="center", va="center")
    for ax in (rebuilt, dense):
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{view['layer']} ({view['layout']} layout, ranks {view['ranks']}); kernels: first 8 out x 8 in "
                 "channels, each a 3x3 tile", fontsize=12)
    fig.tight_layout()
    return fig


@rendered
def params_figure(rows: Sequence[dict], rank: int | None = None, paper_max_rank: int = 4):
    """Whole-U-Net parameters against the rank for each layout (log scale), the dense count as a
    line, the chosen rank marked and the paper's R <= range shaded."""
    import matplotlib.pyplot as plt

    ranks = [row["rank"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.axhline(rows[0]["dense"], color="#7f7f7f", ls="--", label=f"dense ({rows[0]['dense']:,})")
    for layout, colour, title in (("tt", "#1f77b4", "TT"), ("ttm", "#2ca02c", "TT-matrix"),
                                  ("authors", "#d62728", "authors' layout")):
        ax.plot(ranks, [row[layout] for row in rows], "o-", ms=3, color=colour, label=title)
        if rank in ranks:
            value = rows[ranks.index(rank)][layout]
            ax.plot([rank], [value], "o", ms=8, mfc="none", color=colour)
            ax.annotate(f"{value:,}", (rank, value), xytext=(6, -4), textcoords="offset points", fontsize=8,
                        color=colour)
    ax.axvspan(ranks[0] - 0.5, paper_max_rank + 0.5, color="0.93", zorder=0)
    ax.text(ranks[0], rows[0]["dense"] * 1.15, f"the paper's R <= {paper_max_rank}", fontsize=8, color="0.4")
    if rank in ranks:
        ax.axvline(rank, color="0.3", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(ranks)
    ax.set_xlabel("rank R"), ax.set_ylabel("parameters (log scale)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


@rendered
def schedule_figure(stds: Sequence[float], t_star: int | None = None, trained_to: int = 400):
    """The diffusion noise std at t = 1..T (log scale), t* marked, the steps beyond training shaded."""
    import matplotlib.pyplot as plt

    t = np.arange(1, len(stds) + 1)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.semilogy(t, stds, color="#1f77b4")
    if t_star is not None and 1 <= t_star <= len(stds):
        std = stds[t_star - 1]
        ax.axvline(t_star, color="#d62728", ls="--")
        ax.annotate(f"t* = {t_star}: std {std:.3f}", (t_star, std), xytext=(10, -15), textcoords="offset points",
                    color="#d62728")
    ax.axvspan(trained_to, t[-1], color="0.9")
    ax.text((trained_to + t[-1]) / 2, stds[5], f"beyond the training range (t > {trained_to})", ha="center", fontsize=8)
    ax.set_xlabel("t"), ax.set_ylabel("noise std (pixel units)")
    ax.set_title("Diffusing to t adds this much Gaussian noise", fontsize=10)
    fig.tight_layout()
    return fig


@rendered
def evidence_figure(points: Sequence[dict], lines: Sequence[dict], current: str, title: str):
    """Accuracy against purifier parameters (log): ``points`` (name, parameters, accuracy, ci95) for
    the diffusion purifiers with 95% intervals, ``lines`` (name, accuracy) for those without
    parameters (no purifier, a classical filter) as horizontal lines; ``current`` is marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for pt in points:
        acc, (lo, hi) = 100 * pt["accuracy"], pt["ci95"]
        mine = pt["name"] == current
        ax.errorbar([pt["parameters"]], [acc], yerr=[[acc - 100 * lo], [100 * hi - acc]], fmt="o", capsize=2,
                    color="#d62728" if mine else "#1f77b4", ms=8 if mine else 4)
        ax.annotate(pt["name"], (pt["parameters"], acc), xytext=(4, 4), textcoords="offset points", fontsize=8,
                    fontweight="bold" if mine else "normal")
    for line in lines:
        mine = line["name"] == current
        style = "--" if line["name"] == "none" else ":"
        ax.axhline(100 * line["accuracy"], ls=style, lw=2 if mine else 1, color="#d62728" if mine else "0.45")
        ax.text(1.0, 100 * line["accuracy"], f" {line['name']} {100 * line['accuracy']:.1f}%", fontsize=8,
                va="center", transform=ax.get_yaxis_transform(), color="#d62728" if mine else "0.3")
    if points:
        from matplotlib.ticker import FuncFormatter, NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
    ax.set_xlabel("purifier parameters (log)"), ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


@rendered
def t_star_figure(rows: Sequence[dict], corruption: str, current: str, t_star: int | None, title: str):
    """Accuracy against t* per purifier (``rows`` of docs/t_star.json for one dataset), ``current``
    drawn bold, the chosen t* marked; adaptive-t* rows as points at their median t*."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    purifiers = sorted({r["purifier"] for r in rows if r["t_star"] is not None}, key=lambda p: p != current)
    for k, name in enumerate(purifiers):
        mine = name == current
        pts = sorted((r["t_star"], 100 * r["accuracy"][corruption]) for r in rows
                     if r["purifier"] == name and r["t_star"] is not None)
        ax.plot(*zip(*pts), "o-", lw=2.5 if mine else 1, ms=5 if mine else 3, label=name,
                color="#d62728" if mine else f"C{k}")
        for r in rows:
            if r["purifier"] == name and r.get("adaptive_factor") and r.get("median_t_star"):
                ax.plot(r["median_t_star"][corruption], 100 * r["accuracy"][corruption], "*" if r.get("matched") else "x",
                        ms=10 if r.get("matched") else 6, color="#d62728" if mine else f"C{k}")
    for r in rows:
        if r["purifier"] == "none":
            ax.axhline(100 * r["accuracy"][corruption], ls="--", color="0.45", label="no purifier")
    if t_star is not None:
        ax.axvline(t_star, color="0.3", lw=0.8)
    ax.set_xlabel("t* (adaptive t* at its median: * counts the input's noise, x adds the full noise)", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
