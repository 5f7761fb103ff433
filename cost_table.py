"""What paper scale costs: runs, epochs, forward+backward passes and GPU-hours of every artifact at the paper preset.

For each exp_*.py artifact this resolves the script's own paper preset (its get_args and run list), counts the
passes of one sample through a model -- training steps (one per sample and epoch, plus the attack steps of
adversarial training), the attacks and LIGS of the evaluations, per-epoch measurements, feature extraction --
and multiplies them by the FLOPs of one pass, measured with torch.utils.flop_counter.FlopCounterMode on the
real model (on the meta device: shapes only, nothing is computed). An attack step (forward + backward to the
input) is counted as one forward+backward pass; an evaluation without gradient as one forward pass. GPU-hours
assume one H100 at a stated sustained throughput (default: 10 % of its 989 TFLOP/s dense bf16 peak -- CIFAR-size
models at batch 128 are far from peak) and at least a stated time per training step (default 1 ms: tiny MLPs at
batch 5 are bound by kernel launches, not FLOPs). Both are assumptions, not measurements (DECISIONS.md D31).

    python cost_table.py             # print the table
    python cost_table.py --write     # and put it into README.md (between the cost-table markers)
    python cost_table.py --measured gpu_check/throughput.json   # priced with the TFLOP/s gpu_check.py measured
"""
import argparse
import functools
import json
import pathlib
import re

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import exp_corruption
import exp_depth_batch
import exp_feature_datasets
import exp_input_dim
import exp_landscape
import exp_ligs_trend
import exp_spheres
import exp_table1
import exp_transfer

ROOT = pathlib.Path(__file__).resolve().parent
SIZES = {"cifar10": (50000, 10000, (3, 32, 32)), "svhn": (73257, 26032, (3, 32, 32)), "mnist": (60000, 10000, (1, 28, 28)),
         "imagenet": (1281167, 50000, (3, 224, 224)), "imagenet100": (128_000, 5000, (3, 64, 64))}  # (100 classes)
MARK = ("<!-- cost-table:start -->", "<!-- cost-table:end -->")


@functools.lru_cache(maxsize=None)
def flops(arch, shape, **kw):
    """(forward, forward+backward) FLOPs of one sample through make_model(arch, **kw) on inputs of `shape`."""
    with torch.device("meta"):  # parameters without storage; the passes below then run on meta tensors too
        model = common.make_model(f"imagenet_{arch}", norm=kw["norm"], num_classes=1000) if kw.get("imagenet") else \
            common.make_model(arch, **kw)
    x = torch.empty(2, *shape, device="meta")
    with FlopCounterMode(display=False) as fb:
        model(x).sum().backward()
    with FlopCounterMode(display=False) as f, torch.no_grad():
        model.eval()(x)
    return f.get_total_flops() / 2, fb.get_total_flops() / 2


class Tally:
    """Runs, epochs and passes of one artifact, and their FLOPs."""

    def __init__(self):
        self.runs = self.epochs = self.steps = 0
        self.passes = dict(train=0.0, attack=0.0, extract=0.0, fwd=0.0)
        self.flops = 0.0

    def model(self, arch, shape, fb=0.0, fwd=0.0, kind="train", **kw):
        f, b = flops(arch, tuple(shape), **kw)
        self.passes[kind] += fb
        self.passes["fwd"] += fwd
        self.flops += fb * b + fwd * f

    def train(self, arch, shape, n, epochs, runs, adv_steps=0, extra=1.0, batch=128, **kw):
        """`runs` models trained `epochs` epochs on n samples; adversarial training adds adv_steps attack passes."""
        self.runs += runs
        self.epochs += runs * epochs
        self.steps += runs * epochs * -(-n // batch) * (1 + adv_steps)
        self.model(arch, shape, fb=runs * epochs * n * extra, **kw)
        if adv_steps:
            self.model(arch, shape, fb=runs * epochs * n * adv_steps, kind="attack", **kw)


def attack_steps(spec):
    if spec["kind"] == "worst":  # every attack of the worst case runs on every sample
        return sum(attack_steps(s) for s in spec["attacks"])
    return {"clean": 0, "noise": 0, "fgsm": 1}.get(spec["kind"], spec.get("steps", 0) * spec.get("restarts", 1))


def epoch_metrics_cost(t, arch, shape, n_test, n_sub, steps, perturbations, runs_epochs, **kw):
    """common.epoch_metrics once per epoch (and before training): clean test accuracy, l2 PGD and LIGS on a subset."""
    calls = runs_epochs
    t.model(arch, shape, fwd=calls * n_test, kind="attack", **kw)
    per = n_sub * (1 + steps + sum(7 if p == "pgd" else 1 for p in perturbations))
    t.model(arch, shape, fb=calls * per, kind="attack", **kw)


def cost_table1(args):
    t = Tally()
    art = exp_table1.ARTIFACTS[args.artifact]["runs"]
    if art.get("imagenet"):  # torchvision's released models (evaluation only) and P1's ResNets (trained, then evaluated)
        specs = exp_table1.imagenet_specs(args, art["space"])
        n_eval = args.n_eval or 50_000  # ImageNet's validation set
        for _, a, n in exp_table1.plan(args):
            kw = dict(norm=n, num_classes=1000, in_channels=3, imagenet=True)
            if a in art.get("train", ()):
                r = exp_table1.imagenet_recipe(args)
                t.train(a, (3, 224, 224), SIZES["imagenet"][0], r["epochs"], 1, batch=r["batch_size"], **kw)
            t.model(a, (3, 224, 224), fb=n_eval * sum(attack_steps(s) for s in specs.values()), kind="attack", **kw)
            t.model(a, (3, 224, 224), fwd=n_eval * len(specs), **kw)
        return t
    for d, a, n in exp_table1.plan(args):
        n_train, n_test, shape = SIZES[d]
        shape = (shape[0],) + ((exp_table1.input_size(args, d, a),) * 2 if exp_table1.input_size(args, d, a) else shape[1:])
        kw = dict(norm=n, num_classes=10, in_channels=shape[0]) | ({} if a.startswith("wrn") else dict(width=args.width))
        r = exp_table1.recipe(args, d, a, n)
        seeds = exp_table1.seeds_for(args, a)[0]
        t.train(a, shape, n_train, r["epochs"], seeds, batch=r["batch_size"], **kw)
        space = exp_table1.ARTIFACTS[args.artifact]["runs"]["space"]
        specs = exp_table1.attack_suite(args, space, d, (1.0, 1.0, 1.0))
        specs |= exp_table1.strong_suite(args, specs) if args.attacks == "strong" else {}
        measured = 2 if r.get("select") == "best_test" else 1  # the final and the selected epoch
        steps = sum(attack_steps(s) for s in specs.values())
        n_eval = min(args.n_eval or n_test, n_test)
        bisect = 2 * (args.min_eps_iters + 1) * args.attack_steps * min(args.min_eps_n, n_eval) if args.min_eps_iters else 0
        t.model(a, shape, fb=measured * seeds * (n_test * steps + bisect), kind="attack", **kw)  # (+ the two bisections)
        t.model(a, shape, fwd=measured * seeds * (n_test * len(specs) + n_train) + (r["epochs"] * seeds * n_test if
                measured == 2 else 0), **kw)  # (+ the training set for the generalization gap; + per-epoch selection)
    return t


def cost_corruption(args):
    t = Tally()
    for d, a, n, training in exp_corruption.plan(args):
        n_train, n_test, shape = SIZES[d]
        kw = dict(norm=n, num_classes=10, in_channels=3) | ({} if a.startswith("wrn") else dict(width=args.width))
        r = exp_corruption.recipe(args, d, a, n, training)
        seeds = args.arch_seeds.get(a, args.seeds)
        t.train(a, shape, n_train, r["epochs"], seeds, adv_steps=r["adv"]["steps"] if r.get("adv") else 0,
                batch=r["batch_size"], **kw)
        sets = 1 + len(args.corruptions) * len(args.severities or range(1, 6))
        t.model(a, shape, fwd=seeds * (args.n_eval or n_test) * sets, **kw)
    return t


def cost_transfer(args):
    t = Tally()
    if args.artifact == "p1_t3":  # the models are exp_corruption.py's (shared through --cache): counted here too
        n_train, n_test, shape = SIZES[args.dataset]
        pool = args.per_class * 10 if args.per_class else n_train if args.extract_from == "train" else n_test
        for training in ("standard", "adversarial"):
            for n in args.norm:
                kw = dict(norm=n, num_classes=10, in_channels=3, width=args.width)
                r = exp_transfer.recipe(args, "pixels", n, training)
                t.train(args.arch[0], shape, n_train, r["epochs"], args.seeds, batch=r["batch_size"],
                        adv_steps=r["adv"]["steps"] if r.get("adv") else 0, **kw)
                t.model(args.arch[0], shape, fb=args.seeds * pool * args.inv_steps, kind="extract", **kw)
                t.model(args.arch[0], shape, fwd=args.seeds * pool * len(args.norm), **kw)
        return t
    n_eval = args.n_eval or 2048  # P2 Table 10 on ImageNet: torchvision's pretrained VGGs, no training
    for a in args.arch:
        for n in args.norm:
            kw = dict(norm=n, num_classes=1000, in_channels=3, imagenet=True)
            if a == "vgg11":
                t.model(a, (3, 224, 224), fb=n_eval * args.bim_steps, kind="attack", **kw)
            t.model(a, (3, 224, 224), fwd=2 * 2 * n_eval, **kw)
    return t


def cost_ligs_trend(args):
    t = Tally()
    n_train, n_test, shape = SIZES[args.dataset]
    for _, o in exp_ligs_trend.runs(args):
        arch, norm = o.get("arch", args.arch), o.get("norm", "bn")
        classes = {"imagenet100": 100, "imagenet": 1000}.get(args.dataset, 10)
        kw = dict(norm=norm, num_classes=classes, in_channels=3, width=o.get("width", args.width))
        epochs = o.get("epochs", args.epochs)
        lam = o.get("ligs_lambda", 0.0)
        t.train(arch, shape, n_train, epochs, args.seeds, batch=args.batch_size,
                adv_steps=args.adv_steps if o.get("adversarial") else 0,
                extra=3.0 if lam > 0 else 1.0, **kw)  # the LIGS penalty: double backprop, ~3 passes
        perts = common.PERTURBATIONS if o.get("all_perturbations") else ("gaussian",)
        epoch_metrics_cost(t, arch, shape, n_test, args.per_class * classes, args.attack_steps, perts,
                           args.seeds * (epochs + 1), **kw)
    return t


def cost_feature_datasets(args):
    t = Tally()
    n_train, n_test, shape = SIZES[args.dataset]
    n = args.n_build or n_train
    src = dict(norm="bn", num_classes=10, in_channels=3, width=args.source_width)
    if args.artifact == "build":
        t.train(args.source_arch, shape, n_train, args.source_epochs, 1, batch=args.batch_size, **src)  # standard source
        t.train(args.source_arch, shape, n_train, args.source_epochs, 1, adv_steps=args.adv_steps, batch=args.batch_size,
                **src)  # robust
        t.model(args.source_arch, shape, fb=2 * n * args.inv_steps, kind="extract", **src)  # D_R, D_NR
        t.model(args.source_arch, shape, fb=3 * n * args.attack_steps, kind="extract", **src)  # D_rand, D_det, D_conflict
        return t
    for name, params in exp_feature_datasets.planned_runs(args):
        kw = dict(norm=params["norm"], num_classes=10, in_channels=3, width=args.width)
        t.train(args.arch, shape, n_train, args.epochs, 1, batch=args.batch_size, **kw)
        epoch_metrics_cost(t, args.arch, shape, n_test, args.per_class * 10, args.eval_steps, ("gaussian",),
                           args.epochs + 1, **kw)
    return t


def cost_landscape(args):
    t = Tally()
    n_train, n_test, shape = SIZES[args.dataset]
    for variant, arch, norm, shortcut in exp_landscape.models(args):
        kw = dict(norm=norm, num_classes=10, in_channels=3) | ({} if arch.startswith("wrn") else dict(width=args.width))
        if arch.startswith("resnet"):
            kw["shortcut"] = shortcut
        t.train(arch, shape, n_train, args.epochs, args.seeds, batch=args.batch_size, **kw)
        if args.artifact == "fig9":
            epoch_metrics_cost(t, arch, shape, n_test, args.per_class * 10, args.attack_steps, ("gaussian",),
                               args.seeds * (args.epochs + 1), **kw)
        else:  # a probe every probe_every steps of the first probe_epochs: loss and gradient at 8 step lengths
            probes = args.probe_epochs * -(-n_train // args.batch_size) // args.probe_every
            t.model(arch, shape, fb=args.seeds * probes * args.batch_size * len(exp_landscape.STEP_MULTIPLIERS),
                    kind="attack", **kw)
    return t


def cost_input_dim(args):
    t = Tally()
    n_train, n_test, (c, h, w) = SIZES[args.dataset]
    for name, p in exp_input_dim.planned_runs(args):
        if p["table"] == "fig4":
            d = c * h * w
            for n in ("none", "bn"):
                t.train("mlp", (d,), n_train, args.bottleneck_epochs, 1, batch=args.batch_size, norm=n, in_dim=d,
                        hidden=(d // 2, d // 4, 2, d // 16), norm_positions=(0, 1))
            continue
        d = c * (h * p["k"]) * (w * p["k"])
        if p["table"] == "t11":
            kw = dict(norm="none", in_dim=d, hidden=(), init="default")
            t.train("mlp", (d,), n_train, args.epochs, 1, batch=args.batch_size, **kw)
            t.model("mlp", (d,), fb=2 * n_test, fwd=3 * n_test, kind="attack", **kw)
        else:
            kw = dict(norm=p["norm"], in_dim=d, hidden=(d // 2, d // 2), norm_positions=(0,))
            t.train("mlp", (d,), n_train, args.mlp_epochs, 1, batch=args.batch_size, **kw)
            if p["table"] == "appb":  # clean test set and the two 100-example files
                t.model("mlp", (d,), fwd=n_test + 200, **kw)
            else:
                t.model("mlp", (d,), fb=n_test * args.bim_steps, fwd=3 * n_test, kind="attack", **kw)
    return t


def cost_depth_batch(args):
    t = Tally()
    n_train, n_test, (c, h, w) = SIZES[args.dataset]
    epochs = dict(zip(("bn", "none"), exp_depth_batch.ARTIFACTS[args.artifact]["runs"]["epochs"]))
    for name, p in exp_depth_batch.planned_runs(args):
        kw = dict(norm=p["norm"], in_dim=c * h * w, hidden=(args.width,) * p["depth"])
        t.train("mlp", (c * h * w,), n_train, max(1, round(epochs[p["norm"]] * args.epoch_scale)), 1, batch=p["batch"],
                **kw)
        t.model("mlp", (c * h * w,), fb=n_test * args.bim_steps, fwd=(3 * n_test + n_train), kind="attack", **kw)
    return t


def cost_spheres(args):
    t = Tally()
    for name, p in exp_spheres.planned_runs(args):
        if p["artifact"] == "fig8":
            kw = dict(norm=p["norm"], in_dim=args.dim, hidden=(args.width,) * 2, num_classes=2)
            t.train("mlp", (args.dim,), 2 * args.n_train, args.epochs, 1, batch=args.batch_size, **kw)
            t.model("mlp", (args.dim,), fwd=2 * args.n_train + 2 * args.n_test, **kw)
    return t


SCRIPTS = {"exp_table1.py": (exp_table1, cost_table1), "exp_corruption.py": (exp_corruption, cost_corruption),
           "exp_transfer.py": (exp_transfer, cost_transfer), "exp_ligs_trend.py": (exp_ligs_trend, cost_ligs_trend),
           "exp_feature_datasets.py": (exp_feature_datasets, cost_feature_datasets),
           "exp_landscape.py": (exp_landscape, cost_landscape), "exp_input_dim.py": (exp_input_dim, cost_input_dim),
           "exp_depth_batch.py": (exp_depth_batch, cost_depth_batch), "exp_spheres.py": (exp_spheres, cost_spheres)}


def measured_tflops(path, precision="fp32"):
    """The median achieved TFLOP/s of a training step over the models that gpu_check.py measured (its
    throughput.json), in float32 or bf16: the sustained rate that replaces the assumed one."""
    rows = json.loads(pathlib.Path(path).read_text())["models"]
    rates = sorted(r[f"train_tflops_{precision}"] for r in rows if f"train_tflops_{precision}" in r)
    if not rates:
        raise SystemExit(f"error: {path} holds no {precision} training throughput (gpu_check.py on a GPU writes it)")
    return rates[len(rates) // 2], json.loads(pathlib.Path(path).read_text())["name"]


def table(tflops=98.9, step_ms=1.0, source=None):
    """The README's cost table (markdown) at the paper preset of every artifact."""
    rows, total = [], 0.0
    for script, (mod, fn) in SCRIPTS.items():
        for art in mod.ARTIFACTS:
            args = mod.get_args(["--preset", "paper", "--artifact", art])
            if script == "exp_transfer.py" and args.artifact == "p1_t3":
                args.norm = args.norm or list(common.NORMS)
            t = fn(args)
            hours = max(t.flops / (tflops * 1e12), t.steps * step_ms / 1000) / 3600
            total += hours
            p = t.passes
            rows.append(f"| {script} | {art} | {t.runs} | {t.epochs:,} | {t.steps:.3g} | {p['train']:.3g} | "
                        f"{p['attack']:.3g} | {p['extract']:.3g} | {p['fwd']:.3g} | {t.flops:.3g} | {hours:,.1f} |")
    head = ["| script | artifact | training runs | epochs (all runs) | optimizer steps | training passes | "
            "attack/LIGS/probe passes | extraction passes | forward-only passes | FLOPs | H100 GPU-hours |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    how = f"measured by gpu_check.py on {source}" if source else "assumed, not measured"
    foot = (f"\nTotal: {total:,.0f} GPU-hours on one H100 at {tflops:.3g} TFLOP/s sustained and >= {step_ms:g} ms per "
            f"optimizer step ({how}; `python cost_table.py --write` regenerates this table).")
    return "\n".join(head + rows) + "\n" + foot + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tflops", type=float, default=98.9, help="sustained TFLOP/s of one H100 (default 10%% of 989)")
    p.add_argument("--step-ms", type=float, default=1.0, help="least time of one optimizer step, ms")
    p.add_argument("--measured", metavar="THROUGHPUT_JSON", help="price with the median TFLOP/s that gpu_check.py "
                   "measured (its throughput.json) instead of --tflops")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="with --measured: which measurement")
    p.add_argument("--write", action="store_true", help="write the table into README.md between the markers")
    args = p.parse_args()
    tflops, source = measured_tflops(args.measured, args.precision) if args.measured else (args.tflops, None)
    text = table(tflops, args.step_ms, source)
    print(text)
    if args.write:
        readme = (ROOT / "README.md").read_text()
        pattern = re.compile(re.escape(MARK[0]) + ".*?" + re.escape(MARK[1]), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"error: README.md has no {MARK[0]} ... {MARK[1]} block")
        (ROOT / "README.md").write_text(pattern.sub(lambda m: f"{MARK[0]}\n{text}{MARK[1]}", readme))


if __name__ == "__main__":
    main()
