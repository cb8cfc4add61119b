import pytest
import torch

from tendiff.attacks import gaussian_noise, salt_and_pepper
from tendiff.classical import CLASSICAL, estimate_noise, purify

NAMES = list(CLASSICAL)


def scene(channels: int, size: int) -> torch.Tensor:
    """Two images: a smooth gradient with a bright rectangle, and its mirror with a dark one."""
    ramp = torch.linspace(0.1, 0.9, size)
    img = (ramp[None, :] + ramp[:, None]) / 2
    a, b = img.clone(), img.flip(1)
    a[size // 4:size // 2, size // 4:3 * size // 4] = 0.95
    b[size // 2:3 * size // 4, size // 3:2 * size // 3] = 0.05
    x = torch.stack([a, b])[:, None].repeat(1, channels, 1, 1)
    if channels == 3:
        x = x * torch.tensor([1.0, 0.8, 0.6])[None, :, None, None]  # a coloured scene
    return x


def constant(channels: int, size: int, n: int = 2) -> torch.Tensor:
    return torch.full((n, channels, size, size), 0.5)


def rmse(x: torch.Tensor) -> float:
    return ((x - 0.5) ** 2).mean().sqrt().item()


SHAPES = [(1, 28), (3, 32)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels,size", SHAPES)
def test_shape_range_and_determinism(name, channels, size):
    x = gaussian_noise(scene(channels, size), 0.05, seed=1)
    out = purify(name, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, purify(name, x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels,size", SHAPES)
def test_lowers_gaussian_noise_on_a_constant_image(name, channels, size):
    noisy = gaussian_noise(constant(channels, size), 0.1, seed=2)
    assert rmse(purify(name, noisy)) < rmse(noisy)


@pytest.mark.parametrize("name", ["median3", "adaptive_median"])
@pytest.mark.parametrize("channels,size", SHAPES)
def test_median_filters_remove_salt_and_pepper(name, channels, size):
    noisy = salt_and_pepper(constant(channels, size, n=4), 0.2, seed=3)
    out = purify(name, noisy)
    left = ((out - 0.5).abs() > 0.01).float().mean().item()
    assert left < 0.01, f"{name} left {left:.1%} of the pixels wrong"


@pytest.mark.parametrize("name", NAMES)
def test_noise_free_constant_image_is_kept(name):
    x = constant(3, 32)  # estimate_noise is 0: nothing to remove
    assert torch.allclose(purify(name, x), x, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_black_background_with_ties_stays_finite(name):
    x = torch.zeros(1, 1, 28, 28)
    x[..., 8:20, 12:16] = 1.0  # an MNIST-like stroke: many identical (all-zero) patches
    out = purify(name, salt_and_pepper(x, 0.05, seed=6))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_gray_rgb_image_stays_finite(name):
    x = gaussian_noise(scene(1, 32), 0.1, seed=7).repeat(1, 3, 1, 1)  # R = G = B: CBM3D's 0/0 case
    out = purify(name, x)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_explicit_parameter_overrides_the_rule():
    noisy = gaussian_noise(constant(1, 28), 0.1, seed=4)
    assert torch.equal(purify("tv", noisy, weight=0.0), noisy)  # no regularisation: unchanged
    assert rmse(purify("tv", noisy, weight=0.3)) < rmse(purify("tv", noisy, weight=0.02))


def test_estimate_noise_grows_with_sigma_and_is_zero_on_a_constant():
    assert estimate_noise(constant(3, 32)).tolist() == [0.0, 0.0]
    levels = [estimate_noise(gaussian_noise(constant(1, 28), s, seed=5)).mean().item() for s in (0.05, 0.1, 0.2)]
    assert levels[0] < levels[1] < levels[2]
    assert levels[1] == pytest.approx(0.1, rel=0.15)  # ~0.97 sigma on white noise
    assert estimate_noise(scene(1, 28)).shape == (2,)


def test_errors():
    x = constant(1, 28)
    with pytest.raises(ValueError, match="median3.*tucker"):
        purify("wiener", x)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        purify("median3", x + 1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        purify("median3", x[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        estimate_noise(x - 1)
