"""Many visitors at once: ``python scripts/load_test.py http://127.0.0.1:7860/ --clients 20 --per-client 3``.

Each client sends ``--per-client`` default purifications (MNIST, Gaussian, tt-r2, new seeds) one
after another, all clients at once; prints the total time and the median and worst latency of a
request. ``--varied`` cycles through uploads, corruptions and attacks, purifications with every
MNIST purifier and 2-4 steps, and parameter plots instead (request k of the run is kind k % 5;
``--first`` offsets k, so that runs continue one another). Clients do not download the result files unless ``--download`` (on one machine the
clients' downloads cost more CPU than the server does: that measures the clients).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-client", type=int, default=3)
    p.add_argument("--download", action="store_true", help="clients download every result file")
    p.add_argument("--varied", action="store_true", help="mixed requests, not only default purifications")
    p.add_argument("--first", type=int, default=0, help="the first request's number (with --varied)")
    args = p.parse_args()
    from gradio_client import Client, handle_file

    latencies, errors = [], []
    start = threading.Barrier(args.clients)

    def client(i: int) -> None:
        try:
            c = Client(args.url, verbose=False, download_files=args.download)
            start.wait(timeout=120)
            for j in range(args.per_client):
                t = time.perf_counter()
                if args.varied:
                    varied(c, args.first + i + args.clients * j)
                else:
                    request = ["mnist", handle_file(str(ASSETS / f"mnist_{i % 10}_0.png")), str(i % 10), "gaussian",
                               0.2, 0.2, 0.2, 10, 1, 2, 1000 + 10 * i + j, "tt-r2", 200, "ddim", 10]
                    final = c.predict(*request, api_name="/purify")
                    if not final[2].startswith("Done"):
                        errors.append(f"client {i}: {final[2]}")
                latencies.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001 - counted and shown
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timing = (f"latency median {statistics.median(latencies):.1f} s, worst {max(latencies):.1f} s; "
              if latencies else "")
    print(f"{len(latencies)} {'requests' if args.varied else 'purifications'} from {args.clients} clients in {time.perf_counter() - t0:.1f} s; "
          f"{timing}{len(errors)} errors {errors[:3]}")
    raise SystemExit(1 if errors else 0)


def varied(c, k: int) -> None:
    """Request k of a mixed load: an upload, a corruption or attack, a purification (two in five;
    every MNIST purifier in turn), or a parameter plot."""
    from gradio_client import handle_file
    image = handle_file(str(ASSETS / f"mnist_{k % 10}_{k % 2}.png"))
    kind, label = k % 5, str(k % 10)
    if kind == 0:
        c.predict("mnist", image, api_name="/prepare")
    elif kind == 1:
        corruption = ("gaussian", "salt_pepper", "pgd_linf")[k % 3]
        c.predict("mnist", image, label, corruption, 0.3, 0.2, 0.2, 5, 1, 2, k, "tt-r2", 150, api_name="/corrupt")
    elif kind in (2, 3):
        model = ("tt-r1", "tt-r2", "tt-r3", "tt-r4", "dense")[(k // 5) % 5]
        final = c.predict("mnist", image, label, "gaussian", 0.3, 0.2, 0.2, 5, 1, 2, k, model, 150, "ddim", 2 + k % 3,
                          api_name="/purify")
        if not final[2].startswith("Done"):
            raise RuntimeError(final[2])
    else:
        c.predict("mnist", 1 + k % 16, api_name="/learn_params")


if __name__ == "__main__":
    main()
