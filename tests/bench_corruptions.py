"""Speed of exp_corruption.corrupt (batched) against the per-image reference loop (tests/cifar_c_reference.py,
the generator's libraries) on the same 1000 images (exp_corruption.py's batch), one CPU thread each, side by side:

    python tests/bench_corruptions.py [--n 1000] [--severity 3] [--device cpu|cuda] [--repeats 3]
    python tests/bench_corruptions.py --full [--n 10000] [--device cpu|cuda]   # all 18 x 5 severities, ours only

Each side is timed --repeats times and the best time counts (the spread on a shared machine is large).

Motion blur and snow (Wand/ImageMagick in the original) and frost (pictures) have no reference here.
"""
import argparse
import pathlib
import sys
import time

import numpy as np
import torch

sys.path[:0] = [str(pathlib.Path(__file__).resolve().parent.parent), str(pathlib.Path(__file__).resolve().parent)]
import cifar_c_reference as ref  # noqa: E402
import exp_corruption  # noqa: E402


def reference(u8, name, s, rng):
    n = u8.shape[0]
    if name in ref.exp_corruption.CORRUPTIONS["noise"]:
        return ref.noise(u8, name, s, rng)
    if name == "glass_blur":
        sigma, d, passes = exp_corruption.SEVERITY[name][s - 1]
        return ref.glass(u8, s, rng.integers(-d, d, (passes, (n - 2 * d) ** 2, 2)))
    if name == "fog":
        return ref.fog(u8, s, lambda shape: rng.random(shape))
    if name == "elastic_transform":
        return ref.elastic(u8, s, rng.random((3, 2)), rng.random((n, n)), rng.random((n, n)))
    if name == "spatter":
        return ref.spatter(u8, s, rng.standard_normal((n, n)))
    return ref.deterministic(u8, name, s)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="each side timed this many times; the best counts")
    p.add_argument("--names", nargs="+", default=None, help="only these corruptions (default: every one with a reference)")
    p.add_argument("--full", action="store_true", help="time generating every corruption (frost aside) at every "
                   "severity for --n images with the batched generator alone, in batches of 1000")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.full:
        return full(args)
    u8 = np.random.default_rng(0).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    x = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255).to(args.device)
    rng = np.random.default_rng(0)
    names = [n for n in exp_corruption.CORRUPTION_NAMES if n not in exp_corruption.APPROXIMATE and n != "frost"]
    names = [n for n in names if args.names is None or n in args.names]
    print(f"{args.n} images, severity {args.severity}, one CPU thread; batched on {args.device}")
    print(f"{'corruption':20s} {'reference s':>12s} {'batched s':>10s} {'ratio':>7s}")
    tot_ref = tot_ours = 0.0
    for name in names:
        def run_reference():
            for im in u8:
                reference(im, name, args.severity, rng)

        def run_batched():
            exp_corruption.corrupt(x, name, args.severity, torch.Generator().manual_seed(0))
            if args.device == "cuda":
                torch.cuda.synchronize()

        exp_corruption.corrupt(x[:8], name, args.severity, torch.Generator().manual_seed(0))  # warm-up (caches, kernels)
        t_ref, t_ours = best_time(run_reference, args.repeats), best_time(run_batched, args.repeats)
        tot_ref, tot_ours = tot_ref + t_ref, tot_ours + t_ours
        print(f"{name:20s} {t_ref:12.3f} {t_ours:10.3f} {t_ref / t_ours:6.1f}x", flush=True)
    print(f"{'all ' + str(len(names)):20s} {tot_ref:12.3f} {tot_ours:10.3f} {tot_ref / tot_ours:6.1f}x")


def full(args):
    u8 = np.random.default_rng(0).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    x = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255).to(args.device)
    g = torch.Generator().manual_seed(0)
    print(f"{args.n} images x 5 severities, one CPU thread; batched on {args.device}, batches of 1000")
    total = 0.0
    for name in [n for n in exp_corruption.CORRUPTION_NAMES if n != "frost"]:
        t = time.perf_counter()
        for s in range(1, 6):
            for i in range(0, args.n, 1000):
                exp_corruption.corrupt(x[i:i + 1000], name, s, g).cpu()
        total += time.perf_counter() - t
        print(f"{name:20s} {time.perf_counter() - t:8.1f} s", flush=True)
    print(f"{'all 18':20s} {total:8.1f} s")


if __name__ == "__main__":
    main()
