"""Image quality against a reference: PSNR and SSIM per image of a batch in [0, 1]."""
from __future__ import annotations

import torch
from skimage.metrics import structural_similarity


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (skimage's formula; identical images: 100 dB, not inf)."""
    mse = (x - ref).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (scikit-image, with Wang et al. 2004's Gaussian window, sigma 1.5), averaged
    over channels."""
    def one(a, b):
        return structural_similarity(a.permute(1, 2, 0).double().numpy(), b.permute(1, 2, 0).double().numpy(),
                                     channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    return torch.tensor([one(a, b) for a, b in zip(x.detach().cpu(), ref.detach().cpu())], dtype=torch.float32)
