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
from .unet import UNet, UNetConfig, preset, unet_from_dense


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
    width: int | None = cli.field(None, "purifiers from scratch: channels at every U-Net level (default: the dataset's "
                                  "preset, 48); for testing whether the preset is capacity-bound", type=int)
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
    compile: bool = cli.field(False, "torch.compile the network: dense U-Nets train ~1.2x faster on CPU after about a "
                                     "minute of compilation; TT chains gain nothing (docs/performance.md)")
    manifest: bool = cli.field(True, "do not record the result in the manifest", flag="--no-manifest")

    @property
    def label(self) -> str:
        """The checkpoint's model label: classifier, dense, tt-r2, ..., with -cond when conditional and
        -w<width> at another width (so that a width experiment never overwrites the preset's weights)."""
        if self.what == "classifier":
            return "classifier"
        return (protocol_label(self.conv, self.rank) + ("-cond" if self.conditional else "")
                + (f"-w{self.width}" if self.width else ""))


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
def setup_device(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """The device, this process's rank and the world size (torchrun sets RANK and WORLD_SIZE)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return device, rank, world


def purifier_config(cfg: TrainConfig) -> UNetConfig:
    """The U-Net of a purifier trained from scratch: the dataset's preset, --width wide if given."""
    base = preset(cfg.dataset, cfg.conv, cfg.rank, num_classes=10 if cfg.conditional else 0)
    return replace(base, channels=(cfg.width,) * len(base.channels)) if cfg.width else base


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, float]:
    """The network to train (from scratch, TT-SVD of --init-from, or its conditional copy) and its
    peak learning rate."""
    if cfg.what == "classifier":
        return build_classifier(cfg.dataset), cfg.lr or 2e-3
    if not cfg.init_from:
        return UNet(purifier_config(cfg)), cfg.lr or 2e-3
    dense = ckpt.load_checkpoint(cfg.init_from)
    if cfg.conv != "dense":
        model = unet_from_dense(dense, cfg.rank, cfg.conv)
    elif cfg.conditional and dense.config.num_classes == 0:
        model = conditional_from_unconditional(dense, 10)
    else:
        model = dense
    if cfg.conditional and model.config.num_classes == 0:
        raise SystemExit("--conditional with --init-from takes a dense checkpoint (TT conditional models are not offered)")
    return model, cfg.lr or 1e-3


def check_options(cfg: TrainConfig) -> None:
    """Refuse option combinations that cannot work, before any work."""
    if cfg.until_converged and cfg.what != "purifier":
        raise SystemExit("--until-converged is for purifiers (it reads the held-out denoising loss)")
    if cfg.distill_from and (cfg.what != "purifier" or cfg.conditional):
        raise SystemExit("--distill-from takes an unconditional purifier run")
    if cfg.width and (cfg.what != "purifier" or cfg.init_from):
        raise SystemExit("--width sets a purifier trained from scratch: not a classifier, not with --init-from")
    if cfg.width:
        try:
            purifier_config(cfg)
        except ValueError as e:  # the U-Net's own check (e.g. widths divisible by the GroupNorm groups)
            raise SystemExit(f"--width {cfg.width}: {e}") from None


class Trainer:
    """One run: the model, its optimiser and EMA, the data, the random stream, and the state that
    ``--resume`` restores (:meth:`save` / :meth:`load`)."""

    def __init__(self, cfg: TrainConfig):
        check_options(cfg)
        self.cfg = cfg
        self.device, self.rank, self.world = setup_device(cfg)
        torch.manual_seed(cfg.seed + self.rank)
        self.g = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.out = Path(cfg.out) if cfg.out else ckpt.checkpoint_dir() / ckpt.checkpoint_name(cfg.dataset, cfg.label)
        self.state_path = (Path(cfg.run_dir) if cfg.run_dir else Path("runs") / self.out.stem) / "state.pt"
        self.train_set = load_dataset(cfg.dataset, "train")
        full_test = load_dataset(cfg.dataset, "test")
        self.test_set = full_test.subset(1000)
        # The loss curve and the stopping rule read the *last* 1000 test images, so that neither
        # touches the first 1000 on which every accuracy is measured.
        self.val_images = full_test.float_images(slice(max(0, len(full_test) - 1000), None))
        self.diffusion = GaussianDiffusion(ScheduleConfig()) if cfg.what == "purifier" else None
        self.model, self.peak_lr = build_model(cfg)
        self.model.to(self.device)
        # Channels-last for dense convs, NCHW for TT chains: each trains faster that way
        # (docs/performance.md, 'Why the code is shaped this way'); the state dict is the same.
        tt_model = getattr(getattr(self.model, "config", None), "conv", "dense") != "dense"
        self.memory_format = torch.contiguous_format if tt_model else torch.channels_last
        self.model.to(memory_format=self.memory_format)
        self.ema = copy.deepcopy(self.model).eval() if cfg.what == "purifier" else None
        self.teacher = (ckpt.load_checkpoint(cfg.distill_from).to(self.device).eval().requires_grad_(False)
                        if cfg.distill_from else None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.peak_lr,
                                     weight_decay=0.0 if cfg.what == "purifier" else 5e-4)
        self.step, self.elapsed = 0, 0.0
        self.segments: list[tuple[int, str]] = [(0, machine())]  # (first step, hardware) of each resumed part
        self.curve: list[tuple[int, float]] = []  # (step, held-out eps-MSE of the EMA weights)
        self.schedule = "constant" if cfg.until_converged else "cosine"
        self.warmup = min(50 if cfg.init_from else 200, cfg.steps // 10)
        self.net = self.model
        if self.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:  # (the state dict stays self.model's: checkpoints and resumes are the same)
            self.net = torch.compile(self.net)

    # -- state
    def save(self) -> None:
        if self.rank != 0:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "elapsed": self.elapsed, "generator": self.g.get_state(), "torch_rng": torch.get_rng_state(),
                 "curve": self.curve, "segments": [list(seg) for seg in self.segments]}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        tmp = self.state_path.with_name("state.tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def load(self) -> None:
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.curve = [(int(a), float(b)) for a, b in state.get("curve", [])]
        # (states saved before segments were recorded did not say what ran their first part)
        earlier = [(int(a), str(b)) for a, b in state.get("segments", [(0, "not recorded")])]
        self.segments = [*earlier, (self.step, machine())]
        self.g.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.rank == 0:
            print(f"resumed {self.state_path} at step {self.step} ({self.elapsed / 60:.1f} min done)")

    # -- one step
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, data = self.cfg, self.train_set
        idx = torch.randint(0, len(data.images), (cfg.batch_size,), generator=self.g)
        x, y = data.images[idx].float() / 255.0, data.labels[idx]
        if cfg.what == "classifier" or cfg.dataset == "cifar10":
            x = augment(x, cfg.dataset, self.g)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (classifier), or the eps-prediction MSE at a random t <= t_max (purifier;
        the target is the teacher's estimate when distilling)."""
        if self.cfg.what == "classifier":
            return F.cross_entropy(self.net(x.contiguous(memory_format=self.memory_format)), y,
                                   label_smoothing=0.1 if self.cfg.dataset == "cifar10" else 0.0)
        x0, g, device = x * 2 - 1, self.g, self.device
        t = torch.randint(1, self.cfg.t_max + 1, (len(x0),), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        cond = None
        if self.model.config.num_classes:  # label dropout for classifier-free guidance
            drop = torch.rand(len(y), generator=g).to(device) < 0.15
            cond = torch.where(drop, torch.full_like(y, self.model.null_label), y)
        x_t = self.diffusion.q_sample(x0, t, noise).contiguous(memory_format=self.memory_format)
        target = noise
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x_t, t)
        return F.mse_loss(self.net(x_t, t, cond), target)

    def update(self) -> float:
        """One optimiser step (and the EMA's); returns the batch loss."""
        x, y = self.batch()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg.steps, self.peak_lr, self.warmup, self.schedule)
        loss = self.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.ema is not None:
            decay = min(self.cfg.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(pm, 1 - decay)
        self.step += 1
        return loss.item()

    def evaluate_heldout(self) -> bool:
        """Append the EMA's held-out loss to the curve; True when --until-converged says stop."""
        cfg = self.cfg
        self.curve.append((self.step, round(heldout_denoising_loss(self.ema, self.diffusion, self.val_images,
                                                                   cfg.t_max), 6)))
        tqdm.write(f"step {self.step}: held-out loss {self.curve[-1][1]:.5f}")
        if cfg.until_converged and converged(self.curve, cfg.converge_tol, cfg.min_steps):
            tqdm.write(f"converged at step {self.step}: under {cfg.converge_tol:.0%} better over the last quarter")
            return True
        return False

    # -- the loop
    def run(self) -> None:
        """Train to --steps (or convergence, or --minutes), saving the state every --save-every
        steps and on Ctrl-C / SIGTERM."""
        cfg, lead = self.cfg, self.rank == 0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not lead, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, desc=f"{cfg.dataset} {cfg.label}")
        t_start = time.perf_counter() - self.elapsed
        seen_since, t_since, loss_avg = 0, time.perf_counter(), None
        self.model.train()
        try:
            while self.step < cfg.steps:
                if cfg.minutes is not None and time.perf_counter() - t_start > cfg.minutes * 60:
                    if lead:
                        print(f"time budget of {cfg.minutes} min reached at step {self.step}")
                    break
                loss = self.update()
                seen_since += cfg.batch_size * self.world
                loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
                if self.step % 20 == 0 and lead:
                    now = time.perf_counter()
                    bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{seen_since / (now - t_since):.0f}", refresh=False)
                    seen_since, t_since = 0, now
                bar.update(1)
                if self.ema is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.evaluate_heldout():
                    break
                self.elapsed = time.perf_counter() - t_start
                if self.step % cfg.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            if lead:
                print(f"interrupted at step {self.step}; state saved, continue with --resume")
            self.elapsed = time.perf_counter() - t_start
            self.save()
            raise
        bar.close()
        self.elapsed = time.perf_counter() - t_start
        self.save()

    # -- the result
    def hardware(self) -> str:
        """What ran the steps: one machine, or each resumed part's ('steps 0-1163: ...; steps 1163-2000: ...')."""
        if len({hw for _, hw in self.segments}) == 1:
            return self.segments[0][1]
        ends = [start for start, _ in self.segments[1:]] + [self.step]
        return "; ".join(f"steps {start}-{end}: {hw}" for (start, hw), end in zip(self.segments, ends) if end > start)

    def finish(self, command: str) -> dict:
        """Write the final weights (the EMA for purifiers) and their manifest record."""
        cfg = self.cfg
        final = (self.ema if self.ema is not None else self.model).cpu().eval().to(memory_format=torch.contiguous_format)
        test_images = self.test_set.float_images()
        if cfg.what == "classifier":
            probs = predict(final, test_images)
            metrics = {"clean_accuracy_first1000": round((probs.argmax(1) == self.test_set.labels).float().mean().item(), 4)}
        else:
            metrics = {"heldout_eps_mse_first1000": round(heldout_denoising_loss(final, self.diffusion, test_images,
                                                                                   cfg.t_max), 5)}
        record = {
            "command": command,
            "seed": cfg.seed, "steps": self.step, "batch_size": cfg.batch_size * self.world,
            "wall_time_s": round(self.elapsed, 1), "hardware": self.hardware(), "torch": torch.__version__,
            "t_max": cfg.t_max if cfg.what == "purifier" else None,
            "init_from": Path(cfg.init_from).name if cfg.init_from else None,
            "distill_from": Path(cfg.distill_from).name if cfg.distill_from else None,
            # (this command continued a run saved in --run-dir at this step)
            "resumed_at_step": self.segments[-1][0] if len(self.segments) > 1 else None,
            "train_metrics": metrics,
            "schedule": self.schedule,
            "converged": converged(self.curve, cfg.converge_tol, cfg.min_steps) if cfg.until_converged else None,
            "heldout_curve": self.curve,  # (step, eps-MSE on the last 1000 test images), EMA weights
        }
        ckpt.save_checkpoint(final, self.out, extra={k: record[k] for k in ("command", "seed", "steps", "t_max")})
        if cfg.manifest:
            ckpt.update_manifest(self.out, final, record)
        print(f"saved {self.out} ({sum(p.numel() for p in final.parameters())} params) after {self.step} steps, "
              f"{self.elapsed / 60:.1f} min: {metrics}")
        return record


def train(cfg: TrainConfig, command: str = "") -> dict:
    """Train as ``cfg`` says (resuming when asked and a state exists); the manifest record, or {}
    on ranks other than 0."""
    trainer = Trainer(cfg)
    if cfg.resume and trainer.state_path.exists():
        trainer.load()
    trainer.run()
    if trainer.world > 1:
        torch.distributed.destroy_process_group()
    return trainer.finish(command) if trainer.rank == 0 else {}


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
