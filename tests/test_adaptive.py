import torch

from tendiff.adaptive import AdaptiveTStar, purify_adaptive
from tendiff.classical import estimate_noise
from tendiff.diffusion import GaussianDiffusion
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
