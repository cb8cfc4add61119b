"""Compare the evaluation's SSIM/PSNR before and after the move to scikit-image (kept for the record in docs/history.md)."""
import torch, numpy as np
from skimage.metrics import structural_similarity, peak_signal_noise_ratio
from tendiff.evaluate import psnr, ssim
from tendiff.data import load_dataset
from tendiff.protocol import corrupt
for ds in ["mnist", "cifar10"]:
    x = load_dataset(ds, "test").float_images(slice(0, 100))
    y = corrupt("gaussian", x, 0.1, 0)
    mine_s, mine_p = ssim(y, x), psnr(y, x)
    sk_s = torch.tensor([structural_similarity(a.permute(1,2,0).double().numpy(), b.permute(1,2,0).double().numpy(), channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False) for a, b in zip(y, x)])
    sk_p = torch.tensor([peak_signal_noise_ratio(b.double().numpy(), a.double().numpy(), data_range=1.0) for a, b in zip(y, x)])
    print(ds, "ssim mine %.4f skimage %.4f  maxdiff %.4f" % (mine_s.mean(), sk_s.mean(), (mine_s-sk_s).abs().max()), "psnr mine %.3f skimage %.3f" % (mine_p.mean(), sk_p.mean()))
