import numpy as np
import pytest
import torch
from scipy import ndimage

from tendiff.adaptive import AdaptiveTStar, purify_adaptive
from tendiff.classical import estimate_noise
from tendiff.diffusion import GaussianDiffusion, purify
from tendiff.unet import UNet, UNetConfig


def noisy(sigma: float, n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + sigma * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)


def test_t_star_is_the_shallowest_that_covers_the_estimated_noise():
    diffusion, rule = GaussianDiffusion(), AdaptiveTStar(factor=1.5)
    x = torch.cat([noisy(s) for s in (0.02, 0.05, 0.1, 0.2)])
    t = rule.choose(x, diffusion)
    sigma = estimate_noise(x)
    assert t.tolist() == sorted(t.tolist()) and len(set(t.tolist())) == 4  # deeper for noisier inputs
    for ti, si in zip(t.tolist(), sigma.tolist()):
        assert ti % rule.quantum == 0 and rule.t_min <= ti <= rule.t_max
        assert diffusion.noise_std(ti) >= rule.factor * si
        if ti > rule.t_min:
            assert diffusion.noise_std(ti - rule.quantum) < rule.factor * si


def test_t_star_stays_within_bounds():
    diffusion, rule = GaussianDiffusion(), AdaptiveTStar(t_min=20, t_max=300)
    flat = torch.full((1, 1, 28, 28), 0.5)
    chaos = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)).round()  # s&p everywhere
    assert rule.choose(flat, diffusion).item() == 20
    assert rule.choose(chaos, diffusion).item() == 300
    assert "t* = 300" in rule.describe(0.5, 300, diffusion)


def test_purify_adaptive_runs_each_image_at_its_own_t_star():
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_channels=1, image_size=28, channels=(8, 8), time_dim=8, groups=4)).eval()
    x = torch.cat([noisy(0.01), noisy(0.3, seed=1)])
    rule, diffusion = AdaptiveTStar(), GaussianDiffusion()
    out, t = purify_adaptive(model, diffusion, x, rule, seed=3, num_steps=2)
    again, _ = purify_adaptive(model, diffusion, x, rule, seed=3, num_steps=2)
    assert out.shape == x.shape and t[0] < t[1] and torch.equal(out, again)
    alone, _ = purify_adaptive(model, diffusion, x[1:], rule, seed=3, num_steps=2)
    assert torch.allclose(alone, out[1:], atol=1e-6)  # an image's result does not depend on its batch mates


def test_noise_the_input_carries_is_not_added_twice():
    diffusion, t = GaussianDiffusion(), 200
    x = noisy(0.1, n=2)
    model = UNet(UNetConfig(in_channels=1, image_size=28, channels=(8, 8), time_dim=8, groups=4)).eval()
    start = lambda **kw: next(purify(model, diffusion, x, t, num_steps=2, seed=1, **kw)).x_t  # noqa: E731
    a = float(diffusion.alphas_cumprod[t])
    # Noise already at t*'s level: nothing is added, x_t is the scaled input.
    covered = start(input_noise=torch.full((2,), diffusion.noise_std(t)))
    torch.testing.assert_close(covered, (a ** 0.5 * (2 * x - 1) + 1) / 2, rtol=0, atol=2e-3)  # (float32: 1e-7 under a sqrt)
    torch.testing.assert_close(start(input_noise=torch.zeros(2)), start())  # none carried: the textbook q_sample
    half = start(input_noise=torch.tensor([0.0, diffusion.noise_std(t) / 2]))
    added = (half - (a ** 0.5 * (2 * x - 1) + 1) / 2).flatten(1).std(1)
    # Half of t*'s std (a quarter of its variance) carried: sqrt(3/4) of the full noise added.
    assert added[1] == pytest.approx(added[0] * 0.75 ** 0.5, rel=0.1)
    assert added[0] == pytest.approx((1 - a) ** 0.5 / 2, rel=0.1)


def test_matched_rule_counts_the_estimate_and_the_plain_one_does_not():
    x = noisy(0.2, n=3)
    torch.testing.assert_close(AdaptiveTStar().input_noise(x), estimate_noise(x))
    assert AdaptiveTStar(matched=False).input_noise(x) is None
    assert "only the rest is added" in AdaptiveTStar().describe(0.2, 100, GaussianDiffusion())
    assert "only the rest is added" in AdaptiveTStar().rule() and "1.5 x" in AdaptiveTStar(factor=1.5).rule()
    assert "full noise" in AdaptiveTStar(matched=False).rule() and "x the" not in AdaptiveTStar().rule()


def test_noise_estimate_is_scipys_median_residual():
    g = torch.Generator().manual_seed(4)
    for shape in [(3, 1, 28, 28), (2, 3, 32, 32), (1, 1, 5, 7)]:
        x = torch.rand(shape, generator=g)
        a = x.double().numpy()
        residual = a - ndimage.median_filter(a, size=(1, 1, 3, 3), mode="mirror")
        np.testing.assert_allclose(estimate_noise(x).numpy(), residual.std(axis=(2, 3)).mean(axis=1), rtol=1e-6)


def test_auto_t_star_mode_is_adaptive_for_noise_and_fixed_under_attack():
    from tendiff.protocol import adaptive_t_star
    assert [adaptive_t_star(c) for c in ("none", "gaussian", "salt_pepper")] == [True] * 3
    assert [adaptive_t_star(c) for c in ("pgd_linf", "autoattack_l2", "adaptive", "exact")] == [False] * 4
    assert adaptive_t_star("exact", "adaptive") and not adaptive_t_star("gaussian", "fixed")
    assert adaptive_t_star("pgd_linf", True) and not adaptive_t_star("none", False)  # the older API's bool
    with pytest.raises(ValueError, match="t\\* mode"):
        adaptive_t_star("gaussian", "sometimes")
