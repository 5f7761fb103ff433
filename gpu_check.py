"""The prepared GPU check: what a person with one GPU runs once to know the project works there and what it costs.

    python gpu_check.py                          # one GPU: every check, under 8 minutes
    python gpu_check.py --device cpu --quick     # the same checks, scaled down (the test suite runs a part of it)
    python cost_table.py --measured gpu_check/throughput.json   # the cost table priced with the measured speed

Checks, each reported as passed or failed with its time in gpu_check/report.json:
  smoke        every exp_*.py's smoke preset on --device (with --amp and --deterministic on CUDA, where they apply);
  portability  a checkpoint written on the CPU resumed on the device, and the reverse (train_model);
  cache        exp_table1.py trained into a --cache and then served from it (no training epoch the second time);
  imagenet     P1 Table 1's ImageNet ResNet18 +-BN trained 2 epochs on a small JPEG tree written here (224 crops streamed
               by DataLoader workers, bf16 on CUDA), evaluated, then resumed from its checkpoints with nothing to redo;
  throughput   images/s of a training step and of one PGD step for the paper presets' models at their paper batch
               size, float32 and bf16 autocast, with the achieved TFLOP/s (FLOPs from cost_table.flops) -- written to
               gpu_check/throughput.json, which cost_table.py reads in place of its assumed utilization.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import common

ROOT = pathlib.Path(__file__).resolve().parent
SMOKE = {  # the smoke command of every script (what its tests run), without --out
    "exp_table1": [], "exp_corruption": ["--artifact", "t7", "--arch", "vgg8", "--corruptions", "fog", "--severities", "1"],
    "exp_transfer": [], "exp_ligs_trend": [], "exp_feature_datasets": ["--artifact", "fig7"], "exp_landscape": [],
    "exp_input_dim": [], "exp_depth_batch": [], "exp_spheres": []}
MODELS = [  # (arch, make_model arguments, input shape, paper batch size): the paper presets' CIFAR-size models
    ("vgg8", dict(norm="bn"), (3, 32, 32), 128), ("vgg11", dict(norm="bn"), (3, 32, 32), 128),
    ("vgg16", dict(norm="bn"), (3, 32, 32), 128), ("vgg19", dict(norm="bn"), (3, 32, 32), 128),
    ("resnet18", dict(norm="bn"), (3, 32, 32), 128), ("resnet50", dict(norm="bn"), (3, 32, 32), 128),
    ("resnet18", dict(norm="gn"), (3, 32, 32), 128), ("wrn28_10", dict(norm="bn"), (3, 32, 32), 128)]


def timed(fn, repeats, device):
    """Seconds per call of fn(), after one warm-up call, with the device synchronized around the timing."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def throughput(device, quick):
    """images/s of a training step (forward, backward, SGD step) and of one PGD-linf step (forward and input
    gradient), float32 and bf16 autocast, per model; achieved TFLOP/s of the training step."""
    import cost_table  # (FLOPs of one pass, counted on the meta device)
    rows = []
    for arch, kw, shape, batch in MODELS[4:7] if quick else MODELS:  # (quick: the ResNets, tiny)
        kw = dict(kw, width=1 / 16) if quick else kw
        b = 8 if quick else batch
        model = common.fast_layout(common.make_model(arch, **kw).to(device))
        x, y = torch.rand(b, *shape, device=device), torch.randint(0, 10, (b,), device=device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        row = dict(arch=arch, norm=kw["norm"], batch=b, shape=list(shape))
        for precision in ("fp32", "bf16"):
            amp = precision == "bf16" and device.type == "cuda"
            if precision == "bf16" and not amp:
                continue  # bf16 autocast is the CUDA path (common.precision_policy)

            def train_step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def pgd_step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    common.pgd(model, x, y, 8 / 255, steps=1)

            model.train()
            t_train = timed(train_step, 2 if quick else 20, device)
            t_pgd = timed(pgd_step, 2 if quick else 20, device)
            fb = cost_table.flops(arch, tuple(shape), num_classes=10, in_channels=shape[0], **kw)[1]
            row |= {f"train_images_per_s_{precision}": b / t_train, f"pgd_images_per_s_{precision}": b / t_pgd,
                    f"train_tflops_{precision}": fb * b / t_train / 1e12}
        rows.append(row)
        print(f"  {arch:9s} {kw['norm']:3s} batch {b:4d} | train " +
              " | ".join(f"{p} {row[f'train_images_per_s_{p}']:9.0f} img/s ({row[f'train_tflops_{p}']:.1f} TFLOP/s)"
                         for p in ("fp32", "bf16") if f"train_images_per_s_{p}" in row) +
              " | PGD step " + " ".join(f"{p} {row[f'pgd_images_per_s_{p}']:.0f} img/s" for p in ("fp32", "bf16")
                                        if f"pgd_images_per_s_{p}" in row))
    return dict(device=str(device), name=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                torch=torch.__version__, models=rows)


def portability(device, tmp):
    """A checkpoint written on one device resumed on the other, both ways (train_model)."""
    data_cpu = common.build_dataset("synthetic", n_train=64, n_test=16, size=8, channels=1, seed=0)
    recipe = dict(epochs=2, batch_size=16, lr=0.1, adv=dict(kind="pgd", eps=0.02, steps=2, rand_init=True))
    for a, b in ((torch.device("cpu"), device), (device, torch.device("cpu"))):
        ckpt = tmp / f"{a.type}_to_{b.type}.pt"

        def stop(epoch, model):
            if epoch == 2:
                raise KeyboardInterrupt
            return {}

        for dev, on_epoch in ((a, stop), (b, None)):
            data = common.build_dataset("synthetic", device=dev, n_train=64, n_test=16, size=8, channels=1, seed=0) \
                if dev.type != "cpu" else data_cpu
            torch.manual_seed(0)
            model = common.make_model("mlp", norm="bn", in_dim=64, hidden=[16], num_classes=10).to(dev)
            try:
                out = common.train_model(model, data, recipe, seed=1, ckpt=ckpt, log=lambda s: None, on_epoch=on_epoch)
            except KeyboardInterrupt:
                continue
        assert [h["epoch"] for h in out["history"]] == [0, 1, 2], out["history"]
        print(f"  a checkpoint written on {a.type} resumed on {b.type}")


def imagenet(device, tmp, quick):
    """exp_table1.py --artifact p1_t1_imagenet on a JPEG tree of 3 classes (32 training, 8 validation images each, at
    ImageNet's typical 500 x 375): the streaming training and evaluation path of P1's ImageNet ResNets, and a rerun
    that resumes from the finished models."""
    import numpy as np
    from PIL import Image
    root = tmp / "imagenet"
    for split, n in (("train", 32), ("val", 8)):
        for k, wnid in enumerate(("n01440764", "n02102040", "n02979186")):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(1000 * k + i + (500 if split == "val" else 0))
                Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(root / split / wnid / f"{i}.JPEG")
    args = ["--artifact", "p1_t1_imagenet", "--arch", "resnet18", "--imagenet-root", str(root), "--epochs", "2",
            "--batch-size", "8" if quick else "32", "--workers", "2" if quick else "4"] + \
        (["--size", "32"] if quick else []) + (["--amp"] if device.type == "cuda" else [])
    first = run_script("exp_table1", args, device, tmp / "imagenet_run")
    speed = [line.rsplit("images/s", 1)[0].rsplit(", ", 1)[-1].strip() for line in first.replace("\r", "\n").splitlines()
             if "epoch 2/2:" in line and "images/s" in line]
    print(f"  trained and evaluated ResNet18 none and bn; last training progress: {speed[-1:]} images/s")
    second = run_script("exp_table1", args + ["--resume"], device, tmp / "imagenet_run")
    assert "epoch 1/2" not in second, "the resumed run trained again"


def run_script(name, args, device, out):
    cmd = [sys.executable, f"{name}.py", "--preset", "smoke", *args, "--device", device.type, "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="the device to check (default: cuda)")
    p.add_argument("--quick", action="store_true", help="tiny models and few repetitions (what the tests run)")
    p.add_argument("--only", nargs="+", choices=["smoke", "portability", "cache", "imagenet", "throughput"],
                   help="run only these checks (default: all)")
    p.add_argument("--scripts", nargs="+", choices=list(SMOKE), help="smoke: only these scripts (default: all)")
    p.add_argument("--out", default="gpu_check", help="folder for report.json and throughput.json (default: gpu_check)")
    args = p.parse_args()
    device = common.pick_device(args.device)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(device=str(device), checks=[])
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def check(name, fn):
        t0 = time.time()
        print(f"{name} ...")
        try:
            fn()
            report["checks"].append(dict(check=name, passed=True, seconds=round(time.time() - t0, 1)))
        except Exception as e:  # every check is reported, passed or not
            report["checks"].append(dict(check=name, passed=False, seconds=round(time.time() - t0, 1),
                                         error=f"{e.__class__.__name__}: {e}"))
            print(f"  FAILED: {e.__class__.__name__}: {e}")

    todo = args.only or ["smoke", "portability", "cache", "imagenet", "throughput"]
    if "smoke" in todo:
        for name in args.scripts or SMOKE:
            extra = ["--amp"] if device.type == "cuda" else []
            check(f"smoke {name}", lambda: run_script(name, SMOKE[name] + extra, device, tmp / name))
        if device.type == "cuda":
            check("smoke exp_table1 --deterministic",
                  lambda: run_script("exp_table1", ["--deterministic", "--arch", "vgg8"], device, tmp / "det"))
    if "portability" in todo:
        check("portability", lambda: portability(device, tmp))
    if "cache" in todo:
        def cache():
            base = ["--arch", "vgg8", "--norm", "bn", "--epochs", "1", "--cache", str(tmp / "cache")]
            first, second = (run_script("exp_table1", base, device, tmp / f"cache{i}") for i in (1, 2))
            assert "epoch   1/1" in first and "epoch   1/1" not in second and "resumed from" in second
        check("cache", cache)
    if "imagenet" in todo:
        check("imagenet", lambda: imagenet(device, tmp, args.quick))
    if "throughput" in todo:
        def measure():
            table = throughput(device, args.quick)
            (out / "throughput.json").write_text(json.dumps(table, indent=1))
        check("throughput", measure)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    print(f"{len(report['checks']) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
