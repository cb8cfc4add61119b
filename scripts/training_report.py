"""Write docs/training.md and docs/figures/loss_curves.png from checkpoints/manifest.json:
``python scripts/training_report.py``.

The page says how every committed checkpoint was made (command, seed, steps, wall time,
hardware, held-out loss), shows the rank ladder per dataset with its budgets, and plots each
purifier's held-out loss curve (step vs eps-MSE of the EMA weights on the last 1000 test images).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout, not installed

from tendiff.checkpoints import manifest_table, read_manifest  # noqa: E402
from tendiff.evaluate import read_results  # noqa: E402
from tendiff.protocol import DATASET_TITLES, LADDER, PAPER_MAX_RANK, parse_model_label, purifier_title  # noqa: E402

NOISES = ("none", "gaussian", "salt_pepper")


def entries(manifest: dict, dataset: str) -> dict[str, dict]:
    prefix = dataset + "_"
    return {name[len(prefix):-len(".safetensors")]: e for name, e in manifest.items()
            if name.startswith(prefix) and not name[len(prefix):].startswith("classifier")}


def accuracies(results: Path, manifest: dict, dataset: str) -> dict[str, str]:
    """Purifier -> "clean / Gaussian / s&p" accuracy text from an evaluation's results.json, for
    the checkpoints it measured that are still the committed ones (same sha256)."""
    if not results.exists():
        return {}
    out = {}
    for res in read_results(results):
        if res["config"]["dataset"] != dataset:
            continue
        current = {c["purifier"] for c in res["costs"]
                   if c.get("sha256") and c["sha256"] == manifest.get(c.get("file"), {}).get("sha256")}
        cells = {(c["purifier"], c["corruption"]): c["accuracy"] for c in res["cells"]}
        for name in current:
            if all((name, k) in cells for k in NOISES):
                out[name] = " / ".join(f"{100 * cells[(name, k)]:.1f}" for k in NOISES)
    return out


def ladder_table(manifest: dict, dataset: str, measured: dict[str, str]) -> list[str]:
    found = entries(manifest, dataset)
    dense = found.get("dense")
    rows = ["| purifier | layout | rank | parameters | vs dense | steps | schedule | wall time | held-out loss | "
            "accuracy % clean / Gaussian / s&p | from | made by |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in ("dense",) + LADDER:
        e = found.get(label)
        if e is None:
            rows.append(f"| {purifier_title(label)} | | | | | not trained | | | | | | |")
            continue
        layout, rank = parse_model_label(label)
        loss = e.get("train_metrics", {}).get("heldout_eps_mse_first1000")
        ratio = f"{dense['parameters'] / e['parameters']:.1f}x fewer" if dense and label != "dense" else ""
        rows.append(f"| {purifier_title(label)} | {layout} | {rank or ''} | {e['parameters']:,} | {ratio} | {e['steps']} | "
                    f"{e.get('schedule', 'cosine')} | {e['wall_time_s'] / 60:.1f} min | "
                    f"{'' if loss is None else f'{loss:.4f}'} | {measured.get(label, '')} | {e.get('init_from') or 'scratch'} | "
                    f"{'the campaign' if 'heldout_curve' in e else 'before the campaign (docs/history.md)'} |")
    return rows


def plot_curves(manifest: dict, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASET_TITLES if any(e.get("heldout_curve") for e in entries(manifest, d).values())]
    if not datasets:
        return False
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for label, e in entries(manifest, ds).items():
            curve = e.get("heldout_curve")
            if curve:
                steps, loss = zip(*curve)
                ax.plot(steps, loss, label=label, lw=2 if label == "dense" else 1)
        ax.set_title(DATASET_TITLES[ds]), ax.set_xlabel("optimizer step"), ax.set_ylabel("held-out eps-MSE (EMA)")
        ax.set_yscale("log"), ax.grid(alpha=0.3), ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args()
    docs = Path(args.docs)
    manifest = read_manifest()["checkpoints"]
    lines = ["# How the checkpoints were made", "",
             "Written by `python scripts/training_report.py` from `checkpoints/manifest.json`; the campaign that "
             "trains them is `bash scripts/train_checkpoints.sh <dataset>` (resumable, state in `campaign/`).", "",
             "Recipe. Dense purifiers: eps-prediction, AdamW, constant learning rate after warm-up, EMA 0.999, "
             "trained until the held-out loss (EMA weights, the last 1000 test images, every 250 steps) improves "
             "by less than 1% over the last quarter of the steps (`--until-converged`). Every TT purifier: TT-SVD "
             "of that dense purifier, then the same fine-tuning command (same steps, same cosine schedule). "
             f"Ranks above {PAPER_MAX_RANK} are beyond the paper's R <= {PAPER_MAX_RANK}. Rows made before the "
             "campaign (unequal budgets) say so in the last column; the held-out loss column is on the first 1000 "
             "test images, the curves on the last 1000.", ""]
    lines += ["Accuracy: the classifier on the purified first 1000 test images at the dataset's fixed t*, 10 DDIM "
              "steps, one purification per image (`docs/noise/results.md`, which names the command), for the "
              "checkpoints that evaluation measured and that are still committed.", ""]
    for ds, title in DATASET_TITLES.items():
        measured = accuracies(docs / "noise" / "results.json", manifest, ds)
        lines += [f"## {title}: the rank ladder", ""] + ladder_table(manifest, ds, measured) + [""]
    if plot_curves(manifest, docs / "figures" / "loss_curves.png"):
        lines += ["## Held-out loss curves", "", "![loss curves](figures/loss_curves.png)", ""]
    lines += ["## Every checkpoint", "", manifest_table(), ""]
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "training.md").write_text("\n".join(lines))
    print(f"wrote {docs / 'training.md'}")


if __name__ == "__main__":
    main()
