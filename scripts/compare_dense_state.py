"""Held-out accuracy of the committed dense purifier vs the EMA in a campaign state (Fashion-MNIST,
300 images after evaluate's first 1000; fixed t*=250 and adaptive x1.5 adding the full noise, the
rule of the time): ``python scripts/compare_dense_state.py``."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch
from tendiff import checkpoints as ckpt
from tendiff.adaptive import AdaptiveTStar, purify_adaptive
from tendiff.classifiers import predict
from tendiff.data import load_dataset
from tendiff.diffusion import GaussianDiffusion, purify_chunks
from tendiff.evaluate import evaluation_order
from tendiff.protocol import STRENGTH, corrupt
from tendiff.unet import UNet, preset
torch.set_num_threads(1)
test = load_dataset("fashion_mnist", "test")
idx = evaluation_order(len(test), 0)[1000:1300]
x, y = test.float_images(idx), test.labels[idx]
clf = ckpt.load_model("fashion_mnist_classifier.safetensors")
old = ckpt.load_model("fashion_mnist_dense.safetensors")
new = UNet(preset("fashion_mnist")); state = torch.load("campaign/fashion_mnist/dense/state.pt", weights_only=True)
new.load_state_dict(state["ema"]); new.eval()
d = GaussianDiffusion()
inputs = {k: corrupt(k, x, STRENGTH["fashion_mnist"].get(k), 0) for k in ("none", "gaussian", "salt_pepper")}
acc = lambda im: round(100 * (predict(clf, im).argmax(1) == y).float().mean().item(), 1)
print("none", [acc(v) for v in inputs.values()])
for name, m in (("old dense (pre-campaign)", old), (f"campaign dense EMA step {state['step']}", new)):
    print(name, "t*=250", [acc(purify_chunks(m, d, v, 250, 0, num_steps=10)) for v in inputs.values()],
          "adaptive x1.5", [acc(purify_adaptive(m, d, v, AdaptiveTStar(1.5, matched=False), 0, num_steps=10)[0]) for v in inputs.values()], flush=True)
