import json
import threading

import pytest
import torch

from tendiff import checkpoints as ckpt, classical
from tendiff.classifiers import build_classifier
from tendiff.attacks import pgd_bpda
from tendiff.defense import vote, vote_seeds
from tendiff.diffusion import GaussianDiffusion
from tendiff.evaluate import (CLASSICAL_HEADING, EvalConfig, load_defenses, main as evaluate_main, results_lock,
                              save_results, wilson_interval)
from tendiff.metrics import psnr, ssim
from tendiff.unet import UNet, preset, unet_from_dense


@pytest.fixture
def tiny_world(tmp_path, monkeypatch):
    """Generated MNIST-shaped data and tiny checkpoints listed in a temporary manifest."""
    cache, ck = tmp_path / "cache", tmp_path / "ckpt"
    cache.mkdir()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=g)
    torch.save({"images": images, "labels": torch.arange(40) % 10}, cache / "mnist_test.pt")
    monkeypatch.setenv("TENDIFF_CACHE", str(cache))
    monkeypatch.setenv("TENDIFF_CHECKPOINTS", str(ck))
    torch.manual_seed(0)
    models = {"classifier": build_classifier("mnist")}
    dense = UNet(preset("mnist", channels=(8, 16)))
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.05)
    models["dense"] = dense
    models["tt-r2"] = unet_from_dense(dense, 2, "tt")
    models["dense-cond"] = UNet(preset("mnist", channels=(8, 16), num_classes=10))
    for name, model in models.items():
        path = ck / ckpt.checkpoint_name("mnist", name)
        ckpt.save_checkpoint(model.eval(), path)
        ckpt.update_manifest(path, model, {"command": "test", "seed": 0, "steps": 0, "wall_time_s": 0,
                                           "hardware": "test"})
    return tmp_path


def test_metrics():
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-4)
    assert ssim(x, torch.rand(3, 1, 16, 16)).max() < 0.5
    assert psnr(x, (x + 0.1).clamp(0, 1)).min() > 19
    from skimage.metrics import peak_signal_noise_ratio
    y = (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)
    sk = [peak_signal_noise_ratio(a.double().numpy(), b.double().numpy(), data_range=1.0) for a, b in zip(x, y)]
    assert torch.allclose(psnr(y, x).double(), torch.tensor(sk, dtype=torch.double), atol=1e-4)
    lo, hi = wilson_interval(90, 100)
    assert lo < 0.9 < hi and 0.82 < lo and hi < 0.95
    # Every interval holds its proportion, at 0 and 1 too (a bound a rounding error past it broke the figures).
    assert all(wilson_interval(k, n)[0] <= k / n <= wilson_interval(k, n)[1] for n in range(1, 2001) for k in (0, n))


def test_evaluation_end_to_end(tiny_world, capsys):
    out = tiny_world / "results"
    evaluate_main(["--dataset", "mnist", "--n", "12", "--n-attack", "4", "--seeds", "2", "--t-star", "20",
                   "--steps", "2", "--pgd-steps", "2", "--adaptive-steps", "1", "--adaptive-eot", "1",
                   "--exact-steps", "1", "--exact-eot", "1",
                   "--corruptions", "none", "gaussian", "salt_pepper", "pgd_linf", "adaptive", "exact",
                   "--purifiers", "none", "dense", "tt-r2", "tt-r4", "tt-r2/one-step", "dense-cond/guided",
                   "dense/vote2", "dense/adaptive-t", "median3",
                   "--out", str(out), "--record-metrics"])
    data = json.loads((out / "results.json").read_text())["results"][0]
    assert data["missing"] == ["tt-r4"]
    purifiers = {"none", "dense", "tt-r2", "tt-r2/one-step", "dense-cond/guided", "dense/vote2", "dense/adaptive-t",
                 "median3"}
    assert {c["purifier"] for c in data["cells"]} == purifiers
    skipped = {(s["corruption"], s["purifier"]) for s in data["skipped"]}
    assert skipped == {("adaptive", "median3"), ("adaptive", "dense/adaptive-t"), ("exact", "dense-cond/guided")}
    assert len(data["cells"]) == 6 * len(purifiers) - len(skipped)
    cells = {(c["corruption"], c["purifier"]): c for c in data["cells"]}
    for c in data["cells"]:
        attack = c["corruption"] in ("pgd_linf", "adaptive", "exact")
        assert 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1
        assert c["n"] == (4 if attack else 12)
        assert c["seeds"] == (1 if c["purifier"] in ("none", "median3") else 2)
        assert c["worst_of_seeds"] <= c["accuracy"] + 1e-9
        assert c["seconds"] > 0 and ("attack_seconds" in c) == attack
    assert "exactly through the defense" in cells[("exact", "dense")]["threat_model"]
    assert "piecewise-constant" in cells[("exact", "dense/adaptive-t")]["threat_model"]
    assert "BPDA" in cells[("exact", "median3")]["threat_model"] and "BPDA" in cells[("exact", "none")]["threat_model"]
    assert cells[("exact", "dense/vote2")]["attack_crafted_for"] == "dense"  # the purification it repeats
    assert cells[("exact", "dense")]["attack_crafted_for"] == "dense"
    assert cells[("pgd_linf", "dense")]["attack_crafted_for"] is None  # shared: crafted on the classifier
    clean_none = cells[("none", "none")]
    assert clean_none["psnr"] == pytest.approx(100.0)  # unpurified clean image: identical
    costs = {c["purifier"]: c for c in data["costs"]}
    assert costs["tt-r2"]["parameters"] < costs["dense"]["parameters"]
    assert costs["tt-r2"]["macs_per_forward"] < costs["dense"]["macs_per_forward"]
    assert costs["tt-r2/one-step"]["forwards_per_image"] == 1
    assert costs["dense/vote2"]["forwards_per_image"] == 2 * costs["dense"]["forwards_per_image"]
    assert costs["median3"]["parameters"] == 0 and costs["median3"]["s_per_image_b1"] > 0
    md = (out / "results.md").read_text()
    assert "Transfer: the attack sees only the classifier" in md and "Adaptive: the attack sees the purifier" in md
    assert "Not evaluated (checkpoint missing): tt-r4" in md
    assert "### Adaptive attacks" in md and "BPDA (Athalye et al. 2018)" in md
    assert md.index("| dense/vote2 |") < md.index(f"| **{CLASSICAL_HEADING}** |") < md.index("| median3 |")
    assert "Not run in the PGD+EOT (adaptive, surrogate) column: median3: no diffusion model" in md
    assert (out / "figures" / "mnist_accuracy.png").stat().st_size > 1000
    assert "![figures/mnist_accuracy.png](figures/mnist_accuracy.png)" in md
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(data["cells"])
    manifest = ckpt.read_manifest()
    assert "acc_gaussian_t20_ddim2" in manifest["checkpoints"]["mnist_tt-r2.safetensors"]["metrics"]


def test_attack_cache_resumes_from_the_chunks_already_made(tiny_world, monkeypatch, capsys):
    from tendiff import attacks
    calls = []
    real = attacks.pgd_eot_exact
    monkeypatch.setattr(attacks, "pgd_eot_exact", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    out, cache = tiny_world / "results", tiny_world / "attacks"
    args = ["--dataset", "mnist", "--n-attack", "5", "--seeds", "2", "--t-star", "20", "--steps", "2",
            "--exact-steps", "2", "--exact-eot", "1", "--corruptions", "exact", "--purifiers", "dense",
            "--no-timing", "--out", str(out), "--attack-chunk", "2", "--attack-cache", str(cache)]
    evaluate_main(args)
    first = json.loads((out / "results.json").read_text())["results"][0]["cells"][0]
    chunks = sorted(cache.glob("mnist_exact_*.safetensors"))
    assert calls == [2, 2, 1] and len(chunks) == 3
    chunks[0].unlink()  # as if the run had stopped before its first chunk was saved
    evaluate_main(args)
    again = json.loads((out / "results.json").read_text())["results"][0]["cells"][0]
    assert len(calls) == 4 and len(list(cache.glob("*.safetensors"))) == 3
    assert again["accuracy_per_seed"] == first["accuracy_per_seed"]
    assert again["attack_seconds"] > 0
    evaluate_main([*args[:11], "3", *args[12:]])  # another budget: another attack
    assert len(calls) == 7 and len(list(cache.glob("*.safetensors"))) == 6
    assert "older attack code" not in (out / "results.md").read_text()
    monkeypatch.setattr(attacks, "ATTACK_VERSION", attacks.ATTACK_VERSION + 1)  # new attack code: new attacks
    evaluate_main(args)
    assert len(calls) == 10 and len(list(cache.glob("*.safetensors"))) == 9
    monkeypatch.setattr(attacks, "ATTACK_VERSION", attacks.ATTACK_VERSION + 1)  # the rows above are now older
    evaluate_main([*args, "--merge", "--add-rows", "--purifiers", "none"])
    assert "older attack code (version" in (out / "results.md").read_text()
    capsys.readouterr()


def test_vote_defense_votes_over_its_seeds(tiny_world):
    cfg = EvalConfig(t_star=20, steps=1, purifiers=("dense", "dense/vote3"))
    diffusion, x = GaussianDiffusion(), torch.rand(6, 1, 28, 28)
    single, voted = load_defenses(cfg, diffusion, torch.zeros(6, dtype=torch.long))[0]
    assert (single.votes, voted.votes) == (1, 3) and single.model is voted.model
    classifier = ckpt.load_model(ckpt.checkpoint_name("mnist", "classifier"))
    runs = torch.stack([single.predict(classifier, x, s) for s in vote_seeds(5, 3)])
    assert torch.equal(voted.predict(classifier, x, 5), vote(runs, 10)[0])
    assert torch.equal(voted.purify(x, 5), single.purify(x, 5))


def test_hybrid_runs_the_classical_step_then_the_diffusion_defense(tiny_world):
    from tendiff import attacks
    cfg = EvalConfig(t_star=20, steps=2, purifiers=("dense/adaptive-t", "median3+dense/adaptive-t", "median3+dense"))
    diffusion, x, y = GaussianDiffusion(), torch.rand(4, 1, 28, 28), torch.arange(4)
    (inner, hybrid, fixed), missing = load_defenses(cfg, diffusion, y)
    assert not missing and (hybrid.prefilter, hybrid.adaptive_t, fixed.adaptive_t) == ("median3", True, False)
    assert hybrid.model is inner.model and hybrid.identity[:-1] == inner.identity and hybrid.identity[-1] == "median3"
    filtered = classical.purify("median3", x)
    assert torch.equal(hybrid.purify(x, 3), inner.purify(filtered, 3))
    assert hybrid.unsupported("adaptive") and hybrid.unsupported("exact") is None
    # The exact attack's gradient: through the diffusion defense at the filtered input, passed back
    # through the filter unchanged (BPDA).
    classifier = ckpt.load_model(ckpt.checkpoint_name("mnist", "classifier"))
    grad = fixed._grad_at_chosen_t(classifier, y, eot=2, seed=1)(x, 0)
    want = attacks.defense_loss_grad(classifier, fixed.model, diffusion, filtered, y, 20, 2, attacks.eot_seeds(1, 0, 2))[1]
    assert torch.allclose(grad, want) and grad.abs().sum() > 0
    adv = fixed.exact_attack(classifier, x, y, 0.1, steps=2, eot=1, seed=0)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(adv, x)


@pytest.mark.parametrize("name, message", [("foo+dense", "a hybrid is <classical>"), ("median3+tv", "a hybrid is"),
                                           ("median3+dense-cond/guided", "no hybrid")])
def test_hybrid_names_are_checked(tiny_world, name, message):
    with pytest.raises(ValueError, match=message):
        load_defenses(EvalConfig(purifiers=(name,)), GaussianDiffusion(), torch.zeros(1, dtype=torch.long))


def test_classical_purifier_without_its_library_is_missing(tiny_world, monkeypatch):
    monkeypatch.setattr(classical, "available", lambda name: name != "bm3d")
    cfg = EvalConfig(purifiers=("none", "median3", "bm3d", "tt-r4"))
    defenses, missing = load_defenses(cfg, GaussianDiffusion(), torch.zeros(1, dtype=torch.long))
    assert [(d.name, d.kind, d.parameters) for d in defenses] == [("none", "none", 0), ("median3", "classical", 0)]
    assert missing == ["bm3d", "tt-r4"] and not defenses[1].stochastic and not defenses[1].differentiable


def test_bpda_runs_the_purifier_forward_and_stays_in_the_ball():
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    seen = []

    def purify(v):  # piecewise constant: its true gradient is zero, BPDA's is the classifier's
        seen.append(v.clone())
        return (v * 4).round() / 4
    adv = pgd_bpda(classifier, purify, x, y, eps=0.1, steps=3, seed=1)
    assert len(seen) == 3 and (adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
    start = pgd_bpda(classifier, purify, x, y, eps=0.1, steps=0, seed=1)  # the random start alone
    assert not torch.equal(adv, start) and torch.equal(adv, pgd_bpda(classifier, purify, x, y, 0.1, 3, seed=1))


def test_merge_keeps_other_datasets_with_their_commands(tiny_world, capsys):
    out = tiny_world / "results"
    args = ["--n", "4", "--seeds", "1", "--t-star", "10", "--steps", "1", "--corruptions", "none", "gaussian",
            "--purifiers", "none", "dense", "--no-timing", "--out", str(out)]
    evaluate_main(["--dataset", "mnist"] + args)
    other = json.loads((out / "results.json").read_text())
    fake = json.loads(json.dumps(other["results"][0]))
    fake["config"]["dataset"] = "cifar10"
    fake["command"] = "python -m tendiff.evaluate --dataset cifar10 (earlier run)"
    other["results"].append(fake)
    (out / "results.json").write_text(json.dumps(other))
    evaluate_main(["--dataset", "mnist", "--merge"] + args)  # replaces mnist, keeps cifar10
    merged = json.loads((out / "results.json").read_text())["results"]
    assert [r["config"]["dataset"] for r in merged] == ["mnist", "cifar10"]
    md = (out / "results.md").read_text()
    assert "(earlier run)" in md and "--merge" in md and "## cifar10" in md
    capsys.readouterr()
    evaluate_main(["--summarize", str(out / "results.json")])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| dataset | purifier | clean | Gaussian |")
    assert [row.split(" | ")[:2] for row in table[2:]] == [["| mnist", "none"], ["| mnist", "dense"],
                                                           ["| cifar10", "none"], ["| cifar10", "dense"]]


def test_side_by_side_evaluations_merge_one_at_a_time(tiny_world):
    out = tiny_world / "results"
    evaluate_main(["--dataset", "mnist", "--n", "4", "--seeds", "1", "--t-star", "10", "--steps", "1", "--corruptions",
                   "none", "--purifiers", "none", "--no-timing", "--out", str(out)])
    (cifar,) = json.loads((out / "results.json").read_text())["results"]
    cifar["config"]["dataset"] = "cifar10"
    written = threading.Event()
    with results_lock(out):  # another evaluation is writing its results
        writer = threading.Thread(target=lambda: (save_results([cifar], out, "cifar10 run", merge=True), written.set()))
        writer.start()
        assert not written.wait(0.5)  # waits for it, then merges with what it wrote
    writer.join(30)
    merged = json.loads((out / "results.json").read_text())["results"]
    assert written.is_set() and [r["config"]["dataset"] for r in merged] == ["mnist", "cifar10"]


def test_results_are_written_when_a_figure_fails(tiny_world, monkeypatch, capsys):
    def broken(*_):
        raise ValueError("xerr must not contain negative values")
    monkeypatch.setattr("tendiff.evaluate.figures", broken)
    out = tiny_world / "results"
    evaluate_main(["--dataset", "mnist", "--n", "4", "--seeds", "1", "--t-star", "10", "--steps", "1", "--corruptions",
                   "none", "--purifiers", "none", "dense", "--no-timing", "--out", str(out)])
    (res,) = json.loads((out / "results.json").read_text())["results"]
    assert res["figures"] == [] and {c["purifier"] for c in res["cells"]} == {"none", "dense"}
    assert "figures not drawn: ValueError" in capsys.readouterr().err


def test_add_rows_extends_a_dataset_and_refuses_other_settings(tiny_world, capsys):
    out = tiny_world / "results"
    args = ["--dataset", "mnist", "--n", "4", "--seeds", "1", "--t-star", "10", "--steps", "1", "--corruptions", "none",
            "gaussian", "--no-timing", "--out", str(out)]
    evaluate_main(args + ["--purifiers", "none", "dense"])
    first = json.loads((out / "results.json").read_text())["results"][0]
    evaluate_main(args + ["--purifiers", "dense/adaptive-t/vote2", "dense", "--merge", "--add-rows"])
    (res,) = json.loads((out / "results.json").read_text())["results"]
    assert res["config"]["purifiers"] == ["none", "dense/adaptive-t/vote2", "dense"]
    assert sorted((c["corruption"], c["purifier"]) for c in res["cells"]) == sorted(
        (c, p) for c in ("none", "gaussian") for p in ("none", "dense", "dense/adaptive-t/vote2"))
    kept = {(c["corruption"], c["purifier"]): c for c in first["cells"]}
    assert all(c == kept[(c["corruption"], "none")] for c in res["cells"] if c["purifier"] == "none")
    assert res["command"].count("python -m tendiff.evaluate") == 2 and "--add-rows" in res["command"]
    assert "dense/adaptive-t/vote2" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="settings differ.*n"):
        evaluate_main([*args[:2], "--n", "6", *args[4:], "--purifiers", "dense", "--merge", "--add-rows"])
    with pytest.raises(ValueError, match="each at most once"):
        evaluate_main(args + ["--purifiers", "dense/vote2/vote3"])
    capsys.readouterr()


def test_baseline_claims_compare_dense_with_the_best_classical_purifier():
    from tendiff.evaluate import baseline_claims

    def cell(acc, lo, hi):
        return {"accuracy": acc, "ci95": [lo, hi]}
    cells = {("gaussian", "dense"): cell(0.9, 0.88, 0.92), ("gaussian", "median3"): cell(0.7, 0.67, 0.73),
             ("gaussian", "tv"): cell(0.8, 0.77, 0.83), ("salt_pepper", "dense"): cell(0.6, 0.57, 0.63),
             ("salt_pepper", "median3"): cell(0.95, 0.93, 0.96), ("none", "dense"): cell(0.95, 0.93, 0.97),
             ("none", "tv"): cell(0.94, 0.92, 0.96)}
    text = "\n".join(baseline_claims(cells))
    assert "Gaussian**: dense 90.0% vs the best classical, tv, 80.0%: supported" in text
    assert "salt & pepper**: dense 60.0% vs the best classical, median3, 95.0%: not supported" in text
    assert "clean**: dense 95.0% vs the best classical, tv, 94.0%: not shown (the intervals overlap; dense is ahead)" in text
    cells[("none", "tv")] = cell(0.96, 0.94, 0.98)
    assert "tv, 96.0%: not shown (the intervals overlap; the classical purifier is ahead)" in "\n".join(baseline_claims(cells))
