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
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoints as ckpt
from .classifiers import build_classifier, predict
from .data import DATASETS, load_dataset
from .diffusion import GaussianDiffusion, ScheduleConfig
from .protocol import model_label as protocol_label
from .runtime import machine, tune_allocator
from .tt import LAYOUTS
from .unet import UNet, preset, unet_from_dense


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tendiff.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["classifier", "purifier"])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--conv", default="dense", choices=("dense",) + LAYOUTS, help="purifier convolutions")
    p.add_argument("--rank", type=int, default=2, help="TT rank (every bond)")
    p.add_argument("--init-from", help="dense purifier checkpoint to TT-SVD from (else from scratch)")
    p.add_argument("--distill-from",
                   help="purifier checkpoint whose noise estimate is the regression target instead of "
                        "the sampled noise (distillation: the same minimiser, far less gradient noise)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional purifier (label dropout, for classifier-free guidance)")
    p.add_argument("--steps", type=int, default=5000,
                   help="optimizer steps (the cosine schedule spans them; with --until-converged, the cap)")
    p.add_argument("--until-converged", action="store_true",
                   help="purifiers: constant LR after warm-up, and stop once the held-out loss (EMA weights, "
                        "every --eval-every steps) improved by less than --converge-tol over the last quarter "
                        "of the steps (checked from --min-steps on)")
    p.add_argument("--converge-tol", type=float, default=0.01, help="relative improvement that counts (0.01: 1%%)")
    p.add_argument("--min-steps", type=int, default=2000, help="no convergence check before this step")
    p.add_argument("--eval-every", type=int, default=250,
                   help="purifiers: held-out loss every N steps (the loss curve in the manifest; 0: none)")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    p.add_argument("--t-max", type=int, default=400,
                   help="train the purifier on t in 1..t-max only (purification never goes deeper)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of purifier weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="final checkpoint (default checkpoints/<dataset>_<model>.safetensors)")
    p.add_argument("--run-dir", help="where the resumable state lives (default runs/<out name>)")
    p.add_argument("--resume", action="store_true", help="continue from --run-dir/state.pt")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-manifest", action="store_true", help="do not record the result in the manifest")
    return p.parse_args(argv)


def model_label(args) -> str:
    if args.what == "classifier":
        return "classifier"
    label = protocol_label(args.conv, args.rank)
    return label + ("-cond" if args.conditional else "")


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
def train(args: argparse.Namespace) -> dict:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed + rank)
    g = torch.Generator().manual_seed(args.seed + rank)

    out = Path(args.out) if args.out else ckpt.checkpoint_dir() / ckpt.checkpoint_name(args.dataset, model_label(args))
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / out.stem
    state_path = run_dir / "state.pt"

    train_set = load_dataset(args.dataset, "train")
    full_test = load_dataset(args.dataset, "test")
    test_set = full_test.subset(1000)
    # The loss curve and the stopping rule read the *last* 1000 test images, so that neither
    # touches the first 1000 on which every accuracy is measured.
    val_images = full_test.float_images(slice(max(0, len(full_test) - 1000), None))
    images = train_set.images
    labels = train_set.labels

    diffusion = None
    if args.what == "classifier":
        model = build_classifier(args.dataset)
        peak_lr = args.lr or 2e-3
    else:
        diffusion = GaussianDiffusion(ScheduleConfig())
        num_classes = 10 if args.conditional else 0
        if args.init_from:
            dense = ckpt.load_checkpoint(args.init_from)
            if args.conv != "dense":
                model = unet_from_dense(dense, args.rank, args.conv)
            elif args.conditional and dense.config.num_classes == 0:
                model = conditional_from_unconditional(dense, num_classes)
            else:
                model = dense
        else:
            model = UNet(preset(args.dataset, args.conv, args.rank, num_classes=num_classes))
        if args.conditional and model.config.num_classes == 0:
            raise SystemExit("--conditional with --init-from takes a dense checkpoint (TT conditional models are not offered)")
        peak_lr = args.lr or (1e-3 if args.init_from else 2e-3)
    model.to(device)
    # Channels-last training steps are faster on CPU for dense convs (measured at batch 128,
    # 2 cores: CIFAR-10 classifier 1.4x, dense U-Net 1.17x); TT chains are faster in NCHW (MNIST
    # tt-r2 U-Net: 211 vs 260 ms per step). The state dict is unchanged either way.
    tt_model = getattr(getattr(model, "config", None), "conv", "dense") != "dense"
    memory_format = torch.contiguous_format if tt_model else torch.channels_last
    model.to(memory_format=memory_format)
    ema = copy.deepcopy(model).eval() if args.what == "purifier" else None
    teacher = None
    if args.distill_from:
        if args.what != "purifier" or args.conditional:
            raise SystemExit("--distill-from takes an unconditional purifier run")
        teacher = ckpt.load_checkpoint(args.distill_from).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0 if args.what == "purifier" else 5e-4)
    step, elapsed = 0, 0.0
    resumed_at = None
    curve: list[tuple[int, float]] = []  # (step, held-out eps-MSE of the EMA weights)
    schedule = "constant" if args.until_converged else "cosine"
    if args.until_converged and args.what != "purifier":
        raise SystemExit("--until-converged is for purifiers (it reads the held-out denoising loss)")
    if args.resume and state_path.exists():
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

    warmup = min(200, args.steps // 10) if not args.init_from else min(50, args.steps // 10)
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, desc=f"{args.dataset} {model_label(args)}")
    t_start = time.perf_counter() - elapsed
    seen_since, t_since = 0, time.perf_counter()
    loss_avg = None
    model.train()
    try:
        while step < args.steps:
            if args.minutes is not None and time.perf_counter() - t_start > args.minutes * 60:
                if rank == 0:
                    print(f"time budget of {args.minutes} min reached at step {step}")
                break
            idx = torch.randint(0, len(images), (args.batch_size,), generator=g)
            x = images[idx].float() / 255.0
            y = labels[idx]
            x = augment(x, args.dataset, g) if (args.what == "classifier" or args.dataset == "cifar10") else x
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args.steps, peak_lr, warmup, schedule)
            if args.what == "classifier":
                loss = F.cross_entropy(net(x.contiguous(memory_format=memory_format)), y, label_smoothing=0.1 if args.dataset == "cifar10" else 0.0)
            else:
                x0 = x * 2 - 1
                t = torch.randint(1, args.t_max + 1, (len(x0),), generator=g).to(device)
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
                decay = min(args.ema, (1 + step) / (10 + step))
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
            if ema is not None and args.eval_every and step % args.eval_every == 0:
                curve.append((step, round(heldout_denoising_loss(ema, diffusion, val_images, args.t_max), 6)))
                bar.write(f"step {step}: held-out loss {curve[-1][1]:.5f}")
                if args.until_converged and converged(curve, args.converge_tol, args.min_steps):
                    bar.write(f"converged at step {step}: under {args.converge_tol:.0%} better over the last quarter")
                    break
            elapsed = time.perf_counter() - t_start
            if step % args.save_every == 0:
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
    if args.what == "classifier":
        probs = predict(final, test_images)
        metrics["clean_accuracy_first1000"] = round((probs.argmax(1) == test_set.labels).float().mean().item(), 4)
    else:
        metrics["heldout_eps_mse_first1000"] = round(heldout_denoising_loss(final, diffusion, test_images, args.t_max), 5)
    record = {
        "command": "python -m tendiff.train " + " ".join(shlex.quote(a) for a in (args.argv or [])),
        "seed": args.seed, "steps": step, "batch_size": args.batch_size * world,
        "wall_time_s": round(elapsed, 1), "hardware": machine(), "torch": torch.__version__,
        "t_max": args.t_max if args.what == "purifier" else None,
        "init_from": Path(args.init_from).name if args.init_from else None,
        "distill_from": Path(args.distill_from).name if args.distill_from else None,
        "resumed_at_step": resumed_at,  # the command continued a run saved in --run-dir at this step
        "train_metrics": metrics,
        "schedule": schedule,
        "converged": converged(curve, args.converge_tol, args.min_steps) if args.until_converged else None,
        "heldout_curve": curve,  # (step, eps-MSE on the last 1000 test images), EMA weights
    }
    ckpt.save_checkpoint(final, out, extra={k: record[k] for k in ("command", "seed", "steps", "t_max")})
    if not args.no_manifest:
        ckpt.update_manifest(out, final, record)
    print(f"saved {out} ({sum(p.numel() for p in final.parameters())} params) after {step} steps, "
          f"{elapsed / 60:.1f} min: {metrics}")
    return record


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    tune_allocator()
    # A job killed with SIGTERM (a session ending, `kill`) saves its state like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        train(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
