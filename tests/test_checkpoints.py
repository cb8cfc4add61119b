import json

import pytest
import torch

from tendiff import checkpoints as ckpt
from tendiff.classifiers import build_classifier
from tendiff.unet import UNet, preset


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TENDIFF_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TENDIFF_HUB_REPO", "nobody/not-a-repo")
    return tmp_path


@pytest.mark.parametrize("make", [lambda: UNet(preset("mnist", "tt", 3, channels=(8, 16))),
                                  lambda: UNet(preset("cifar10", "authors", 2, channels=(8, 16))),
                                  lambda: build_classifier("mnist")])
def test_round_trip_restores_config_and_outputs(make, ckpt_dir):
    model = make().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = ckpt_dir / "m.safetensors"
    sha = ckpt.save_checkpoint(model, path)
    loaded = ckpt.load_checkpoint(path, expected_sha256=sha)
    assert type(loaded) is type(model) and loaded.config == model.config
    c = model.config
    x = torch.rand(2, c.in_channels, 28 if c.in_channels == 1 else 32, 28 if c.in_channels == 1 else 32)
    args = (x,) if not isinstance(model, UNet) else (x, torch.tensor([5, 50]))
    with torch.no_grad():
        assert torch.equal(loaded(*args), model(*args))


def test_manifest_records_and_load_model_verifies_hash(ckpt_dir):
    model = build_classifier("mnist")
    path = ckpt_dir / ckpt.checkpoint_name("mnist", "classifier")
    ckpt.save_checkpoint(model, path)
    entry = ckpt.update_manifest(path, model, {"command": "test", "seed": 0, "steps": 3, "wall_time_s": 6.0,
                                               "hardware": "test CPU"})
    assert entry["parameters"] == sum(p.numel() for p in model.parameters())
    ckpt.set_metrics(path.name, {"accuracy": 0.5})
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    assert manifest["checkpoints"][path.name]["metrics"] == {"accuracy": 0.5}
    table = ckpt.manifest_table()
    assert f"`{path.name}`" in table and "accuracy 0.500" in table and "seed 0" in table
    assert ckpt.load_model(path.name).config == model.config

    data = bytearray(path.read_bytes())  # tamper with one weight byte
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointIntegrityError, match="does not match"):
        ckpt.load_model(path.name)


def test_unlisted_checkpoint_is_refused(ckpt_dir):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="not listed"):
        ckpt.load_model("mnist_tt-r9.safetensors")


def test_resolver_offline_names_the_missing_file(ckpt_dir):
    with pytest.raises(ckpt.CheckpointNotFoundError) as info:
        ckpt.resolve("mnist_dense.safetensors")
    msg = str(info.value)
    assert "mnist_dense.safetensors" in msg and str(ckpt_dir) in msg and "nobody/not-a-repo" in msg


def test_resolver_prefers_local_file(ckpt_dir):
    (ckpt_dir / "x.safetensors").write_bytes(b"")
    assert ckpt.resolve("x.safetensors") == ckpt_dir / "x.safetensors"


def test_file_without_metadata_is_refused(ckpt_dir):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(ckpt_dir / "bare.safetensors"))
    with pytest.raises(ckpt.CheckpointIntegrityError):
        ckpt.load_checkpoint(ckpt_dir / "bare.safetensors")


def test_a_pickle_is_never_loaded(ckpt_dir):
    """A file that is a pickle (which could run code) is not accepted as a checkpoint."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    path = ckpt_dir / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(Exception) as info:
        ckpt.load_checkpoint(path)
    assert not isinstance(info.value, SystemExit)


def test_committed_manifest_matches_committed_files():
    directory = ckpt.checkpoint_dir()
    manifest = ckpt.read_manifest(directory)
    for name, entry in manifest["checkpoints"].items():
        path = directory / name
        assert path.exists(), f"{name} is in the manifest but not in {directory}"
        assert ckpt.sha256_file(path) == entry["sha256"], name
        for key in ("command", "seed", "steps", "wall_time_s", "hardware", "parameters", "config"):
            assert key in entry, (name, key)
