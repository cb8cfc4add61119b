"""How much did an attack's random start couple to the defense's noise before ATTACK_VERSION 2?

Before version 2, an attack chunk crafted with seed s started from uniforms of the stream seeded s,
and the evaluation purifies with seeds 0, 1, ...: the chunk at image 0 (seed 0) started from the
uniforms behind purification run 0's forward noise (Box-Muller: correlation about -0.7 on half the
pixels). This reads the version-1 exact-attack chunks in the attack cache (keys without a version),
and prints per chunk the correlation of the final perturbation with its start and with run 0's
forward noise, and the accuracy of run 0 against runs 1-9 on it.

    python scripts/attack_start_coupling.py --purifiers dense  (Fashion-MNIST, docs/results.md settings)
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tendiff import cli, evaluate as E  # noqa: E402

SETTINGS = ("--dataset fashion_mnist --corruptions exact --n 200 --n-attack 100 --seeds 10 --no-timing "
            "--attack-chunk 25 --attack-cache campaign/attacks").split()


def main(argv=None):
    cfg = cli.from_args(E.EvalConfig, E.parse_args(SETTINGS + list(sys.argv[1:] if argv is None else argv)))
    ev = E.Evaluation(cfg)
    n, size = cfg.n_attack, cfg.attack_chunk
    x, y = ev.images[:n], ev.labels[:n]
    for d in ev.defenses:
        settings = ("exact", d.identity, ev.strength["pgd_linf"], cfg.exact_steps, cfg.exact_eot)  # version 1
        for i in range(0, n, size):
            xs, ys, sd = x[i:i + size], y[i:i + size], cfg.seed + i
            path = ev._chunk_file(settings, xs, ys, sd)
            if path is None or not path.exists():
                print(f"{d.name} images {i}-{i + size}: no version-1 chunk in the cache")
                continue
            adv, _ = E.load_chunk(path)
            delta = (adv - xs).flatten()
            start = (torch.rand(xs.shape, generator=torch.Generator().manual_seed(sd)) * 2 - 1).flatten()
            run0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(cfg.seed))[i:i + size].flatten()
            acc = torch.stack([d.predict(ev.classifier, adv, cfg.seed + s) == ys for s in range(cfg.seeds)]).float()
            corr = [torch.corrcoef(torch.stack([delta, v]))[0, 1].item() for v in (start, run0)]
            print(f"{d.name} images {i}-{i + size} (attack seed {sd}): corr(perturbation, start) {corr[0]:+.3f}, "
                  f"corr(perturbation, run-0 noise) {corr[1]:+.3f}; accuracy run 0 {acc[0].mean():.2f}, "
                  f"runs 1-{cfg.seeds - 1} {acc[1:].mean():.2f}", flush=True)


if __name__ == "__main__":
    main()
