"""Throughput of the feature-dataset construction against its floor, side by side on one batch:

    python tests/bench_feature_datasets.py [--arch resnet18] [--width 0.25] [--batch 128] [--steps 20] [--device cpu|cuda]

The floor is `steps` x (one forward and one input-gradient backward of the source model) on the batch;
the construction is `steps` steps of common.invert_features (D_R, D_NR) and of targeted l2 PGD
(D_rand, D_det, D_conflict). Each is timed --repeats times, interleaved, and the best time counts.
"""
import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from common import eval_mode, invert_features, make_model, pgd  # noqa: E402


def best_time(fn, repeats, cuda):
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    dev, cuda = torch.device(args.device), args.device == "cuda"
    model = make_model(args.arch, norm="bn", width=args.width).to(dev).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)

    def floor(objective):
        def run():
            with eval_mode(model), torch.enable_grad():
                xr = x.clone().requires_grad_(True)
                for _ in range(args.steps):
                    torch.autograd.grad(objective(xr), xr)
        return run

    cases = [("inversion (D_R, D_NR)", floor(lambda xr: model.features(xr).pow(2).sum()),
              lambda: invert_features(model, x, x.flip(0), args.steps, 0.1)),
             ("targeted PGD (D_rand, D_det, D_conflict)", floor(lambda xr: F.cross_entropy(model(xr), y, reduction="sum")),
              lambda: pgd(model, x, y, 0.5, args.steps, 0.1, norm="l2", targeted=True))]
    print(f"{args.arch} width {args.width:g}, batch {args.batch} x 3 x {args.size} x {args.size}, {args.steps} steps, "
          f"{args.device}, {torch.get_num_threads()} threads; best of {args.repeats}")
    for name, fl, method in cases:
        method()  # warm-up
        pairs = [(best_time(fl, 1, cuda), best_time(method, 1, cuda)) for _ in range(args.repeats)]  # interleaved
        t_floor, t_method = min(f for f, _ in pairs), min(m for _, m in pairs)
        print(f"{name:42s} floor {t_floor:7.3f} s | construction {t_method:7.3f} s | "
              f"throughput / floor {t_floor / t_method:.3f}")


if __name__ == "__main__":
    main()
