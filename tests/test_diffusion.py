import math

import pytest
import torch

from tendiff.diffusion import GaussianDiffusion, ScheduleConfig, purify, purify_batch


class Dummy(torch.nn.Module):
    """A fixed, non-trivial function of (x, t), so the golden numbers pin the samplers."""

    def forward(self, x, t, y=None):
        return 0.5 * x + t.float().view(-1, 1, 1, 1) / 2000.0


class Oracle(torch.nn.Module):
    """Predicts exactly the noise that separates x_t from a known clean batch."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.d, self.x0 = diffusion, x0

    def forward(self, x_t, t, y=None):
        a = self.d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_schedule_matches_ho_et_al():
    d = GaussianDiffusion(ScheduleConfig(1000, 1e-4, 0.02))
    assert d.alphas_cumprod[0] == 1.0
    assert math.isclose(d.alphas_cumprod[1].item(), 1 - 1e-4)
    assert math.isclose(d.alphas_cumprod[1000].item(), 4.0358e-05, rel_tol=1e-3)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])


def test_q_sample_statistics():
    d = GaussianDiffusion()
    x0 = torch.full((20000, 1, 2, 2), 0.6)
    g = torch.Generator().manual_seed(0)
    for t in (10, 300, 900):
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        a = d.alphas_cumprod[t].item()
        assert abs(x_t.mean().item() - math.sqrt(a) * 0.6) < 0.01
        assert abs(x_t.std().item() - math.sqrt(1 - a)) < 0.01


def test_added_noise_std_is_q_sample_with_present_noise_in_pixel_units():
    d = GaussianDiffusion()
    noise = torch.randn(200_000)
    for t, present in ((100, 0.0), (300, 0.1), (300, 0.3), (50, 0.5)):
        x_t = d.q_sample(torch.zeros(1), t, noise, present=2 * present)  # (model units: twice the pixel's)
        pixel_std = float(x_t.std()) / (2 * float(d.alphas_cumprod[t]) ** 0.5)
        assert math.isclose(d.added_noise_std(t, present), pixel_std, rel_tol=0.01, abs_tol=1e-4)
    assert d.added_noise_std(100) == d.noise_std(100) and d.added_noise_std(50, 0.5) == 0.0


def test_noise_std_round_trip():
    d = GaussianDiffusion()
    for t in (1, 50, 100, 400, 1000):
        assert d.t_for_noise_std(d.noise_std(t)) == t
    # At t=100, x_t/sqrt(abar) = x0 + 2*std*eps in [-1,1] units: check against the formula.
    a = d.alphas_cumprod[100].item()
    assert math.isclose(d.noise_std(100), 0.5 * math.sqrt((1 - a) / a))
    with pytest.raises(ValueError):
        d.noise_std(1001)


@pytest.mark.parametrize("method,expected_sum,expected_row", [
    ("ddpm", 6.882490, [0.0, 0.234987, 0.704286, 0.226411]),
    ("ddim", 7.613807, [0.0, 0.273203, 0.449662, 0.0]),
    ("one-step", 7.397866, [0.0, 0.257962, 0.433319, 0.0]),
])
def test_golden_values(method, expected_sum, expected_row):
    x = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    out = purify_batch(Dummy(), GaussianDiffusion(), x, 200, num_steps=4, method=method, seed=7)
    assert out.sum().item() == pytest.approx(expected_sum, abs=1e-4)
    assert out[0, 0, 0].tolist() == pytest.approx(expected_row, abs=1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_oracle_model_recovers_the_clean_image(method):
    d = GaussianDiffusion()
    x = torch.rand(3, 1, 8, 8)
    out = purify_batch(Oracle(d, x * 2 - 1), d, x, 300, num_steps=7, method=method, seed=1)
    assert torch.allclose(out, x, atol=1e-4)


def test_ddpm_single_steps_sample_the_true_posterior():
    """Consecutive DDPM steps must have Ho et al.'s posterior mean and variance (Eqs. 6-7)."""
    d = GaussianDiffusion()
    t = 50
    x0 = torch.full((40000, 1, 1, 1), 0.3)
    x_t = torch.full_like(x0, 0.1)
    eps = (x_t - d.alphas_cumprod[t].sqrt().float() * x0) / (1 - d.alphas_cumprod[t]).sqrt().float()
    out = d.step(eps, t, t - 1, x_t, "ddpm", generator=torch.Generator().manual_seed(0)).prev_sample
    beta, a_t, a_s = d.betas[t].item(), d.alphas_cumprod[t].item(), d.alphas_cumprod[t - 1].item()
    mean = math.sqrt(a_s) * beta / (1 - a_t) * 0.3 + math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * 0.1
    var = (1 - a_s) / (1 - a_t) * beta
    assert out.mean().item() == pytest.approx(mean, abs=3e-4)
    assert out.var().item() == pytest.approx(var, rel=0.03)


@pytest.mark.parametrize("method,steps,expected", [("ddpm", 10, 11), ("ddim", 25, 26), ("one-step", 50, 2)])
def test_purify_yields_the_promised_frames(method, steps, expected):
    x = torch.rand(2, 1, 6, 6)
    frames = list(purify(Dummy(), GaussianDiffusion(), x, 100, num_steps=steps, method=method))
    assert len(frames) == expected
    assert [f.index for f in frames] == list(range(expected))
    assert frames[0].t == 100 and frames[-1].t == 0 and frames[-1].final
    ts = [f.t for f in frames]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == len(ts)
    for f in frames:
        assert f.x_t.shape == x.shape and f.pred_x0.shape == x.shape
        assert f.pred_x0.min() >= 0 and f.pred_x0.max() <= 1
    assert torch.equal(frames[-1].x_t, frames[-1].pred_x0)


def test_one_step_is_the_prediction_at_t_star():
    x = torch.rand(2, 1, 6, 6)
    d = GaussianDiffusion()
    frames = list(purify(Dummy(), d, x, 120, method="one-step", seed=3))
    assert torch.allclose(frames[-1].x_t, frames[0].pred_x0)


def test_seed_fixes_the_result_and_changes_it_when_changed():
    x = torch.rand(2, 1, 6, 6)
    d = GaussianDiffusion()
    a = purify_batch(Dummy(), d, x, 100, num_steps=5, method="ddpm", seed=1)
    b = purify_batch(Dummy(), d, x, 100, num_steps=5, method="ddpm", seed=1)
    c = purify_batch(Dummy(), d, x, 100, num_steps=5, method="ddpm", seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_per_image_seeds_make_a_result_independent_of_its_batch(method):
    """Image i of a batch with seeds [s_0, s_1, ...] equals a batch-1 run with s_i (the app batches
    concurrent requests; each must get what it would alone), step by step."""
    x = torch.rand(3, 1, 6, 6)
    d = GaussianDiffusion()
    batch = list(purify(Dummy(), d, x, 100, num_steps=4, method=method, eta=0.5, seed=[7, 8, 9]))
    for i, s in enumerate([7, 8, 9]):
        alone = list(purify(Dummy(), d, x[i: i + 1], 100, num_steps=4, method=method, eta=0.5, seed=s))
        for a, b in zip(batch, alone):
            assert torch.allclose(a.x_t[i: i + 1], b.x_t, atol=1e-6) and torch.allclose(a.pred_x0[i: i + 1], b.pred_x0,
                                                                                       atol=1e-6)
    with pytest.raises(ValueError, match="one seed per image"):
        next(purify(Dummy(), d, x, 100, seed=[1, 2]))


@pytest.mark.parametrize("kwargs", [dict(t_star=0), dict(t_star=1001), dict(num_steps=0),
                                    dict(num_steps=101), dict(method="euler")])
def test_bad_purify_arguments_are_refused_before_work(kwargs):
    args = dict(t_star=100, num_steps=10, method="ddim") | kwargs
    with pytest.raises(ValueError):
        next(purify(Dummy(), GaussianDiffusion(), torch.rand(1, 1, 4, 4), **args))


def test_guidance_mixes_conditional_and_unconditional_predictions():
    from tendiff.unet import UNet, preset

    model = UNet(preset("mnist", num_classes=10, channels=(8, 16))).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    d = GaussianDiffusion()
    x_t, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    t = torch.full((2,), 50)
    with torch.no_grad():
        cond, uncond = model(x_t, t, y), model(x_t, t)
        guided = d.predict_eps(model, x_t, 50, y, guidance_scale=2.0)
    assert torch.allclose(guided, 3 * cond - 2 * uncond, atol=1e-5)
    with pytest.raises(ValueError):
        d.predict_eps(Dummy(), x_t, 50, y, 2.0)
