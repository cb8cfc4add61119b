"""Checkpoints: safetensors weights with their config, a manifest, and a local-first resolver.

A checkpoint is one ``.safetensors`` file whose metadata holds the model kind and its config as
JSON, so a file alone rebuilds its model. ``checkpoints/manifest.json`` lists every committed
checkpoint with its sha256, config, parameter count, how it was made and what it measured;
:func:`load_model` refuses a file whose hash differs from the manifest. Nothing is ever
unpickled: weights come from safetensors, which holds only tensors.

Files are looked up in ``$TENDIFF_CHECKPOINTS`` (default: the repository's ``checkpoints/``),
then on the Hugging Face Hub (``$TENDIFF_HUB_REPO`` at ``$TENDIFF_HUB_REVISION``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from .classifiers import ClassifierConfig, NormalizedClassifier
from .unet import UNet, UNetConfig

DEFAULT_HUB_REPO = "tendiffpure/tendiffpure-checkpoints"
MANIFEST = "manifest.json"


class CheckpointNotFoundError(FileNotFoundError):
    pass


class CheckpointIntegrityError(RuntimeError):
    pass


def checkpoint_dir() -> Path:
    return Path(os.environ.get("TENDIFF_CHECKPOINTS", Path(__file__).resolve().parent.parent / "checkpoints"))


def checkpoint_name(dataset: str, model: str) -> str:
    """File name of a committed checkpoint: model is 'classifier', 'dense', 'tt-r2', 'authors-r3'…"""
    return f"{dataset}_{model}.safetensors"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_kind(model) -> str:
    if isinstance(model, UNet):
        return "unet"
    if isinstance(model, NormalizedClassifier):
        return "classifier"
    raise TypeError(f"cannot checkpoint a {type(model).__name__}")


def save_checkpoint(model, path: str | Path, extra: dict | None = None) -> str:
    """Write weights and config to ``path`` (safetensors); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": _model_kind(model), "config": json.dumps(model.config.to_dict())}
    if extra:
        meta["extra"] = json.dumps(extra)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return sha256_file(path)


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "kind" not in meta or "config" not in meta:
        raise CheckpointIntegrityError(f"{path} is not a tendiff checkpoint (no kind/config metadata)")
    meta["config"] = json.loads(meta["config"])
    meta["extra"] = json.loads(meta["extra"]) if "extra" in meta else {}
    return meta


def build_from_metadata(meta: dict):
    if meta["kind"] == "unet":
        return UNet(UNetConfig.from_dict(meta["config"]))
    if meta["kind"] == "classifier":
        return NormalizedClassifier(ClassifierConfig.from_dict(meta["config"]))
    raise CheckpointIntegrityError(f"unknown checkpoint kind {meta['kind']!r}")


def load_checkpoint(path: str | Path, expected_sha256: str | None = None, map_location: str = "cpu"):
    """Rebuild the model stored at ``path``; with ``expected_sha256``, refuse a different file."""
    path = Path(path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointIntegrityError(
                f"{path.name}: sha256 {actual[:12]}… does not match the manifest's {expected_sha256[:12]}…; "
                "refusing to load a file that is not the one the manifest lists")
    meta = read_metadata(path)
    model = build_from_metadata(meta)
    model.load_state_dict(load_file(str(path), device=map_location))
    return model.eval()


# ------------------------------------------------------------------ manifest
def manifest_path(directory: Path | None = None) -> Path:
    return (directory or checkpoint_dir()) / MANIFEST


def read_manifest(directory: Path | None = None) -> dict:
    path = manifest_path(directory)
    if not path.exists():
        return {"checkpoints": {}}
    return json.loads(path.read_text())


def update_manifest(path: str | Path, model, record: dict) -> dict:
    """Add or replace the manifest entry of the checkpoint at ``path`` (in its directory)."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    entry = {
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "kind": _model_kind(model),
        "config": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        **record,
    }
    old = manifest["checkpoints"].get(path.name, {})
    if "metrics" in old and "metrics" not in record and old.get("sha256") == entry["sha256"]:
        entry["metrics"] = old["metrics"]  # same weights: what was measured still holds
    manifest["checkpoints"][path.name] = entry
    manifest["checkpoints"] = dict(sorted(manifest["checkpoints"].items()))
    tmp = manifest_path(path.parent).with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path(path.parent))
    return entry


def set_metrics(name: str, metrics: dict, directory: Path | None = None) -> None:
    """Merge measured metrics into a manifest entry (the hash is unchanged: weights are)."""
    directory = directory or checkpoint_dir()
    manifest = read_manifest(directory)
    if name not in manifest["checkpoints"]:
        raise KeyError(f"{name} is not in the manifest")
    manifest["checkpoints"][name].setdefault("metrics", {}).update(metrics)
    manifest_path(directory).write_text(json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------ resolver
def resolve(name: str, hub_repo: str | None = None, revision: str | None = None) -> Path:
    """Path of checkpoint ``name``: the local directory first, then the Hub."""
    local = checkpoint_dir() / name
    if local.is_file():
        return local
    repo = hub_repo or os.environ.get("TENDIFF_HUB_REPO", DEFAULT_HUB_REPO)
    revision = revision or os.environ.get("TENDIFF_HUB_REVISION")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=name, revision=revision))
    except Exception as exc:  # offline, no such repo/file, network error: one clear message
        raise CheckpointNotFoundError(
            f"checkpoint {name!r} was found neither in {checkpoint_dir()} nor on the Hugging Face Hub "
            f"({repo}{'@' + revision if revision else ''}): {type(exc).__name__}. Train it with "
            "`python -m tendiff.train` or set TENDIFF_CHECKPOINTS / TENDIFF_HUB_REPO.") from exc


def load_model(name: str, hub_repo: str | None = None, revision: str | None = None, map_location: str = "cpu"):
    """Resolve, verify against the manifest, and load a listed checkpoint."""
    manifest = read_manifest()
    entry = manifest["checkpoints"].get(name)
    if entry is None:
        raise CheckpointNotFoundError(f"checkpoint {name!r} is not listed in {manifest_path()}")
    path = resolve(name, hub_repo, revision)
    return load_checkpoint(path, expected_sha256=entry["sha256"], map_location=map_location)


def manifest_table(directory: Path | None = None) -> str:
    """The manifest as a markdown table: how each checkpoint was made and what it measured."""
    rows = ["| checkpoint | parameters | size | steps | wall time | trained with | measured |",
            "|---|---|---|---|---|---|---|"]
    for name, e in read_manifest(directory)["checkpoints"].items():
        measured = {**e.get("train_metrics", {}), **e.get("metrics", {})}
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in measured.items())
        init = f" from `{e['init_from']}`" if e.get("init_from") else ""
        rows.append(f"| `{name}` | {e['parameters']:,} | {e['size_bytes'] / 1024:.0f} KiB | {e['steps']} | "
                    f"{e['wall_time_s'] / 60:.1f} min | seed {e['seed']}, {e['hardware']}{init} | {shown} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m tendiff.checkpoints: print the manifest table
    print(manifest_table())
