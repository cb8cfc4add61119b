import pytest
import torch
import torch.nn.functional as F

from tendiff.attacks import (autoattack_l2, gaussian_noise, pgd_eot_ddim_surrogate, pgd_eot_exact, pgd_l2,
                             pgd_linf, pgd_linf_from_grad, salt_and_pepper)
from tendiff.classifiers import build_classifier
from tendiff.diffusion import GaussianDiffusion, purify, purify_batch
from tendiff.unet import UNet, preset


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_classifier("mnist").eval()


@pytest.fixture(scope="module")
def purifier():
    torch.manual_seed(0)
    model = UNet(preset("mnist", "tt", 2, channels=(8, 16))).eval()
    for p in model.parameters():  # the head starts at zero: give the purifier a real gradient
        torch.nn.init.normal_(p, std=0.1)
    return model


def batch(n=4, channels=1, size=28):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, channels, size, size, generator=g), torch.arange(n) % 10


def test_gaussian_noise_stays_in_range_and_is_seeded():
    x, _ = batch()
    a = gaussian_noise(x, 0.2, seed=3)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, gaussian_noise(x, 0.2, seed=3))
    assert not torch.equal(a, gaussian_noise(x, 0.2, seed=4))
    mid = torch.full((1, 1, 100, 100), 0.5)
    assert gaussian_noise(mid, 0.05).std().item() == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("seed", [0, 5])
def test_corruption_noise_is_independent_of_the_purifier_noise_with_the_same_seed(purifier, seed):
    # The app and the evaluation corrupt and purify with one seed: the two noises must not be one draw.
    x, t = torch.full((4, 1, 28, 28), 0.5), 100
    corruption = (gaussian_noise(x, 0.1, seed=seed) - x).flatten()
    forward = forward_noise(purifier, x, t, seed)
    assert abs(torch.corrcoef(torch.stack([corruption, forward]))[0, 1].item()) < 0.1
    hit = (salt_and_pepper(x, 0.5, seed=seed) != x).float().flatten()
    assert abs(torch.corrcoef(torch.stack([hit, forward.abs()]))[0, 1].item()) < 0.1


def forward_noise(purifier, x, t, seed):
    """The noise purify(seed) diffuses x with to step t."""
    d = GaussianDiffusion()
    diffused = next(purify(purifier, d, x, t, seed=seed)).x_t  # frame 0: the input diffused to t
    a = float(d.alphas_cumprod[t])
    return ((diffused - a ** 0.5 * (2 * x - 1)) / (1 - a) ** 0.5).flatten()


@pytest.mark.parametrize("attack", ["exact", "surrogate", "from_grad", "pgd_linf"])
def test_an_attack_does_not_start_from_the_purifier_noise_with_the_same_seed(classifier, purifier, attack):
    # The evaluation crafts an attack chunk with seed s and purifies it with seeds 0, 1, ...: with one
    # stream, the random start (uniforms) would correlate with the forward noise (Box-Muller on them).
    x, y, eps, t, seed = torch.full((4, 1, 28, 28), 0.5), torch.arange(4), 0.1, 100, 0
    d = GaussianDiffusion()
    start = {"exact": lambda: pgd_eot_exact(classifier, purifier, d, x, y, eps, t, steps=0, seed=seed),
             "surrogate": lambda: pgd_eot_ddim_surrogate(classifier, purifier, d, x, y, eps, t, steps=0,
                                                                alpha=eps, seed=seed),
             "from_grad": lambda: pgd_linf_from_grad(x, None, eps, steps=0, seed=seed),
             "pgd_linf": lambda: pgd_linf(classifier, x, y, eps, alpha=eps, steps=0, seed=seed)}[attack]()
    delta = (start - x).flatten()
    assert delta.abs().max() <= eps + 1e-6 and delta.std() > eps / 3  # a real random start
    assert abs(torch.corrcoef(torch.stack([delta, forward_noise(purifier, x, t, seed)]))[0, 1].item()) < 0.1


def test_salt_and_pepper_hits_whole_pixels():
    x = torch.full((2, 3, 64, 64), 0.5)
    y = salt_and_pepper(x, 0.2, seed=0)
    changed = (y != 0.5)
    assert torch.equal(changed.all(1), changed.any(1))  # per pixel, not per colour channel
    frac = changed[:, 0].float().mean().item()
    assert frac == pytest.approx(0.2, abs=0.02)
    assert set(y.unique().tolist()) == {0.0, 0.5, 1.0}
    assert (y[:, 0][changed[:, 0]] == 1).float().mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("fn,arg", [(gaussian_noise, -0.1), (gaussian_noise, float("nan")), (salt_and_pepper, 1.5)])
def test_corruption_parameters_are_checked(fn, arg):
    with pytest.raises(ValueError):
        fn(batch()[0], arg)


def test_images_outside_unit_range_are_refused():
    with pytest.raises(ValueError):
        gaussian_noise(torch.full((1, 1, 4, 4), 2.0), 0.1)
    with pytest.raises(ValueError):
        gaussian_noise(torch.full((1, 1, 4, 4), float("nan")), 0.1)


def test_pgd_linf_stays_within_eps_and_fools_more(classifier):
    x, y = batch(8)
    adv = pgd_linf(classifier, x, y, eps=0.1, steps=5, seed=0)
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(classifier(adv), y) > F.cross_entropy(classifier(x), y)
    assert torch.equal(adv, pgd_linf(classifier, x, y, eps=0.1, steps=5, seed=0))


def test_pgd_l2_stays_within_eps(classifier):
    x, y = batch(4)
    adv = pgd_l2(classifier, x, y, eps=0.5, steps=5)
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-4
    assert adv.min() >= 0 and adv.max() <= 1


@pytest.mark.slow
def test_autoattack_l2_stays_within_eps(classifier):
    x, y = batch(2)
    adv = autoattack_l2(classifier, x, y, eps=0.5, version="rand")
    assert (adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-3


def test_gradient_flows_through_the_purifier(classifier, purifier):
    x, y = batch(2)
    x = x.clone().requires_grad_(True)
    out = purify_batch(purifier, GaussianDiffusion(), x, 100, num_steps=2, method="ddim", seed=0, grad=True)
    F.cross_entropy(classifier(out), y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_adaptive_attack_changes_the_input_within_eps(classifier, purifier):
    x, y = batch(2)
    d = GaussianDiffusion()
    adv = pgd_eot_ddim_surrogate(classifier, purifier, d, x, y, eps=0.05, t_star=50, steps=3, eot=2,
                                 surrogate_steps=2, seed=0)
    delta = (adv - x).abs()
    assert delta.max() <= 0.05 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # PGD's sign steps push most pixels to the boundary of the eps ball.
    assert (delta > 0.04).float().mean() > 0.5
