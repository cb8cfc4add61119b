"""The exact-gradient adaptive attack, the majority-vote defense and the U-Net's MAC count."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tendiff.adaptive import AdaptiveTStar
from tendiff.attacks import defense_loss_grad, eot_seeds, pgd_eot_exact, purify_differentiable
from tendiff.defense import majority_vote, resubmission_accuracy, vote, vote_seeds
from tendiff.diffusion import GaussianDiffusion, purify_batch
from tendiff.tt import TTConv2d
from tendiff.unet import UNet, UNetConfig, preset

T_STAR = 100
DIFFUSION = GaussianDiffusion()


def tiny_unet(conv="dense", mode="auto", seed=0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=1, image_size=8, channels=(8, 8), time_dim=8, groups=4, conv=conv,
                            mode=mode))
    for p in model.parameters():  # the head starts at zero: give the purifier a real gradient
        nn.init.normal_(p, std=0.2)
    return model.double().eval()


def tiny_classifier(seed=1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).double().eval()


def toy_batch(n=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    # Away from 0 and 1, so that no pixel sits on the sampler's [-1, 1] clip at the start.
    x = 0.25 + 0.5 * torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.arange(n) % 3


# ------------------------------------------------------------ exact adaptive attack
@pytest.mark.parametrize("method,steps", [("ddim", 3), ("ddpm", 3), ("one-step", 1)])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_differentiable_purification_is_the_defense(method, steps, checkpoint):
    model = tiny_unet()
    x, _ = toy_batch()
    ours = purify_differentiable(model, DIFFUSION, x, T_STAR, steps, method, seed=5, checkpoint=checkpoint)
    theirs = purify_batch(model, DIFFUSION, x, T_STAR, num_steps=steps, method=method, seed=5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, purify_batch(model, DIFFUSION, x, T_STAR, num_steps=steps, method=method, seed=6))


@pytest.mark.parametrize("method,conv", [("ddim", "dense"), ("ddpm", "dense"), ("ddim", "tt")])
def test_attack_gradient_matches_central_differences(method, conv):
    model, clf = tiny_unet(conv, mode="chain" if conv == "tt" else "auto"), tiny_classifier()
    x, y = toy_batch()
    seeds = [11, 12]

    def loss(z):
        return defense_loss_grad(clf, model, DIFFUSION, z, y, T_STAR, 3, seeds, method, checkpoint=False)[0].item()

    value, grad = defense_loss_grad(clf, model, DIFFUSION, x, y, T_STAR, 3, seeds, method, checkpoint=True)
    assert value.item() == pytest.approx(loss(x), rel=1e-12)  # deterministic for fixed seeds
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    h = 1e-5
    numeric = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
    analytic = (grad * v).sum().item()
    assert abs(numeric) > 1e-3  # (a direction the loss really changes along)
    assert analytic == pytest.approx(numeric, rel=1e-5)


def test_gradient_through_the_counted_input_noise_matches_central_differences():
    """The matched adaptive defense subtracts its noise estimate (a median filter's residual)
    from t*'s noise: the exact attack differentiates through that estimate too."""
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch()
    rule = AdaptiveTStar()

    def run(z, checkpoint=False):
        return defense_loss_grad(clf, model, DIFFUSION, z, y, T_STAR, 3, [4, 5], "ddim", checkpoint, rule.input_noise)

    value, grad = run(x, checkpoint=True)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=x.dtype)
    h = 1e-6
    numeric = (run(x + h * v)[0].item() - run(x - h * v)[0].item()) / (2 * h)
    assert abs(numeric) > 1e-3 and (grad * v).sum().item() == pytest.approx(numeric, rel=1e-5)
    full_noise = defense_loss_grad(clf, model, DIFFUSION, x, y, T_STAR, 3, [4, 5], "ddim", False)[1]
    assert not torch.allclose(grad, full_noise)  # counting the input's noise changes what is attacked


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_checkpointing_does_not_change_the_gradient(method):
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch()
    with_ckpt = defense_loss_grad(clf, model, DIFFUSION, x, y, T_STAR, 4, [7, 8, 9], method, checkpoint=True)
    without = defense_loss_grad(clf, model, DIFFUSION, x, y, T_STAR, 4, [7, 8, 9], method, checkpoint=False)
    torch.testing.assert_close(with_ckpt[0], without[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(with_ckpt[1], without[1], rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())  # the attack leaves the models alone


def test_checkpointing_keeps_only_the_step_inputs():
    model = tiny_unet()
    x = toy_batch()[0].requires_grad_(True)
    saved = {}
    for checkpoint in (True, False):
        size = [0]

        def pack(t):
            size[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            purify_differentiable(model, DIFFUSION, x, T_STAR, 5, "ddim", 0, checkpoint)
        saved[checkpoint] = size[0]
    # Checkpointed: a few image-sized tensors per step (the step inputs, the final clip);
    # without: every activation of every network call.
    assert saved[True] * 50 < saved[False]
    assert saved[True] <= 5 * 2 * x.numel() * x.element_size()


def test_eot_seeds_are_fresh_and_avoid_the_defense_seeds():
    seen = [s for it in range(5) for s in eot_seeds(0, it, 4)]
    assert len(set(seen)) == 20 and min(seen) > 1000
    assert set(seen).isdisjoint(s for it in range(5) for s in eot_seeds(1, it, 4))


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.3)])
def test_exact_attack_stays_in_the_ball_and_is_deterministic(norm, eps):
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch()
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.99], dtype=x.dtype)  # pixels at the [0, 1] edges
    kw = dict(eps=eps, t_star=T_STAR, steps=3, eot=2, num_steps=2, norm=norm, seed=4)
    adv = pgd_eot_exact(clf, model, DIFFUSION, x, y, **kw)
    delta = adv - x
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-12
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-9
    assert adv.min() >= 0 and adv.max() <= 1
    assert delta.abs().max() > 0
    assert torch.equal(adv, pgd_eot_exact(clf, model, DIFFUSION, x, y, **kw))
    assert not torch.equal(adv, pgd_eot_exact(clf, model, DIFFUSION, x, y, **{**kw, "seed": 5}))
    no_start = pgd_eot_exact(clf, model, DIFFUSION, x, y, **{**kw, "steps": 0, "random_start": False})
    assert torch.equal(no_start, x)


def test_exact_attack_passes_a_prefilter_through_backward_unchanged():
    """A hybrid's classical step runs forward; its gradient is taken as the identity (BPDA)."""
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch()
    blur = lambda v: F.avg_pool2d(v, 3, stride=1, padding=1)  # (a stand-in for the classical filter)
    kw = dict(eps=0.05, t_star=T_STAR, steps=1, eot=2, num_steps=2, seed=4, random_start=False)
    adv = pgd_eot_exact(clf, model, DIFFUSION, x, y, prefilter=blur, **kw)
    grad = defense_loss_grad(clf, model, DIFFUSION, blur(x), y, T_STAR, 2, eot_seeds(4, 0, 2))[1]
    assert torch.allclose(adv, (x + 0.125 * grad.sign()).clamp(x - 0.05, x + 0.05).clamp(0, 1))
    assert torch.equal(pgd_eot_exact(clf, model, DIFFUSION, x, y, prefilter=lambda v: v, **kw),
                       pgd_eot_exact(clf, model, DIFFUSION, x, y, **kw))


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.4)])
def test_exact_attack_lowers_the_true_class_probability(norm, eps):
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch(4)
    adv = pgd_eot_exact(clf, model, DIFFUSION, x, y, eps=eps, t_star=T_STAR, steps=5, eot=2, num_steps=3, norm=norm,
                        seed=0)
    held_out = range(500, 508)  # purification noise the attack never saw

    def true_prob_and_loss(z):
        with torch.no_grad():
            p = torch.stack([clf(purify_batch(model, DIFFUSION, z, T_STAR, num_steps=3, seed=s)).softmax(1)
                             for s in held_out]).mean(0)
        return p.gather(1, y[:, None]).mean().item(), F.nll_loss(p.log(), y).item()

    p_clean, loss_clean = true_prob_and_loss(x)
    p_adv, loss_adv = true_prob_and_loss(adv)
    assert p_adv < p_clean and loss_adv > loss_clean


def test_exact_attack_loss_grows_over_steps_for_fixed_noise():
    # One EOT draw and the same noise at every step (seeds of step 0): plain gradient ascent
    # with small L-inf steps on a smooth function, so the loss must not decrease.
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch()
    seeds = eot_seeds(0, 0, 1)
    losses, z = [], x.clone()
    for _ in range(4):
        value, grad = defense_loss_grad(clf, model, DIFFUSION, z, y, T_STAR, 3, seeds)
        losses.append(value.item())
        z = (x + (z + 2e-3 * grad.sign() - x).clamp(-0.02, 0.02)).clamp(0, 1)
    assert all(b >= a for a, b in zip(losses, losses[1:])) and losses[-1] > losses[0]


def test_exact_attack_refuses_bad_arguments():
    model, clf = tiny_unet(), tiny_classifier()
    x, y = toy_batch()
    with pytest.raises(ValueError):
        pgd_eot_exact(clf, model, DIFFUSION, x, y, eps=0.1, t_star=T_STAR, steps=1, eot=1, num_steps=1, norm="l1")
    with pytest.raises(ValueError):
        pgd_eot_exact(clf, model, DIFFUSION, x, y, eps=0.1, t_star=T_STAR, steps=1, eot=0, num_steps=1)
    with pytest.raises(ValueError):
        purify_differentiable(model, DIFFUSION, x, T_STAR, 2, method="euler")


# ------------------------------------------------------------ majority vote
def test_majority_vote_is_deterministic_and_k1_is_one_purification():
    model, clf = tiny_unet(), tiny_classifier()
    x, _ = toy_batch(6)
    labels, frac = majority_vote(clf, model, DIFFUSION, x, T_STAR, k=5, num_steps=2, seed=3)
    again = majority_vote(clf, model, DIFFUSION, x, T_STAR, k=5, num_steps=2, seed=3)
    assert torch.equal(labels, again[0]) and torch.equal(frac, again[1])
    assert labels.shape == (6,) and frac.shape == (6,)
    assert ((frac >= 0.2) & (frac <= 1)).all()
    one, one_frac = majority_vote(clf, model, DIFFUSION, x, T_STAR, k=1, num_steps=2, seed=3)
    with torch.no_grad():
        single = clf(purify_batch(model, DIFFUSION, x, T_STAR, num_steps=2, seed=3)).argmax(1)
    assert torch.equal(one, single) and (one_frac == 1).all()
    # The votes by hand, with the documented seeds.
    with torch.no_grad():
        votes = torch.stack([clf(purify_batch(model, DIFFUSION, x, T_STAR, num_steps=2, seed=s)).argmax(1)
                             for s in vote_seeds(3, 5)])
    for b in range(6):
        counts = torch.bincount(votes[:, b], minlength=3)
        assert counts[labels[b]] == counts.max() and frac[b].item() == pytest.approx(counts.max().item() / 5)


def test_vote_seeds_nest():
    assert vote_seeds(3, 1) == [3]
    assert vote_seeds(3, 8)[:4] == vote_seeds(3, 4)
    assert len(set(vote_seeds(3, 8))) == 8
    with pytest.raises(ValueError):
        vote_seeds(0, 0)


def test_vote_ties_go_to_the_smaller_class():
    predictions = torch.tensor([[2, 1, 0, 4],
                                [1, 1, 3, 4],
                                [2, 5, 3, 4],
                                [1, 5, 0, 4]])  # (K=4 votes, B=4 images)
    labels, frac = vote(predictions, num_classes=6)
    assert labels.tolist() == [1, 1, 0, 4]
    assert frac.tolist() == [0.5, 0.5, 0.5, 1.0]
    labels, _ = vote(torch.tensor([[7], [2]]))
    assert labels.tolist() == [2]


def test_resubmission_accuracy():
    correct = torch.tensor([[1, 1, 0, 1],
                            [1, 0, 0, 1],
                            [1, 1, 1, 1]], dtype=torch.bool)
    mean, worst = resubmission_accuracy(correct)
    assert mean == pytest.approx(9 / 12) and worst == pytest.approx(2 / 4)
    assert resubmission_accuracy(torch.ones(1, 3)) == (1.0, 1.0)
    with pytest.raises(ValueError):
        resubmission_accuracy(torch.ones(3))


# ------------------------------------------------------------ MAC counts
def test_dense_mnist_macs_by_hand():
    model = UNet(preset("mnist"))  # 48 channels at 28, 14, 7; one block per level; time_dim 32
    conv3x3 = 48 * 48 * 9  # MACs per output pixel of a 48->48 3x3 conv
    hand = (28 * 28 * 48 * 1 * 9          # stem 1->48 at 28x28
            + 2 * 28 * 28 * conv3x3       # encoder block at 28x28: two convs
            + 2 * 14 * 14 * conv3x3       # encoder block at 14x14
            + 2 * 7 * 7 * conv3x3         # middle block at 7x7
            + 2 * 14 * 14 * conv3x3       # decoder block at 14x14
            + 2 * 28 * 28 * conv3x3       # decoder block at 28x28
            + 28 * 28 * 1 * 48 * 9        # head 48->1 at 28x28
            + 32 * 32                     # time MLP linear
            + 5 * 32 * 48)                # the five blocks' time_proj linears
    assert hand == 84_003_328
    assert model.macs() == hand
    linears = 32 * 32 + 5 * 32 * 48
    assert model.macs(56, 56) == 4 * (hand - linears) + linears  # convs scale with the pixels


def test_tt_mnist_macs_by_hand():
    model = UNet(preset("mnist", "tt", 2))
    # A rank-2 tt layer 48->48 on the chain ("auto" takes it: 3 x chain < dense), per pixel:
    # input core 48 x 2, contracted spatial cores 2 x 9 x 2, output core 2 x 48.
    tt_pixel = 48 * 2 + 2 * (2 * 9 + 48)
    pixels = 2 * (28 * 28 + 14 * 14) + 7 * 7  # each level's block count, times two convs below
    hand = (28 * 28 * 48 * 9 + 28 * 28 * 48 * 9  # dense stem and head
            + 2 * pixels * tt_pixel
            + 32 * 32 + 5 * 32 * 48)
    assert model.macs() == hand
    layers = [m for m in model.modules() if isinstance(m, TTConv2d)]
    assert len(layers) == 10
    assert all(m.resolve_mode(torch.zeros(1, 48, 28, 28)) == "chain" for m in layers)
    # Layers that run the full kernel count as dense: the dense model's count.
    assert UNet(preset("mnist", "tt", 2, mode="rebuild")).macs() == UNet(preset("mnist")).macs()
    assert UNet(preset("mnist", "tt", 2, mode="cached")).macs() == UNet(preset("mnist")).macs()


def _flop_counter_macs(model: UNet, size: int) -> int:
    x = torch.zeros(1, model.config.in_channels, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor(10))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("cfg", [
    preset("mnist"),
    preset("cifar10"),
    UNetConfig(in_channels=3, image_size=16, channels=(8, 16, 24), time_dim=8, groups=4),
])
def test_dense_macs_match_the_operators_run(cfg):
    # PyTorch's operator-level counter sees every conv and matrix product, however called
    # (F.conv2d inside conv_with_extra_bias, few_channel_conv's matrix products, the 1x1 resizes).
    model = UNet(cfg).eval()
    assert model.macs() == _flop_counter_macs(model, cfg.image_size)


def test_macs_refuse_sizes_the_levels_cannot_halve():
    with pytest.raises(ValueError):
        UNet(preset("mnist")).macs(30, 28)
