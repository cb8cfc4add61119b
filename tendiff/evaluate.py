"""Evaluation: ``python -m tendiff.evaluate --help``.

Runs the matrix corruption x purifier on a fixed, seeded subset of a test split and writes
``results.json``, ``results.csv``, ``results.md`` and figures to ``--out``.

Threat models are written next to every column: *transfer* attacks are crafted on the bare
classifier and never see the purifier, so their numbers are not robustness against an attacker
who knows the defense; the *adaptive* column attacks classifier-and-purifier together (PGD+EOT
with real gradients through a few-step DDIM surrogate of the purifier).

Per cell: accuracy (mean over ``--seeds`` purification seeds) with a 95% Wilson interval,
worst-of-seeds accuracy (an image counts only if every seed classifies it correctly), and
PSNR / SSIM of the purified image to the clean one. Per purifier: parameters, size on disk,
MACs per forward and measured seconds per image at batch 1 and 64.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import attacks
from . import checkpoints as ckpt
from .classifiers import predict
from .data import DATASETS, load_dataset
from .diffusion import GaussianDiffusion, purify_batch, purify_chunks
from .adaptive import purify_adaptive
from .protocol import ADAPTIVE_T_STAR, CORRUPTIONS as PROTOCOL, LADDER, STRENGTH, T_STAR, corrupt
from .runtime import tune_allocator

CORRUPTIONS = ("none", "gaussian", "salt_pepper", "pgd_linf", "autoattack_l2", "adaptive")
PURIFIERS = ("none", "dense", "dense/adaptive-t", *LADDER, "tt-r2/one-step", "dense-cond/guided")
ATTACKS = ("pgd_linf", "autoattack_l2", "adaptive")


@dataclass
class EvalConfig:
    dataset: str = "mnist"
    n: int = 1000  # images for clean / noise columns
    n_attack: int = 200  # images for attack columns
    seeds: int = 3  # purification seeds per cell
    t_star: int = 200
    steps: int = 10
    method: str = "ddim"
    guidance_scale: float = 5.0
    pgd_steps: int = 40
    adaptive_steps: int = 20
    adaptive_eot: int = 4
    surrogate_steps: int = 2
    autoattack_version: str = "standard"
    corruptions: tuple = CORRUPTIONS
    purifiers: tuple = PURIFIERS
    seed: int = 0
    batch_size: int = 250
    timing: bool = True
    strength: dict = field(default_factory=dict)


# --------------------------------------------------------------- metrics
def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    mse = (x - ref).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with a Gaussian window, averaged over channels."""
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(x)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(ref)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(ref * ref) - mu_y ** 2
    cov = blur(x * ref) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


# --------------------------------------------------------------- models
@dataclass
class Purifier:
    name: str
    model: torch.nn.Module | None
    file: str | None
    method: str
    guided: bool = False
    adaptive_t: bool = False  # t* per image from its estimated noise (tendiff.adaptive)

    @property
    def stochastic(self) -> bool:
        return self.model is not None


def load_purifiers(dataset: str, names, method: str) -> tuple[list[Purifier], list[str]]:
    """The purifiers whose checkpoints exist; the names of those that do not."""
    out, missing = [], []
    for name in names:
        if name == "none":
            out.append(Purifier("none", None, None, method))
            continue
        base, _, variant = name.partition("/")
        file = ckpt.checkpoint_name(dataset, base)
        try:
            model = ckpt.load_model(file)
        except ckpt.CheckpointNotFoundError:
            missing.append(name)
            continue
        out.append(Purifier(name, model, file, "one-step" if variant == "one-step" else method,
                            guided=variant == "guided", adaptive_t=variant == "adaptive-t"))
    return out, missing


# --------------------------------------------------------------- evaluation
def evaluation_order(num_images: int, seed: int = 0) -> torch.Tensor:
    """The seeded order of the test split: evaluation uses its first ``--n`` images (the same for
    every purifier and corruption); scripts/sweep_t_star.py chooses t* on images after the
    first 1000, which no reported number uses."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))


class Evaluation:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.strength = {**STRENGTH[cfg.dataset], **cfg.strength}
        self.diffusion = GaussianDiffusion()
        self.classifier = ckpt.load_model(ckpt.checkpoint_name(cfg.dataset, "classifier"))
        self.purifiers, self.missing = load_purifiers(cfg.dataset, cfg.purifiers, cfg.method)
        test = load_dataset(cfg.dataset, "test")
        order = evaluation_order(len(test), cfg.seed)
        n_max = max(cfg.n, cfg.n_attack)
        self.images = test.float_images(order[:n_max])
        self.labels = test.labels[order[:n_max]]

    def n_for(self, corruption: str) -> int:
        return self.cfg.n_attack if corruption in ATTACKS else self.cfg.n

    # -- corruptions
    def corrupt(self, corruption: str, purifier: Purifier | None = None) -> torch.Tensor:
        n = self.n_for(corruption)
        x, y = self.images[:n], self.labels[:n]
        s, seed = self.strength, self.cfg.seed
        if corruption == "none" or PROTOCOL[corruption].random:
            return corrupt(corruption, x, s.get(corruption), seed)
        if corruption == "pgd_linf":
            eps = s["pgd_linf"]
            return attacks.pgd_linf(self.classifier, x, y, eps, alpha=2.5 * eps / self.cfg.pgd_steps,
                                    steps=self.cfg.pgd_steps, seed=seed)
        if corruption == "autoattack_l2":
            return attacks.autoattack_l2(self.classifier, x, y, s["autoattack_l2"], self.cfg.autoattack_version, seed)
        if corruption == "adaptive":
            eps = s["pgd_linf"]
            if purifier is None or purifier.model is None:  # no purifier: adaptive = PGD on the classifier
                return self.corrupt("pgd_linf")
            out = []
            for i in range(0, n, 50):
                out.append(attacks.pgd_eot_ddim_surrogate(
                    self.classifier, purifier.model, self.diffusion, x[i:i + 50], y[i:i + 50], eps,
                    self.cfg.t_star, steps=self.cfg.adaptive_steps, eot=self.cfg.adaptive_eot,
                    surrogate_steps=self.cfg.surrogate_steps, seed=seed + i))
            return torch.cat(out)
        raise ValueError(f"unknown corruption {corruption!r}")

    # -- purification
    def purify(self, purifier: Purifier, x: torch.Tensor, seed: int) -> torch.Tensor:
        if purifier.model is None:
            return x
        if purifier.adaptive_t:
            return purify_adaptive(purifier.model, self.diffusion, x, ADAPTIVE_T_STAR, seed, self.cfg.batch_size,
                                   num_steps=self.cfg.steps, method=purifier.method)[0]
        labels = self.labels[:len(x)] if purifier.guided else None
        return purify_chunks(purifier.model, self.diffusion, x, self.cfg.t_star, seed, self.cfg.batch_size, labels,
                             num_steps=self.cfg.steps, method=purifier.method,
                             guidance_scale=self.cfg.guidance_scale if purifier.guided else 0.0)

    def cell(self, corruption: str, purifier: Purifier, corrupted: torch.Tensor) -> dict:
        n = len(corrupted)
        y, clean = self.labels[:n], self.images[:n]
        seeds = range(self.cfg.seeds if purifier.stochastic else 1)
        correct, first = [], None
        for s in seeds:
            purified = self.purify(purifier, corrupted, self.cfg.seed + s)
            first = purified if first is None else first
            correct.append(predict(self.classifier, purified).argmax(1) == y)
        correct = torch.stack(correct).float()
        acc = correct.mean().item()
        lo, hi = wilson_interval(acc * n, n)
        return {
            "dataset": self.cfg.dataset, "corruption": corruption, "purifier": purifier.name,
            "threat_model": PROTOCOL[corruption].threat, "n": n, "seeds": len(seeds),
            "accuracy": acc, "ci95": [lo, hi],
            "accuracy_per_seed": correct.mean(1).tolist(),
            "worst_of_seeds": correct.min(0).values.mean().item(),
            "psnr": psnr(first, clean).mean().item(), "ssim": ssim(first, clean).mean().item(),
        }

    # -- costs
    def costs(self, purifier: Purifier) -> dict:
        if purifier.model is None:
            return {"purifier": "none", "parameters": 0}
        model = purifier.model
        shape = self.images.shape[1:]
        row = {"purifier": purifier.name, "file": purifier.file,
               "parameters": sum(p.numel() for p in model.parameters()),
               "size_bytes": (ckpt.checkpoint_dir() / purifier.file).stat().st_size,
               "macs_per_forward": model.macs(*shape[-2:]),
               "forwards_per_image": 1 if purifier.method == "one-step" else self.cfg.steps}
        if self.cfg.timing:
            for b in (1, 64):
                x = self.images[:b] if len(self.images) >= b else self.images[:1].repeat(b, 1, 1, 1)
                purify_batch(model, self.diffusion, x, self.cfg.t_star, num_steps=self.cfg.steps, method=purifier.method)
                times = []
                for _ in range(3 if b == 1 else 2):
                    t0 = time.perf_counter()
                    purify_batch(model, self.diffusion, x, self.cfg.t_star, num_steps=self.cfg.steps,
                                 method=purifier.method)
                    times.append(time.perf_counter() - t0)
                row[f"s_per_image_b{b}"] = min(times) / b
        return row

    def estimate_seconds(self) -> float:
        """A rough total before starting: purifier forwards plus attack iterations."""
        model = next((p.model for p in self.purifiers if p.model is not None), None)
        if model is None:
            return 0.0
        x = self.images[:64]
        t = torch.full((len(x),), 10)
        with torch.inference_mode():
            model(x, t)
            t0 = time.perf_counter()
            model(x, t)
        per_fwd = (time.perf_counter() - t0) / len(x)
        total = 0.0
        for c in self.cfg.corruptions:
            n = self.n_for(c)
            total += sum(n * self.cfg.seeds * (1 if p.method == "one-step" else self.cfg.steps) * per_fwd
                         * (2 if p.guided else 1) for p in self.purifiers if p.model is not None)
            if c == "adaptive":
                total += sum(n * self.cfg.adaptive_steps * self.cfg.adaptive_eot * (self.cfg.surrogate_steps + 1)
                             * 3 * per_fwd for p in self.purifiers if p.model is not None)
            if c == "autoattack_l2":
                total += n * 0.05
        return total

    def run(self) -> dict:
        cfg = self.cfg
        est = self.estimate_seconds()
        print(f"[{cfg.dataset}] {len(cfg.corruptions)} corruptions x {len(self.purifiers)} purifiers "
              f"({', '.join(p.name for p in self.purifiers)}); missing: {self.missing or 'none'}; "
              f"estimated {est / 60:.1f} min", flush=True)
        cells = []
        total = sum(len(self.purifiers) for _ in cfg.corruptions)
        with tqdm(total=total, desc=f"evaluate {cfg.dataset}", dynamic_ncols=True,
                  mininterval=1.0 if sys.stderr.isatty() else 20.0) as bar:
            for corruption in cfg.corruptions:
                shared = None if corruption == "adaptive" else self.corrupt(corruption)
                for purifier in self.purifiers:
                    bar.update(1)
                    if corruption == "adaptive" and purifier.adaptive_t:
                        continue  # its attack must go through the t* choice: not built yet (robustness issue)
                    bar.set_postfix_str(f"{corruption} / {purifier.name}", refresh=False)
                    corrupted = shared if shared is not None else self.corrupt(corruption, purifier)
                    cells.append(self.cell(corruption, purifier, corrupted))
        costs = [self.costs(p) for p in self.purifiers]
        return {"config": {**asdict(cfg), "strength": self.strength}, "missing": self.missing,
                "cells": cells, "costs": costs}


# --------------------------------------------------------------- reports
def pct(v: float) -> str:
    return f"{100 * v:.1f}"


SUMMARY_PURIFIERS = ("none", "dense", "tt-r2", "authors-r3", "tt-r2/one-step", "dense-cond/guided")


def summary_markdown(results: list[dict], purifiers=SUMMARY_PURIFIERS) -> str:
    """A compact table (accuracy %, mean over seeds; worst-of-seeds under attack) of a few
    purifiers per dataset, for the README: ``python -m tendiff.evaluate --summarize docs/results.json``."""
    corrs = list(dict.fromkeys(c["corruption"] for r in results for c in r["cells"]))
    lines = ["| dataset | purifier | " + " | ".join(PROTOCOL[c].short for c in corrs) + " |",
             "|---|---|" + "---|" * len(corrs)]
    for r in results:
        cells = {(c["corruption"], c["purifier"]): c for c in r["cells"]}
        for p in purifiers:
            if not any((c, p) in cells for c in corrs):
                continue
            row = []
            for c in corrs:
                cell = cells.get((c, p))
                txt = "" if cell is None else pct(cell["accuracy"])
                if cell is not None and c in ATTACKS and cell["seeds"] > 1:
                    txt += f" ({pct(cell['worst_of_seeds'])})"
                row.append(txt)
            lines.append(f"| {r['config']['dataset']} | {p} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def claims(result: dict) -> list[str]:
    """What our measurements say about the paper's testable claims, for one dataset."""
    lines = []
    costs = {c["purifier"]: c for c in result["costs"]}
    cells = {(c["corruption"], c["purifier"]): c for c in result["cells"]}
    if "dense" in costs and any(k.startswith("tt-r") and "/" not in k for k in costs):
        tt = {k: v for k, v in costs.items() if k.startswith("tt-r") and "/" not in k}
        ratios = ", ".join(f"{k}: {costs['dense']['parameters'] / v['parameters']:.0f}x" for k, v in tt.items())
        lines.append(f"- **Parameters O(N R^2) vs O(N^2)**: supported for the `tt` layout (whole-model compression {ratios}; "
                     "per layer the count is linear in N, see the formula test in `tests/test_tt.py`)."
                     + (f" The authors' layout at rank 3 keeps {costs['authors-r3']['parameters']:,} parameters "
                        f"({costs['dense']['parameters'] / costs['authors-r3']['parameters']:.1f}x), i.e. O(N^2 R)."
                        if "authors-r3" in costs else ""))
        if "s_per_image_b1" in costs["dense"]:
            sp = []
            for k, v in tt.items():
                sp.append(f"{k}: {costs['dense']['s_per_image_b1'] / v['s_per_image_b1']:.2f}x (batch 1), "
                          f"{costs['dense']['s_per_image_b64'] / v['s_per_image_b64']:.2f}x (batch 64)")
            verdict = "supported" if all(costs['dense']['s_per_image_b64'] > v['s_per_image_b64'] for v in tt.values()) \
                else "not supported at every rank"
            lines.append(f"- **\"More efficient\"** (wall time of the same purification on this machine, dense/TT): "
                         f"{verdict}: {'; '.join(sp)}.")
    for corruption in ("gaussian", "salt_pepper", "pgd_linf", "autoattack_l2", "adaptive"):
        d, t = cells.get((corruption, "dense")), cells.get((corruption, "tt-r2"))
        if d and t:
            overlap = not (t["ci95"][0] > d["ci95"][1] or d["ci95"][0] > t["ci95"][1])
            verdict = ("no significant difference" if overlap else
                       ("tt-r2 better" if t["accuracy"] > d["accuracy"] else "tt-r2 worse"))
            lines.append(f"- **TT vs dense purification, {corruption}** ({PROTOCOL[corruption].threat}): tt-r2 {pct(t['accuracy'])}% "
                         f"vs dense {pct(d['accuracy'])}%: {verdict} at 95%.")
    return lines


def markdown(results: list[dict], command: str) -> str:
    commands = list(dict.fromkeys(r.get("command", command) for r in results))
    out = ["# Results", "",
           ("Made by `" + commands[0] + "`  \n" + f"on {results[0].get('machine', machine())}, "
            f"{results[0].get('date', time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}."
            if len(commands) == 1 else
            "Made dataset by dataset (`--merge`); each section names the command, machine and date that made it."),
           "",
           "Accuracy in % (mean over purification seeds) with its 95% Wilson interval; `worst` is the "
           "worst-of-seeds accuracy (an image counts only if every seed is right). Transfer attacks are "
           "crafted on the bare classifier and are **not** robustness against an adaptive attacker; the "
           "`adaptive` column attacks through the purifier. `dense-cond/guided` is the authors' code-faithful "
           "variant: classifier-free guidance with the **true label**, which leaks the answer and is no defense.",
           ""]
    for res in results:
        cfg = res["config"]
        corrs = list(dict.fromkeys(c["corruption"] for c in res["cells"]))
        purs = list(dict.fromkeys(c["purifier"] for c in res["cells"]))
        cells = {(c["corruption"], c["purifier"]): c for c in res["cells"]}
        s = cfg["strength"]
        out += [f"## {cfg['dataset']}", ""]
        if len(commands) > 1:
            out += [f"Made by `{res.get('command', command)}`  ", f"on {res.get('machine', '?')}, {res.get('date', '?')}.", ""]
        out += [
                f"Subset: first {cfg['n']} images (attacks: {cfg['n_attack']}) of a seed-{cfg['seed']} permutation of "
                f"the test split. Purification: t* = {cfg['t_star']}, {cfg['steps']} {cfg['method']} steps, "
                f"{cfg['seeds']} seeds. Gaussian sigma {s['gaussian']}, salt-and-pepper p {s['salt_pepper']}, "
                f"PGD L-inf eps {s['pgd_linf']:.4g} ({cfg['pgd_steps']} steps), AutoAttack L2 eps {s['autoattack_l2']} "
                f"({cfg['autoattack_version']}), adaptive: PGD L-inf eps {s['pgd_linf']:.4g}, {cfg['adaptive_steps']} steps, "
                f"EOT {cfg['adaptive_eot']}, {cfg['surrogate_steps']}-step DDIM surrogate.", ""]
        if res["missing"]:
            out += [f"Not evaluated (checkpoint missing): {', '.join(res['missing'])}.", ""]
        out.append("| purifier | " + " | ".join(f"{c}<br><sub>{PROTOCOL[c].threat}</sub>" for c in corrs) + " |")
        out.append("|---|" + "---|" * len(corrs))
        for p in purs:
            row = []
            for c in corrs:
                cell = cells.get((c, p))
                if cell is None:
                    row.append("")
                    continue
                txt = f"{pct(cell['accuracy'])} [{pct(cell['ci95'][0])}, {pct(cell['ci95'][1])}]"
                if cell["seeds"] > 1 and c in ATTACKS:
                    txt += f" worst {pct(cell['worst_of_seeds'])}"
                row.append(txt)
            out.append(f"| {p} | " + " | ".join(row) + " |")
        out += ["", "PSNR (dB) / SSIM of the purified image to the clean one (first seed):", ""]
        out.append("| purifier | " + " | ".join(corrs) + " |")
        out.append("|---|" + "---|" * len(corrs))
        for p in purs:
            out.append(f"| {p} | " + " | ".join(
                f"{cells[(c, p)]['psnr']:.1f} / {cells[(c, p)]['ssim']:.3f}" if (c, p) in cells else "" for c in corrs) + " |")
        out += ["", "Cost per purifier (timed purifications on this machine, same t* and steps):", "",
                "| purifier | parameters | size on disk | MACs / forward | forwards / image | s / image, batch 1 | s / image, batch 64 |",
                "|---|---|---|---|---|---|---|"]
        for c in res["costs"]:
            if c["purifier"] == "none":
                continue
            b1, b64 = c.get("s_per_image_b1"), c.get("s_per_image_b64")
            out.append(f"| {c['purifier']} | {c['parameters']:,} | {c['size_bytes'] / 1024:.0f} KiB | "
                       f"{c['macs_per_forward'] / 1e6:.1f} M | {c['forwards_per_image']} | "
                       f"{'' if b1 is None else f'{b1 * 1000:.1f} ms'} | {'' if b64 is None else f'{b64 * 1000:.2f} ms'} |")
        out += ["", "What the measurements say about the paper's claims:", ""] + claims(res) + [""]
        for fig in res.get("figures", []):
            out += [f"![{fig}]({fig})", ""]
    return "\n".join(out)


def figures(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = result["config"]["dataset"]
    cells = result["cells"]
    corrs = list(dict.fromkeys(c["corruption"] for c in cells))
    purs = list(dict.fromkeys(c["purifier"] for c in cells))
    lookup = {(c["corruption"], c["purifier"]): c for c in cells}
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(corrs)), 4))
    width = 0.8 / len(purs)
    for j, p in enumerate(purs):
        xs, ys, errs = [], [], [[], []]
        for i, c in enumerate(corrs):
            cell = lookup.get((c, p))
            if cell:
                xs.append(i + j * width)
                ys.append(100 * cell["accuracy"])
                errs[0].append(100 * (cell["accuracy"] - cell["ci95"][0]))
                errs[1].append(100 * (cell["ci95"][1] - cell["accuracy"]))
        ax.bar(xs, ys, width, yerr=errs, label=p, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(corrs))], corrs)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{ds}: accuracy by corruption and purifier (95% CI)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    names = [f"figures/{ds}_accuracy.png"]
    fig.savefig(out_dir / names[0], dpi=110)
    plt.close(fig)

    costs = [c for c in result["costs"] if c["purifier"] not in ("none",) and "/" not in c["purifier"]]
    noisy = [c for c in corrs if c in ("gaussian", "salt_pepper")]
    if costs and noisy:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in noisy:
            pts = [(k["parameters"], 100 * lookup[(c, k["purifier"])]["accuracy"], k["purifier"])
                   for k in costs if (c, k["purifier"]) in lookup]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=c)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("purifier parameters (log)")
        ax.set_ylabel("purified accuracy (%)")
        ax.set_title(f"{ds}: accuracy vs parameters")
        ax.legend()
        fig.tight_layout()
        names.append(f"figures/{ds}_params_vs_accuracy.png")
        fig.savefig(out_dir / names[-1], dpi=110)
        plt.close(fig)
    return names


def machine() -> str:
    return (f"{platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__})")


def read_results(path: Path) -> list[dict]:
    """The results of a results.json (files written before the protocol named the no-corruption
    case "none" call it "clean")."""
    results = json.loads(Path(path).read_text())["results"]
    for r in results:
        for cell in r["cells"]:
            cell["corruption"] = "none" if cell["corruption"] == "clean" else cell["corruption"]
    return results


def merge_results(results: list[dict], out_dir: Path) -> list[dict]:
    """The new results plus those of other datasets already in out_dir/results.json (each keeps
    the command and machine that made it), in dataset order."""
    path = out_dir / "results.json"
    old = read_results(path) if path.exists() else []
    fresh = {r["config"]["dataset"] for r in results}
    kept = [r for r in old if r["config"]["dataset"] not in fresh]
    order = {d: i for i, d in enumerate(DATASETS)}
    return sorted(kept + results, key=lambda r: order.get(r["config"]["dataset"], 99))


def write_outputs(results: list[dict], out_dir: Path, command: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for res in results:
        res["figures"] = figures(res, out_dir)
    (out_dir / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "corruption", "threat_model", "purifier", "n", "seeds", "accuracy", "ci95_low",
                    "ci95_high", "worst_of_seeds", "psnr", "ssim"])
        for res in results:
            for c in res["cells"]:
                w.writerow([c["dataset"], c["corruption"], c["threat_model"], c["purifier"], c["n"], c["seeds"],
                            f"{c['accuracy']:.4f}", f"{c['ci95'][0]:.4f}", f"{c['ci95'][1]:.4f}",
                            f"{c['worst_of_seeds']:.4f}", f"{c['psnr']:.2f}", f"{c['ssim']:.4f}"])
    (out_dir / "results.md").write_text(markdown(results, command))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tendiff.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=DATASETS + ("all",))
    p.add_argument("--n", type=int, default=1000, help="images for clean and noise columns")
    p.add_argument("--n-attack", type=int, default=200, help="images for attack columns")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--t-star", type=int, default=None,
                   help="diffusion depth (default: the dataset's t*, chosen on held-out images: "
                        + ", ".join(f"{d} {t}" for d, t in T_STAR.items()) + ")")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--method", default="ddim", choices=["ddim", "ddpm", "one-step"])
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=CORRUPTIONS)
    p.add_argument("--purifiers", nargs="+", default=list(PURIFIERS))
    p.add_argument("--pgd-steps", type=int, default=40)
    p.add_argument("--adaptive-steps", type=int, default=20)
    p.add_argument("--adaptive-eot", type=int, default=4)
    p.add_argument("--surrogate-steps", type=int, default=2)
    p.add_argument("--autoattack-version", default="standard", choices=["standard", "rand", "plus"])
    p.add_argument("--no-timing", action="store_true", help="skip the per-purifier timings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results")
    p.add_argument("--summarize", metavar="RESULTS_JSON",
                   help="print the README's summary table of an earlier run's results.json and exit")
    p.add_argument("--merge", action="store_true",
                   help="keep the other datasets' results already in --out (run datasets one at a time)")
    p.add_argument("--record-metrics", action="store_true",
                   help="also write the purified accuracies into checkpoints/manifest.json")
    return p.parse_args(argv)


def record_metrics(result: dict) -> None:
    """Store each purifier's accuracies (and the classifier's clean accuracy) in the manifest."""
    ds = result["config"]["dataset"]
    by_purifier: dict[str, dict] = {}
    for c in result["cells"]:
        key = f"acc_{c['corruption']}_t{result['config']['t_star']}_{result['config']['method']}{result['config']['steps']}"
        by_purifier.setdefault(c["purifier"], {})[key] = round(c["accuracy"], 4)
    for name, metrics in by_purifier.items():
        if name == "none":
            metrics = {k.replace("acc_", "acc_unpurified_"): v for k, v in metrics.items()}
            metrics["n_eval"] = result["config"]["n"]
            metrics["n_eval_attacks"] = result["config"]["n_attack"]
            ckpt.set_metrics(ckpt.checkpoint_name(ds, "classifier"), metrics)
        elif "/" not in name:
            ckpt.set_metrics(ckpt.checkpoint_name(ds, name), {**metrics, "n_eval": result["config"]["n"],
                                                              "n_eval_attacks": result["config"]["n_attack"]})


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.summarize:
        print(summary_markdown(read_results(Path(args.summarize))))
        return
    command = "python -m tendiff.evaluate " + " ".join(shlex.quote(a) for a in argv)
    tune_allocator()
    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    results = []
    for ds in datasets:
        t_star = T_STAR[ds] if args.t_star is None else args.t_star
        cfg = EvalConfig(dataset=ds, n=args.n, n_attack=args.n_attack, seeds=args.seeds, t_star=t_star,
                         steps=args.steps, method=args.method, pgd_steps=args.pgd_steps,
                         adaptive_steps=args.adaptive_steps, adaptive_eot=args.adaptive_eot,
                         surrogate_steps=args.surrogate_steps, autoattack_version=args.autoattack_version,
                         corruptions=tuple(args.corruptions), purifiers=tuple(args.purifiers), seed=args.seed,
                         timing=not args.no_timing)
        try:
            result = Evaluation(cfg).run()
        except ckpt.CheckpointNotFoundError as exc:
            print(f"[{ds}] skipped: {exc}")
            continue
        result.update(command=command, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        results.append(result)
        if args.record_metrics:
            record_metrics(result)
    if not results:
        raise SystemExit("nothing was evaluated: no classifier checkpoint for the chosen dataset(s)")
    if args.merge:
        results = merge_results(results, Path(args.out))
    write_outputs(results, Path(args.out), command)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()
