import json

import pytest
import torch

from tendiff import checkpoints as ckpt
from tendiff.data import dataset_available, load_dataset
from tendiff.train import augment, converged, main as train_main


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """Cached tensors in the layout load_dataset writes, so training runs without real data."""
    cache = tmp_path / "cache"
    cache.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 256), ("test", 64)):
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
        torch.save({"images": images, "labels": torch.arange(n) % 10}, cache / f"mnist_{split}.pt")
    monkeypatch.setenv("TENDIFF_CACHE", str(cache))
    monkeypatch.setenv("TENDIFF_CHECKPOINTS", str(tmp_path / "ckpt"))
    return tmp_path


def test_load_dataset_reads_the_cache(fake_cache):
    data = load_dataset("mnist", "train")
    assert data.images.shape == (256, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.float_images().max() <= 1.0


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError):
        load_dataset("imagenet")


def test_augment_keeps_shape_and_content():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1
    out = augment(x, "mnist", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.sum() == x.sum()  # a shift within the padding loses nothing


def test_train_classifier_then_purifier_then_tt_from_dense_and_resume(fake_cache, monkeypatch):
    d = fake_cache / "ckpt"
    train_main(["classifier", "--dataset", "mnist", "--steps", "3", "--batch-size", "8",
                "--run-dir", str(fake_cache / "run_c")])
    train_main(["purifier", "--dataset", "mnist", "--steps", "4", "--batch-size", "8", "--save-every", "2",
                "--run-dir", str(fake_cache / "run_p")])
    dense = d / "mnist_dense.safetensors"
    train_main(["purifier", "--dataset", "mnist", "--conv", "tt", "--rank", "2", "--init-from", str(dense),
                "--distill-from", str(dense), "--steps", "2", "--batch-size", "8", "--run-dir", str(fake_cache / "run_t")])
    train_main(["purifier", "--dataset", "mnist", "--conditional", "--init-from", str(dense),
                "--steps", "2", "--batch-size", "8", "--run-dir", str(fake_cache / "run_cond")])
    assert ckpt.load_model("mnist_dense-cond.safetensors").config.num_classes == 10
    manifest = json.loads((d / "manifest.json").read_text())["checkpoints"]
    assert set(manifest) == {"mnist_classifier.safetensors", "mnist_dense.safetensors", "mnist_tt-r2.safetensors",
                             "mnist_dense-cond.safetensors"}
    tt = manifest["mnist_tt-r2.safetensors"]
    assert tt["init_from"] == tt["distill_from"] == "mnist_dense.safetensors" and tt["steps"] == 2
    assert tt["config"]["conv"] == "tt" and tt["parameters"] < manifest["mnist_dense.safetensors"]["parameters"]
    assert "heldout_eps_mse_first1000" in tt["train_metrics"]
    assert ckpt.load_model("mnist_tt-r2.safetensors").config.rank == 2
    # Resume: the state at step 4 continues to 6 rather than starting again; on another machine, each
    # part's hardware is recorded.
    first_machine = manifest["mnist_dense.safetensors"]["hardware"]
    monkeypatch.setattr("tendiff.train.machine", lambda: "machine B")
    train_main(["purifier", "--dataset", "mnist", "--steps", "6", "--batch-size", "8", "--resume",
                "--run-dir", str(fake_cache / "run_p")])
    manifest = json.loads((d / "manifest.json").read_text())["checkpoints"]
    assert manifest["mnist_dense.safetensors"]["steps"] == 6
    assert manifest["mnist_dense.safetensors"]["resumed_at_step"] == 4
    assert manifest["mnist_dense.safetensors"]["hardware"] == f"steps 0-4: {first_machine}; steps 4-6: machine B"


def test_convergence_rule_compares_the_best_loss_a_quarter_ago():
    falling = [(s, 1.0 / s) for s in range(250, 4001, 250)]
    flat = [(s, 0.1 - 1e-7 * s) for s in range(250, 4001, 250)]  # 0.1% better over the last quarter
    assert not converged(falling, 0.01, 2000)
    assert converged(flat, 0.01, 2000)
    assert not converged(flat[:7], 0.01, 2000)  # (step 1750 < min_steps)
    assert not converged([], 0.01, 0)
    bumpy = flat[:-1] + [(4000, 0.5)]  # a worse last point does not undo the best so far
    assert converged(bumpy, 0.01, 2000)


def test_until_converged_stops_early_and_records_the_curve(fake_cache):
    d = fake_cache / "ckpt"
    # tol 1.0: any improvement under 100% counts as converged, so it stops at the first check (step 4).
    train_main(["purifier", "--dataset", "mnist", "--steps", "50", "--batch-size", "8", "--until-converged",
                "--eval-every", "2", "--min-steps", "4", "--converge-tol", "1.0", "--run-dir", str(fake_cache / "r")])
    entry = json.loads((d / "manifest.json").read_text())["checkpoints"]["mnist_dense.safetensors"]
    assert entry["steps"] == 4 and entry["converged"] is True and entry["schedule"] == "constant"
    assert [s for s, _ in entry["heldout_curve"]] == [2, 4]
    train_main(["purifier", "--dataset", "mnist", "--conv", "ttm", "--rank", "2", "--steps", "2", "--batch-size", "8",
                "--init-from", str(d / "mnist_dense.safetensors"), "--run-dir", str(fake_cache / "t")])
    ttm = ckpt.load_model("mnist_ttm-r2.safetensors")
    assert ttm.config.conv == "ttm" and ttm.num_parameters() < entry["parameters"]


def test_a_compiled_run_saves_and_resumes_the_plain_model(fake_cache, monkeypatch):
    compiled = []
    real = torch.compile  # the eager backend: dynamo's wrapping without minutes of code generation
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(m) or real(m, backend="eager"))
    run = ["purifier", "--dataset", "mnist", "--batch-size", "8", "--save-every", "1", "--run-dir", str(fake_cache / "c")]
    train_main([*run, "--steps", "2", "--compile"])
    state = torch.load(fake_cache / "c" / "state.pt", weights_only=True)
    assert len(compiled) == 1 and state["step"] == 2 and not any(k.startswith("_orig_mod") for k in state["model"])
    train_main([*run, "--steps", "3", "--resume"])  # an eager resume of a compiled run
    assert ckpt.load_model("mnist_dense.safetensors").config.conv == "dense"


def test_width_trains_a_wider_purifier_under_its_own_name(fake_cache):
    train_main(["purifier", "--dataset", "mnist", "--width", "16", "--steps", "2", "--batch-size", "8",
                "--run-dir", str(fake_cache / "w")])
    assert ckpt.load_model("mnist_dense-w16.safetensors").config.channels == (16, 16, 16)
    assert not (fake_cache / "ckpt" / "mnist_dense.safetensors").exists()  # the preset's name is left alone
    for bad, message in ((["--init-from", str(fake_cache / "ckpt" / "mnist_dense-w16.safetensors")], "--init-from"),
                         (["--width", "20"], "divisible by groups")):
        with pytest.raises(SystemExit, match=message):
            train_main(["purifier", "--dataset", "mnist", "--width", "16", "--steps", "1", *bad])
    with pytest.raises(SystemExit, match="not a classifier"):
        train_main(["classifier", "--dataset", "mnist", "--width", "16", "--steps", "1"])


@pytest.mark.skipif(not dataset_available("mnist"), reason="MNIST is not on this machine")
def test_real_mnist_loads():
    data = load_dataset("mnist", "test")
    assert len(data) == 10000 and data.labels.bincount().tolist()[0] == 980
