"""Train a classifier or a diffusion purifier: ``python -m tendiff.train --help``.

Resumable (``--run-dir`` holds the full training state, written every ``--save-every`` steps and
on Ctrl-C; ``--resume`` continues it), seeded, time-boxed (``--minutes``), CPU or CUDA
automatically, and multi-GPU through ``torchrun --nproc_per_node N -m tendiff.train ...`` (DDP).
A TT purifier can start from scratch or from a trained dense one (``--init-from``: TT-SVD of
every eligible conv, then fine-tuning). The final weights (the EMA for purifiers) go to ``--out``
and into the manifest with the command, seed, steps, wall time, hardware and measured metrics.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoints as ckpt
from .classifiers import build_classifier, predict
from .data import DATASETS, load_dataset
from .diffusion import GaussianDiffusion, ScheduleConfig
from .protocol import model_label as protocol_label
from . import cli
from .runtime import machine, tune_allocator
from .tt import LAYOUTS
from .unet import UNet, preset, unet_from_dense


@dataclass
class TrainConfig:
    """One training run; every field is one command-line option (``python -m tendiff.train --help``)."""

    what: str = cli.field(help="what to train", choices=("classifier", "purifier"))
    dataset: str = cli.field(help="dataset", choices=DATASETS, flag="--dataset")
    conv: str = cli.field("dense", "purifier convolutions", choices=("dense",) + LAYOUTS)
    rank: int = cli.field(2, "TT rank (every bond)")
    init_from: str | None = cli.field(None, "dense purifier checkpoint to TT-SVD from (else from scratch)", type=str)
    distill_from: str | None = cli.field(
        None, "purifier checkpoint whose noise estimate is the regression target instead of the sampled noise "
              "(distillation: the same minimiser, far less gradient noise)", type=str)
    conditional: bool = cli.field(False, "class-conditional purifier (label dropout, for classifier-free guidance)")
    steps: int = cli.field(5000, "optimizer steps (the cosine schedule spans them; with --until-converged, the cap)")
    until_converged: bool = cli.field(
        False, "purifiers: constant LR after warm-up, and stop once the held-out loss (EMA weights, every "
               "--eval-every steps) improved by less than --converge-tol over the last quarter of the steps "
               "(checked from --min-steps on)")
    converge_tol: float = cli.field(0.01, "relative improvement that counts (0.01: 1%%)")
    min_steps: int = cli.field(2000, "no convergence check before this step")
    eval_every: int = cli.field(250, "purifiers: held-out loss every N steps (the loss curve in the manifest; 0: none)")
    minutes: float | None = cli.field(None, "stop (and save) after this wall time", type=float)
    batch_size: int = cli.field(128, "images per step")
    lr: float | None = cli.field(None, "peak learning rate (default per model)", type=float)
    t_max: int = cli.field(400, "train the purifier on t in 1..t-max only (purification never goes deeper)")
    ema: float = cli.field(0.999, "EMA decay of purifier weights")
    seed: int = cli.field(0, "seed of the data order, noises and initialisation")
    out: str | None = cli.field(None, "final checkpoint (default checkpoints/<dataset>_<model>.safetensors)", type=str)
    run_dir: str | None = cli.field(None, "where the resumable state lives (default runs/<out name>)", type=str)
    resume: bool = cli.field(False, "continue from --run-dir/state.pt")
    save_every: int = cli.field(250, "write the resumable state every N steps")
    device: str | None = cli.field(None, "cpu or cuda (default: cuda when available)", type=str)
    threads: int | None = cli.field(None, "CPU threads (default: all cores)", type=int)
    manifest: bool = cli.field(True, "do not record the result in the manifest", flag="--no-manifest")

    @property
    def label(self) -> str:
        """The checkpoint's model label: classifier, dense, tt-r2, ..., with -cond when conditional."""
        if self.what == "classifier":
            return "classifier"
        return protocol_label(self.conv, self.rank) + ("-cond" if self.conditional else "")


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m tendiff.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(p, TrainConfig)
    return cli.from_args(TrainConfig, p.parse_args(argv))


# ----------------------------------------------------------------- helpers
def augment(x: torch.Tensor, dataset: str, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 (MNIST-like) or 4 (CIFAR) pixels; horizontal flips
    except for digits."""
    pad = 4 if dataset == "cifar10" else 2
    n, _, h, w = x.shape
    # Zero padding then a random crop back to h x w.
    padded = F.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if dataset != "mnist":
        flip = torch.rand(n, generator=g) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def lr_at(step: int, total: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_denoising_loss(model: UNet, diffusion: GaussianDiffusion, images: torch.Tensor, t_max: int,
                           seed: int = 1234, batch_size: int = 250) -> float:
    """Mean eps-prediction MSE on held-out images with a fixed draw of t and noise."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(images), batch_size):
        x0 = images[i:i + batch_size] * 2 - 1
        t = torch.randint(1, t_max + 1, (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = diffusion.q_sample(x0, t, noise)
        pred = model(x_t.to(device), t.to(device)).cpu()
        total += F.mse_loss(pred, noise, reduction="sum").item()
    return total / images.numel()


def converged(curve: list[tuple[int, float]], tol: float, min_steps: int) -> bool:
    """True when the best held-out loss improved by less than ``tol`` (relative) over the last
    quarter of the steps: best(step <= 3/4 s) vs best(step <= s), s the curve's last step."""
    if not curve or curve[-1][0] < min_steps:
        return False
    last = curve[-1][0]
    before = [loss for step, loss in curve if step <= 0.75 * last]
    if not before:
        return False
    best_before, best_now = min(before), min(loss for _, loss in curve)
    return (best_before - best_now) / best_before < tol


def conditional_from_unconditional(dense: UNet, num_classes: int) -> UNet:
    """A class-conditional copy of a trained unconditional U-Net. The label embedding starts
    at zero, so the copy begins as exactly the unconditional model and fine-tuning only has to
    learn what the label adds."""
    model = UNet(replace(dense.config, num_classes=num_classes))
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("label_embed") for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(model.label_embed.weight)
    return model


# -------------------------------------------------------------------- train
def train(cfg: TrainConfig, command: str = "") -> dict:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + rank)
    g = torch.Generator().manual_seed(cfg.seed + rank)

    out = Path(cfg.out) if cfg.out else ckpt.checkpoint_dir() / ckpt.checkpoint_name(cfg.dataset, cfg.label)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / out.stem
    state_path = run_dir / "state.pt"

    train_set = load_dataset(cfg.dataset, "train")
    full_test = load_dataset(cfg.dataset, "test")
    test_set = full_test.subset(1000)
    # The loss curve and the stopping rule read the *last* 1000 test images, so that neither
    # touches the first 1000 on which every accuracy is measured.
    val_images = full_test.float_images(slice(max(0, len(full_test) - 1000), None))
    images = train_set.images
    labels = train_set.labels

    diffusion = None
    if cfg.what == "classifier":
        model = build_classifier(cfg.dataset)
        peak_lr = cfg.lr or 2e-3
    else:
        diffusion = GaussianDiffusion(ScheduleConfig())
        num_classes = 10 if cfg.conditional else 0
        if cfg.init_from:
            dense = ckpt.load_checkpoint(cfg.init_from)
            if cfg.conv != "dense":
                model = unet_from_dense(dense, cfg.rank, cfg.conv)
            elif cfg.conditional and dense.config.num_classes == 0:
                model = conditional_from_unconditional(dense, num_classes)
            else:
                model = dense
        else:
            model = UNet(preset(cfg.dataset, cfg.conv, cfg.rank, num_classes=num_classes))
        if cfg.conditional and model.config.num_classes == 0:
            raise SystemExit("--conditional with --init-from takes a dense checkpoint (TT conditional models are not offered)")
        peak_lr = cfg.lr or (1e-3 if cfg.init_from else 2e-3)
    model.to(device)
    # Channels-last for dense convs, NCHW for TT chains: each trains faster that way
    # (docs/performance.md, 'Why the code is shaped this way'); the state dict is the same.
    tt_model = getattr(getattr(model, "config", None), "conv", "dense") != "dense"
    memory_format = torch.contiguous_format if tt_model else torch.channels_last
    model.to(memory_format=memory_format)
    ema = copy.deepcopy(model).eval() if cfg.what == "purifier" else None
    teacher = None
    if cfg.distill_from:
        if cfg.what != "purifier" or cfg.conditional:
            raise SystemExit("--distill-from takes an unconditional purifier run")
        teacher = ckpt.load_checkpoint(cfg.distill_from).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0 if cfg.what == "purifier" else 5e-4)
    step, elapsed = 0, 0.0
    resumed_at = None
    curve: list[tuple[int, float]] = []  # (step, held-out eps-MSE of the EMA weights)
    schedule = "constant" if cfg.until_converged else "cosine"
    if cfg.until_converged and cfg.what != "purifier":
        raise SystemExit("--until-converged is for purifiers (it reads the held-out denoising loss)")
    if cfg.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step, elapsed = state["step"], state["elapsed"]
        curve = [(int(a), float(b)) for a, b in state.get("curve", [])]
        resumed_at = step
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            print(f"resumed {state_path} at step {step} ({elapsed / 60:.1f} min done)")
    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save_state():
        if rank != 0:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed": elapsed,
                 "generator": g.get_state(), "torch_rng": torch.get_rng_state(), "curve": curve}
        if ema is not None:
            state["ema"] = ema.state_dict()
        torch.save(state, run_dir / "state.tmp")
        (run_dir / "state.tmp").replace(state_path)

    warmup = min(200, cfg.steps // 10) if not cfg.init_from else min(50, cfg.steps // 10)
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, desc=f"{cfg.dataset} {cfg.label}")
    t_start = time.perf_counter() - elapsed
    seen_since, t_since = 0, time.perf_counter()
    loss_avg = None
    model.train()
    try:
        while step < cfg.steps:
            if cfg.minutes is not None and time.perf_counter() - t_start > cfg.minutes * 60:
                if rank == 0:
                    print(f"time budget of {cfg.minutes} min reached at step {step}")
                break
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
            x = images[idx].float() / 255.0
            y = labels[idx]
            x = augment(x, cfg.dataset, g) if (cfg.what == "classifier" or cfg.dataset == "cifar10") else x
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.steps, peak_lr, warmup, schedule)
            if cfg.what == "classifier":
                loss = F.cross_entropy(net(x.contiguous(memory_format=memory_format)), y, label_smoothing=0.1 if cfg.dataset == "cifar10" else 0.0)
            else:
                x0 = x * 2 - 1
                t = torch.randint(1, cfg.t_max + 1, (len(x0),), generator=g).to(device)
                noise = torch.randn(x0.shape, generator=g).to(device)
                cond = None
                if model.config.num_classes:
                    drop = torch.rand(len(y), generator=g).to(device) < 0.15
                    cond = torch.where(drop, torch.full_like(y, model.null_label), y)
                x_t = diffusion.q_sample(x0, t, noise).contiguous(memory_format=memory_format)
                target = noise
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(x_t, t)
                loss = F.mse_loss(net(x_t, t, cond), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if ema is not None:
                decay = min(cfg.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - decay)
            step += 1
            seen_since += len(x) * world
            loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
            if step % 20 == 0 and rank == 0:
                now = time.perf_counter()
                bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{seen_since / (now - t_since):.0f}", refresh=False)
                seen_since, t_since = 0, now
            bar.update(1)
            if ema is not None and cfg.eval_every and step % cfg.eval_every == 0:
                curve.append((step, round(heldout_denoising_loss(ema, diffusion, val_images, cfg.t_max), 6)))
                bar.write(f"step {step}: held-out loss {curve[-1][1]:.5f}")
                if cfg.until_converged and converged(curve, cfg.converge_tol, cfg.min_steps):
                    bar.write(f"converged at step {step}: under {cfg.converge_tol:.0%} better over the last quarter")
                    break
            elapsed = time.perf_counter() - t_start
            if step % cfg.save_every == 0:
                save_state()
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted at step {step}; state saved, continue with --resume")
        elapsed = time.perf_counter() - t_start
        save_state()
        raise
    bar.close()
    elapsed = time.perf_counter() - t_start
    save_state()
    if distributed:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return {}

    final = (ema if ema is not None else model).cpu().eval().to(memory_format=torch.contiguous_format)
    metrics = {}
    test_images = test_set.float_images()
    if cfg.what == "classifier":
        probs = predict(final, test_images)
        metrics["clean_accuracy_first1000"] = round((probs.argmax(1) == test_set.labels).float().mean().item(), 4)
    else:
        metrics["heldout_eps_mse_first1000"] = round(heldout_denoising_loss(final, diffusion, test_images, cfg.t_max), 5)
    record = {
        "command": command,
        "seed": cfg.seed, "steps": step, "batch_size": cfg.batch_size * world,
        "wall_time_s": round(elapsed, 1), "hardware": machine(), "torch": torch.__version__,
        "t_max": cfg.t_max if cfg.what == "purifier" else None,
        "init_from": Path(cfg.init_from).name if cfg.init_from else None,
        "distill_from": Path(cfg.distill_from).name if cfg.distill_from else None,
        "resumed_at_step": resumed_at,  # the command continued a run saved in --run-dir at this step
        "train_metrics": metrics,
        "schedule": schedule,
        "converged": converged(curve, cfg.converge_tol, cfg.min_steps) if cfg.until_converged else None,
        "heldout_curve": curve,  # (step, eps-MSE on the last 1000 test images), EMA weights
    }
    ckpt.save_checkpoint(final, out, extra={k: record[k] for k in ("command", "seed", "steps", "t_max")})
    if cfg.manifest:
        ckpt.update_manifest(out, final, record)
    print(f"saved {out} ({sum(p.numel() for p in final.parameters())} params) after {step} steps, "
          f"{elapsed / 60:.1f} min: {metrics}")
    return record


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    tune_allocator()
    # A job killed with SIGTERM (a session ending, `kill`) saves its state like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        train(cfg, "python -m tendiff.train " + " ".join(shlex.quote(a) for a in argv))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
