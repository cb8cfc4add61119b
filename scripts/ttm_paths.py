"""Time the ttm layout's two execution paths on one 48 -> 48 3x3 layer at 28x28:
``python scripts/ttm_paths.py`` (median ms, one thread, inference mode). The "auto" mode's
CHAIN_COST for ttm (tendiff.tt) comes from this table (docs/performance.md)."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tendiff.tt import TTConv2d  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
conv = torch.nn.Conv2d(48, 48, 3, 1, 1)
print("| rank | batch | chain ms | cached ms | auto takes |\n|---|---|---|---|---|")
for rank in (1, 2, 3, 4):
    layer = TTConv2d.from_conv(conv, rank, "ttm")
    for n in (1, 64):
        x = torch.randn(n, 48, 28, 28)
        ms = {}
        with torch.inference_mode():
            for mode in ("chain", "cached"):
                layer.mode = mode
                for _ in range(3):
                    layer(x)
                times = []
                for _ in range(21 if n == 1 else 7):
                    t0 = time.perf_counter()
                    layer(x)
                    times.append(time.perf_counter() - t0)
                ms[mode] = 1e3 * sorted(times)[len(times) // 2]
            layer.mode = "auto"
            auto = layer.resolve_mode(x)
        print(f"| {rank} | {n} | {ms['chain']:.3f} | {ms['cached']:.3f} | {auto} |", flush=True)
