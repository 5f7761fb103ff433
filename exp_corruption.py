"""Corruption robustness with and without normalization, and BN-statistics adaptation (CIFAR-10-C).

Reproduces P1 Fig 1 (VGG16 x five norms, standard and adversarial training: accuracy per corruption),
P1 Table 7 (BN models before and after re-estimating the BN statistics on each corrupted set, App. F)
and P2 Table 4 with its Sec. 3 prose (VGG8, VGG13, WRN-28-10 Fixup vs BN: noise corruptions per
severity, mCE, per-corruption gaps). Corrupted images are the released CIFAR-10-C files when they are
under --data-root (or fetched with --download), otherwise made by common.corrupt, a batched port of
Hendrycks & Dietterich's generator (motion blur and snow approximated; frost needs --frost-dir).

    python exp_corruption.py --preset quick --artifact fig1   # bundled digits, CPU, ~5 min per artifact
    python exp_corruption.py --artifact t7 --device cuda      # P1 Table 7 (CIFAR-10 and CIFAR-10-C under data/)
    python exp_corruption.py --compare-released               # generator vs the released files, per severity
    python exp_corruption.py --plot-only runs/exp_corruption/<run>

Corruptions are applied in [0, 1] pixel space; P2's models standardize afterwards (P2 Sec. 3), P1's
inside the model. Models are trained with exp_table1.py's recipes, so --cache shares them (DECISIONS.md D28).
"""
import argparse
import copy
import math
import pathlib
import time

import numpy as np
import torch

from common import (APPROXIMATE, CORRUPTIONS, CORRUPTION_NAMES, DataError, NORMS, Standardize, Sweep, adapt_bn,
                    add_scale_out_flags, build_dataset, cache_path, check_numbers, class_balanced_subset, corrupt,
                    evaluate, fmt_mean_sem, log_to, make_model, mean_sem, merge_runs, parse_with_presets, pick_device,
                    prepare_run_dir, print_config, read_cifar10, read_cifar10c, run_script, save_figure, set_seed, show,
                    train_model, write_claims, write_config, write_text_atomic)

# ================================================================================================
# 1. Artifacts: what each one trains, and the papers' claims it tests
# ================================================================================================

NOISE3 = ["gaussian_noise", "shot_noise", "speckle_noise"]  # the noises P1 Sec. 1 names
CATEGORY = {n: cat for cat, names in CORRUPTIONS.items() for n in names}


def claim(id, paper, text, paper_value, a, b, expect="<", metric="acc_c", per=(), where=None):
    """A claim as data (common.evaluate_claims), on the per-corruption rows of `rows_for_claims`."""
    return dict(id=id, paper=paper, claim=text, paper_value=paper_value, metric=metric, a=a, b=b, expect=expect, per=per,
                where=where or {}, scale=100.0)


STD, ADV = dict(training="standard"), dict(training="adversarial")
MEAN = dict(severity="mean", stats="source")  # accuracy averaged over the five severities, statistics not adapted
FIG1_CLAIMS = [
    claim("fig1_adv_noise", "P1 Fig 1", "Adversarial training raises accuracy under noise", "higher for every norm "
          "(figure only; Ford et al. 2019)", ADV, STD, ">", per=("norm", "corruption"), where=MEAN | dict(corruption=NOISE3)),
    claim("fig1_adv_fog_contrast", "P1 Fig 1", "Adversarial training lowers accuracy under fog and contrast", "lower "
          "(figure only)", ADV, STD, per=("norm", "corruption"), where=MEAN | dict(corruption=["fog", "contrast"])),
    *[claim(f"fig1_{n}_noise", "P1 Fig 1", f"{n.upper()} is less accurate than none under noise (standard training)",
            "none best on noise (figure only)", dict(norm=n), dict(norm="none"), per=("corruption",),
            where=MEAN | STD | dict(corruption=NOISE3)) for n in ("bn", "in", "ln", "gn")],
    *[claim(f"fig1_{n}_fog_contrast", "P1 Fig 1", f"{n.upper()} is more accurate than none under fog and contrast "
            "(standard training)", "normalized better (figure only)", dict(norm=n), dict(norm="none"), ">",
            per=("corruption",), where=MEAN | STD | dict(corruption=["fog", "contrast"])) for n in ("bn", "in", "ln", "gn")],
    *[claim(f"fig1_in_contrast_{n}", "P1 Fig 1", f"IN is unusually robust to contrast: above {n.upper()} (standard "
            "training)", "IN highest on contrast (figure only)", {"norm": "in"}, dict(norm=n), ">",
            where=MEAN | STD | dict(corruption="contrast")) for n in ("none", "bn", "ln", "gn")],
    *[claim(f"fig1_bn_below_{n}", "P1 Sec. 5", f"BN is more vulnerable than {n.upper()} to every corruption (standard "
            "training)", "all corruptions (figure only)", dict(norm="bn"), dict(norm=n), per=("corruption",),
            where=MEAN | STD) for n in ("in", "ln", "gn")],
]
T7_CLAIMS = [claim("t7_adapt", "P1 Table 7", "Re-estimating the BN statistics on each corrupted set raises accuracy",
                   "VGG16 71.9 → 79.4, ResNet18 73.9 → 82.3", dict(stats="adapted"), dict(stats="source"), ">",
                   metric="acc_mean", per=("arch",), where=dict(severity="all"))]
BN, NONE, FIXUP = dict(norm="bn"), dict(norm="none"), dict(norm="fixup")
P2_T4_CLAIMS = [
    *[claim(f"p2t4_noise_cells_{ref}", "P2 Sec. 3", f"BN has higher error than {ref} on every noise corruption at every "
            "severity", "every cell (VGG13 Gaussian gap 26-28 at severities 3-5)", BN, b,
            per=("arch", "corruption", "severity"), where=dict(category="noise", severity=[1, 2, 3, 4, 5], stats="source"))
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
    *[claim(f"p2t4_noise_{ref}", "P2 Table 4", f"BN is less accurate than {ref} under noise (mean over severities)",
            "VGG8 −9.2/−7.5/−5.6/−4.5, VGG13 −20.9/−13.6/−14.1/−11.1, WRN −12.1/−10.7/−8.7/−6.9 (Gaussian/impulse/shot/"
            "speckle)", BN, b, per=("arch", "corruption"), where=MEAN | dict(category="noise"))
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
    *[claim(f"p2t4_mce_{ref}", "P2 Sec. 3", f"BN increases mCE over all corruptions (vs {ref})", "VGG8 +1.9 ± 0.9, VGG13 "
            "+2.0 ± 0.3, WRN +1.6 ± 0.4", BN, b, ">", metric="mce", per=("arch",), where=dict(severity="all", stats="source"))
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
    *[claim(f"p2t4_clean_{ref}", "P2 Table 4", f"BN raises clean accuracy (vs {ref})", "VGG8 +0.8, VGG13 +1.3, WRN +1.3",
            BN, b, ">", metric="acc_clean", per=("arch",), where=dict(severity="all", stats="source"))
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
]
ARTIFACTS = {  # conv: input convention (DECISIONS.md D2); models {dataset: [archs]}; norms; trainings; adapt BN?
    "fig1": dict(title="P1 Fig 1", runs=dict(conv="p1", models={"cifar10": ["vgg16"]}, norms=list(NORMS),
                                             trainings=["standard", "adversarial"], seeds=1, adapt=False),
                 claims=FIG1_CLAIMS),
    "t7": dict(title="P1 Table 7", runs=dict(conv="p1", models={"cifar10": ["vgg16", "resnet18"]}, norms=["bn"],
                                             trainings=["standard"], seeds=1, adapt=True), claims=T7_CLAIMS),
    "p2_t4": dict(title="P2 Table 4", runs=dict(conv="p2", models={"cifar10": ["vgg8", "vgg13", "wrn28_10"]},
                                                norms=["none", "bn", "fixup"], trainings=["standard"], seeds=3, adapt=False),
                  claims=P2_T4_CLAIMS),
}

# ================================================================================================
# 2. Arguments and presets
# ================================================================================================

PRESETS = {
    "paper": dict(dataset=None, arch=None, norm=None, width=1.0, batch_size=128, weight_decay=5e-4, warmup_epochs=0.0,
                  n_eval=None, size=None, gn_groups=None, adv_eps=0.5, adv_steps=7, adv_step_size=0.1, channels=None),
    # The bundled digits at 32x32 with three channels (corruptions are defined on RGB), with exp_table1's quick
    # recipe (batch 16, LR 0.02, 2 warm-up epochs: DECISIONS.md D24); adversarial training at 4x P1's budget.
    "quick": dict(dataset="digits", arch=None, norm=None, width=0.125, epochs=10, lr=0.02, batch_size=16,
                  weight_decay=5e-4, warmup_epochs=2.0, n_eval=None, size=32, gn_groups=2, adv_eps=2.0, adv_steps=3,
                  adv_step_size=2.5 * 2.0 / 3, channels=3),
    "smoke": dict(dataset="synthetic", arch=None, norm=None, width=1 / 16, epochs=3, lr=0.02, batch_size=32,
                  weight_decay=5e-4, warmup_epochs=0.0, n_eval=40, size=None, gn_groups=2, adv_eps=0.5, adv_steps=2,
                  adv_step_size=0.1, channels=None, seeds=1, severities=[1, 5]),
}
# Per artifact, the quick preset's models and seeds (digits; DECISIONS.md D28). p2_t4 keeps P2's fixed LR, under
# which unnormalized VGGs need 30 epochs (measured with 10: 3 of 10 at chance on the test digits, the rest at 36-89 %).
QUICK = {
    "fig1": dict(arch=["vgg11"], seeds=3), "t7": dict(arch=["vgg11", "resnet18"], seeds=5),
    "p2_t4": dict(arch=["vgg8", "vgg11"], seeds=5, norm=["none", "bn"], epochs=30),
}
P1_CIFAR_VGG = dict(epochs=200, lr=0.01, milestones=(100, 150), augment=True)  # as exp_table1.py (DECISIONS.md D1)
P1_RESNET = dict(epochs=350, lr=0.1, milestones=(150, 250), augment=True)      # P1 App. B.1
P2_CIFAR = dict(epochs=150, lr=0.01, milestones=(), augment=True)              # P2 Table 2 protocol (VGG8, WRN)
P2_DEPTH = dict(epochs=350, milestones=(150, 250), augment=True)               # P2 Table 3 protocol (VGG13)
P2_INPUT = {"svhn": ((0.5,) * 3, (0.5,) * 3)}


def resolve(preset, artifact):
    """The values that run for this preset and artifact (shown by --help, saved in config.json)."""
    art = ARTIFACTS.get(artifact, ARTIFACTS["fig1"])["runs"]
    v = dict(seeds=art["seeds"], severities=[1, 2, 3, 4, 5], epochs=None, lr=None) | PRESETS[preset]
    if preset == "quick":
        v |= QUICK.get(artifact, QUICK["fig1"])
    return v


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--artifact", default="fig1", choices=sorted(ARTIFACTS), help="paper figure or table to reproduce")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="paper settings, quick (digits, CPU) or smoke")
    p.add_argument("--dataset", default=None, help="override the dataset: cifar10|digits|synthetic")
    p.add_argument("--arch", nargs="+", default=None, help="override the architectures (e.g. vgg16 resnet18)")
    p.add_argument("--norm", nargs="+", default=None, choices=list(NORMS) + ["fixup"], help="override the norms")
    p.add_argument("--seeds", type=int, help="seeds per model (P2 Table 4: 3 for VGG, 5 for WRN; P1: 1)")
    p.add_argument("--width", type=float, help="channel multiplier (1 = the paper's models)")
    p.add_argument("--epochs", type=int, help="training epochs (None = each model's recipe: P1 VGG 200, ResNet 350; "
                   "P2 150, VGG13 350)")
    p.add_argument("--lr", type=float, help="initial learning rate (None = each model's recipe)")
    p.add_argument("--batch-size", type=int, help="SGD batch size")
    p.add_argument("--weight-decay", type=float, help="L2 weight decay (DECISIONS.md D1)")
    p.add_argument("--warmup-epochs", type=float, help="linear LR warm-up")
    p.add_argument("--adv-eps", type=float, help="adversarial training (fig1): l2 PGD budget in pixels (DECISIONS.md D15)")
    p.add_argument("--adv-steps", type=int, help="adversarial training: PGD steps")
    p.add_argument("--adv-step-size", type=float, help="adversarial training: PGD step size")
    p.add_argument("--n-eval", type=int, help="test images evaluated, class-balanced (None = the whole test set)")
    p.add_argument("--size", type=int, help="resize images to size x size (None = the dataset's own)")
    p.add_argument("--channels", type=int, help="repeat grey images to this many channels (None = the dataset's own)")
    p.add_argument("--gn-groups", type=int, help="GroupNorm groups (None = min(32, channels))")
    p.add_argument("--corruptions", nargs="+", default=list(CORRUPTION_NAMES), choices=list(CORRUPTION_NAMES),
                   help="corruptions to evaluate")
    p.add_argument("--severities", nargs="+", type=int, help="severities to evaluate (1..5)")
    p.add_argument("--source", default="auto", choices=["auto", "released", "generated"], help="corrupted images: the "
                   "released CIFAR-10-C files (auto: when present under --data-root) or common.corrupt")
    p.add_argument("--frost-dir", default=None, help="folder with Hendrycks's frost1.png..frost5.jpg (generated frost; "
                   "without it frost is skipped and said so)")
    p.add_argument("--corruption-seed", type=int, default=0, help="seed of the generated corruptions")
    p.add_argument("--adapt-split", action="store_true", help="t7: adapt the BN statistics on one half of each corrupted "
                   "set and evaluate both columns on the other (default: adapt and evaluate on the whole set)")
    p.add_argument("--compare-released", action="store_true", help="only compare the generator with the released "
                   "CIFAR-10-C files: mean absolute difference per corruption and severity")
    p.add_argument("--data-root", default="data", help="folder holding cifar-10-batches-py/ and CIFAR-10-C/")
    p.add_argument("--download", action="store_true", help="fetch missing CIFAR-10 / CIFAR-10-C (md5-checked; 2.9 GB)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast for training on CUDA")
    p.add_argument("--cache", default=None, help="shared checkpoint cache: reuse a model trained by any script with the "
                   "same dataset, architecture, norm, width, recipe and seed")
    p.add_argument("--out", default=None, help="run directory (default runs/exp_corruption/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, keeping finished models")
    add_scale_out_flags(p, "runs")
    p.add_argument("--plot-only", metavar="RUN_DIR", nargs="+", default=None,
                   help="redraw table.md, claims.md and the figure from the records of RUN_DIR (several: the shards of one "
                   "run, merged)")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    if args.dataset is not None and args.dataset not in ("cifar10", "digits", "synthetic"):
        p.error(f"--dataset {args.dataset!r}: expected cifar10, digits or synthetic")
    check_numbers(p, args, at_least_one=("seeds", "epochs", "batch_size", "adv_steps", "n_eval", "size", "channels",
                                         "gn_groups"),
                  positive=("width", "lr"), non_negative=("weight_decay", "warmup_epochs", "adv_eps", "adv_step_size",
                                                          "corruption_seed"))
    bad = [s for s in args.severities if not 1 <= s <= 5]
    if bad:
        p.error(f"--severities {bad[0]}: expected integers in 1..5")
    if args.frost_dir is not None and not pathlib.Path(args.frost_dir).is_dir():
        p.error(f"--frost-dir {args.frost_dir}: not a folder")
    return args


# ================================================================================================
# 3. Experiment: models (exp_table1.py's recipes), corrupted sets, evaluation
# ================================================================================================

def planned_runs(args):
    """(name, record fields) of every model and seed in a fixed order (the unit of --shard)."""
    return [(f"{a}_{n}_{t}_s{s}", dict(dataset=d, arch=a, norm=n, training=t, seed=s)) for d, a, n, t in plan(args)
            for s in range(args.seeds)]


def plan(args):
    """[(dataset, arch, norm, training)] after the --dataset/--arch/--norm overrides; Fixup only for WRN/ResNet
    and, in P2 Table 4, WRN compared with Fixup rather than with no norm (P2 Sec. 3)."""
    art = ARTIFACTS[args.artifact]["runs"]
    dataset = args.dataset or next(iter(art["models"]))
    out = []
    for arch in args.arch or art["models"][next(iter(art["models"]))]:
        for norm in args.norm or art["norms"]:
            if norm == "fixup" and not arch.startswith(("wrn", "resnet")):
                continue
            if args.artifact == "p2_t4" and not args.norm and arch.startswith("wrn") and norm == "none":
                continue
            out += [(dataset, arch, norm, t) for t in art["trainings"]]
    return out


def recipe(args, dataset, arch, norm, training):
    """exp_table1.py's recipe for this model (the same dict, so the checkpoint-cache key matches), plus
    l2 PGD adversarial training (exp_ligs_trend.py's, DECISIONS.md D15) for fig1's right panel."""
    if ARTIFACTS[args.artifact]["runs"]["conv"] == "p1":
        r = P1_RESNET if arch.startswith("resnet") else P1_CIFAR_VGG
    elif arch == "vgg13":
        r = P2_DEPTH | dict(lr=0.1 if norm == "bn" else 0.01)
    else:
        r = P2_CIFAR
    r = dict(r, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs)
    if args.epochs is not None:
        scale = args.epochs / r["epochs"]
        r |= dict(epochs=args.epochs, milestones=tuple(max(1, round(m * scale)) for m in r["milestones"]))
    if args.lr is not None:
        r["lr"] = args.lr
    if dataset in ("digits", "synthetic"):
        r["augment"] = False
    if training == "adversarial":
        r["adv"] = dict(kind="pgd", norm="l2", eps=args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size,
                        clip=(0.0, 1.0))
    return r


def model_kwargs(args, data, arch, norm):
    kw = dict(norm=norm, width=args.width, num_classes=data.num_classes, in_channels=data.shape[0])
    if args.gn_groups:
        kw["gn_groups"] = args.gn_groups
    if arch.startswith("wrn"):
        kw.pop("width")
        kw.pop("gn_groups", None)
        if norm == "fixup":
            kw["final_bn"] = True  # P2 footnote 7
    return kw


def eval_subset(args, data):
    idx = torch.arange(len(data.y_test))
    if args.n_eval and args.n_eval < len(idx):
        idx = class_balanced_subset(data.y_test.cpu(), max(1, args.n_eval // data.num_classes))
    return idx


class CorruptedSets:
    """The corrupted test images, (name, severity) -> uint8 (N, C, H, W) on the CPU: slices of the released
    CIFAR-10-C files (memory-mapped) or generated once by common.corrupt on `device` and kept."""

    def __init__(self, args, data, idx, device):
        self.args, self.idx, self.device, self.cache = args, idx, device, {}
        self.x = data.x_test[idx.to(data.x_test.device)]
        self.released = None
        has = (pathlib.Path(args.data_root) / "CIFAR-10-C" / "labels.npy").exists()
        if data.name == "cifar10" and (args.source == "released" or (args.source == "auto" and (has or args.download))):
            self.labels = read_cifar10(args.data_root)["y_test"]
            self.released = {n: read_cifar10c(args.data_root, n, self.labels, args.download) for n in args.corruptions}
        elif args.source == "released":
            raise DataError("--source released: the CIFAR-10-C files exist for --dataset cifar10 only")
        self.skipped = {}
        if self.released is None and "frost" in args.corruptions and args.frost_dir is None:
            self.skipped["frost"] = "generated frost needs Hendrycks's frost pictures (--frost-dir)"
        self.names = [n for n in args.corruptions if n not in self.skipped]
        self.kind = "released CIFAR-10-C" if self.released is not None else "generated (common.corrupt)"

    def get(self, name, s):
        if (name, s) not in self.cache:
            if self.released is not None:
                n = len(self.labels)
                a = np.asarray(self.released[name][(s - 1) * n + self.idx.numpy()])
                self.cache[(name, s)] = torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
            else:
                k = CORRUPTION_NAMES.index(name) * 5 + s - 1  # one reproducible stream per (corruption, severity)
                g = torch.Generator().manual_seed(self.args.corruption_seed * 1000 + k)
                self.cache[(name, s)] = torch.cat([corrupt(xb.to(self.device), name, s, g, self.args.frost_dir).cpu()
                                                   for xb in self.x.split(1000)])
        return self.cache[(name, s)]


def evaluate_corruptions(args, model, input_fn, sets, y, adapt, log):
    """Accuracy per (corruption, severity): acc_<name>_s<k>, and with `adapt` also ada_<name>_s<k> after
    adapt_bn on that set (transductive: the same images, DECISIONS.md D28; --adapt-split: adapt on one
    half, both columns on the other half)."""
    out = {}
    dev = y.device
    half = torch.arange(len(y)) % 2 == 0  # adaptation half (--adapt-split)
    for name in sets.names:
        for s in args.severities:
            x = input_fn(sets.get(name, s).to(dev).float() / 255)
            xe, ye = (x[~half], y[~half.to(dev)]) if adapt and args.adapt_split else (x, y)
            out[f"acc_{name}_s{s}"] = evaluate(model, xe, ye, dict(c=dict(kind="clean")))["c"]
            if adapt:
                m = adapt_bn(copy.deepcopy(model), x[half.to(dev)] if args.adapt_split else x, batch_size=args.batch_size)
                out[f"ada_{name}_s{s}"] = evaluate(m, xe, ye, dict(c=dict(kind="clean")))["c"]
        log(f"  {name}: " + " ".join(f"{100 * out[f'acc_{name}_s{s}']:.1f}" for s in args.severities) +
            (" | adapted " + " ".join(f"{100 * out[f'ada_{name}_s{s}']:.1f}" for s in args.severities) if adapt else ""))
    return out


def run_one(args, data, sets, dataset, arch, norm, training, seed, device, ckpt, log):
    conv = ARTIFACTS[args.artifact]["runs"]["conv"]
    set_seed(seed)
    kw = model_kwargs(args, data, arch, norm)
    mean, std = P2_INPUT.get(dataset, (data.mean, data.std))
    if conv == "p1":
        model, input_fn = make_model(arch, mean=data.mean, std=data.std, **kw).to(device), None
    else:
        model, input_fn = make_model(arch, **kw).to(device), Standardize(mean, std).to(device)
    model = model.to(memory_format=torch.channels_last)
    r = recipe(args, dataset, arch, norm, training)
    key = dict(dataset=dataset, size=args.size, arch=arch, model=kw, recipe=r, seed=seed, amp=args.amp,
               input=dict(conv=conv, mean=mean, std=std))  # exp_table1.py's key: a model trained there is reused
    if args.channels:
        key["channels"] = args.channels
    tag = f"[{dataset} {arch} {norm} {training} s{seed}]"
    t0 = time.time()
    res = train_model(model, data, r | dict(input_fn=input_fn), seed=seed, ckpt=cache_path(args.cache, key) or ckpt,
                      log=log, amp=args.amp, tag=tag, key=key)
    rec = dict(artifact=args.artifact, dataset=dataset, arch=arch, norm=norm, training=training, seed=seed,
               status=res["status"], reason=res["reason"], epochs=r["epochs"], lr=r["lr"])
    if res["status"] != "ok":
        return rec
    to_input = input_fn or (lambda t: t)
    y = data.y_test[sets.idx.to(device)]
    rec["acc_clean"] = evaluate(model, to_input(sets.x.to(device)), y, dict(c=dict(kind="clean")))["c"]
    adapt = ARTIFACTS[args.artifact]["runs"]["adapt"] and norm == "bn"
    rec |= evaluate_corruptions(args, model, to_input, sets, y, adapt, log)
    rec |= dict(n_eval=len(y), time_s=round(time.time() - t0, 1))
    log(f"{tag} clean {100 * rec['acc_clean']:.1f} | mean over corruptions {100 * summary(rec)['acc_mean']:.1f}")
    return rec


def compare_released(args, device):
    """--compare-released: the generator on the CIFAR-10 test images vs the released files, mean absolute
    difference in uint8 levels per corruption and severity (and the share of identical values)."""
    raw = read_cifar10(args.data_root, args.download)
    x = torch.from_numpy(raw["x_test"]).float() / 255
    print(f"{'corruption':20s} " + " ".join(f"{'s' + str(s):>14s}" for s in args.severities))
    out = {}
    for name in args.corruptions:
        if name == "frost" and args.frost_dir is None:
            print(f"{name:20s} skipped: needs --frost-dir")
            continue
        released = read_cifar10c(args.data_root, name, raw["y_test"], args.download)
        cells = []
        for s in args.severities:
            g = torch.Generator().manual_seed(args.corruption_seed * 1000 + CORRUPTION_NAMES.index(name) * 5 + s - 1)
            n = len(x)
            gen = torch.cat([corrupt(xb.to(device), name, s, g, args.frost_dir).cpu() for xb in x.split(1000)])
            rel = torch.from_numpy(np.asarray(released[(s - 1) * n:s * n])).permute(0, 3, 1, 2)
            d = (gen.int() - rel.int()).abs()
            out[f"{name}_s{s}"] = dict(mad=float(d.float().mean()), same=float((d == 0).float().mean()))
            cells.append(f"{out[f'{name}_s{s}']['mad']:6.2f} ({out[f'{name}_s{s}']['same']:4.0%})")
        print(f"{name:20s} " + " ".join(cells) + ("  (approximation)" if name in APPROXIMATE else ""))
    print("mean |generated - released| in uint8 levels (share of identical values). The random corruptions draw "
          "other random numbers than the released files, so only their statistics can agree.")
    return out


# ================================================================================================
# 4. Tables, figures and claims (regenerated from results.json by --plot-only)
# ================================================================================================

def summary(rec):
    """Means over severities and corruptions of one record: acc_<name> (over severities), acc_mean (all
    cells; P1 Table 7), mce (1 - acc_mean: P2's unnormalized mCE), ada_mean (adapted)."""
    out = {}
    for pre in ("acc", "ada"):
        cells = {k: v for k, v in rec.items() if k.startswith(pre + "_") and "_s" in k and k[-1].isdigit()}
        names = dict.fromkeys(k[len(pre) + 1:k.rindex("_s")] for k in cells)
        for n in names:
            out[f"{pre}_{n}"] = float(np.mean([v for k, v in cells.items() if k.startswith(f"{pre}_{n}_s")]))
        if cells:
            out[f"{pre}_mean"] = float(np.mean(list(cells.values())))
    if "acc_mean" in out:
        out["mce"] = 1 - out["acc_mean"]
    return out


def rows_for_claims(records):
    """Long rows for common.evaluate_claims: one per model, corruption and severity (and 'mean' over
    severities), with stats 'source' (the trained BN statistics) or 'adapted'; plus one row per model
    with the means over all corruptions (severity 'all')."""
    rows = []
    for r in records:
        if r["status"] != "ok":
            continue
        base = {k: r[k] for k in ("dataset", "arch", "norm", "training", "seed", "status")}
        sm = summary(r)
        for pre, stats in (("acc", "source"), ("ada", "adapted")):
            if f"{pre}_mean" not in sm:
                continue
            rows.append(base | dict(severity="all", stats=stats, acc_mean=sm[f"{pre}_mean"], mce=1 - sm[f"{pre}_mean"],
                                    acc_clean=r["acc_clean"]))
            for k, v in r.items():
                if k.startswith(pre + "_") and "_s" in k and k[-1].isdigit():
                    name, s = k[len(pre) + 1:k.rindex("_s")], int(k[k.rindex("_s") + 2:])
                    rows.append(base | dict(corruption=name, category=CATEGORY[name], severity=s, stats=stats, acc_c=v))
            for name in dict.fromkeys(k[len(pre) + 1:k.rindex("_s")] for k in r if k.startswith(pre + "_") and "_s" in k):
                rows.append(base | dict(corruption=name, category=CATEGORY[name], severity="mean", stats=stats,
                                        acc_c=sm[f"{pre}_{name}"]))
    return rows


def groups(records):
    out = {}
    for r in records:
        if r["status"] == "ok":
            out.setdefault((r["arch"], r["training"], r["norm"]), []).append(r)
    return out


def short(name):
    return name.replace("_noise", "").replace("_blur", " blur").replace("_transform", "").replace("_compression", "")


def make_table(records, cfg, header):
    g = groups(records)
    ok = [r for r in records if r["status"] == "ok"]
    names = [n for n in CORRUPTION_NAMES if any(f"acc_{n}_s{s}" in r for r in ok for s in range(1, 6))]
    lines = [header, "", f"Corrupted images: {cfg.get('corruption_source', '?')}; severities {cfg['severities']}. "
             "Accuracy (%) mean ± SEM over seeds (n = successful seeds)." +
             (" † = approximate generator (ImageMagick's motion blur re-implemented)." if "generated" in
              cfg.get("corruption_source", "") else "")]
    for cname, why in (cfg.get("skipped_corruptions") or {}).items():
        lines.append(f"Skipped: {cname} ({why}); the means are over the remaining {len(names)} corruptions.")
    lines += ["", "| arch | training | norm | n | clean | " + " | ".join(
        short(n) + ("†" if n in APPROXIMATE and "generated" in cfg.get("corruption_source", "") else "") for n in names) +
        " | mean | mCE |", "|---|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for (a, t, n), rs in g.items():
        sms = [summary(r) for r in rs]
        lines.append(f"| {a} | {t} | {n} | {len(rs)} | {fmt_mean_sem([r['acc_clean'] for r in rs])} | " +
                     " | ".join(fmt_mean_sem([s.get(f"acc_{c}") for s in sms]) for c in names) +
                     f" | {fmt_mean_sem([s.get('acc_mean') for s in sms])} | {fmt_mean_sem([s.get('mce') for s in sms])} |")
    ada = [(k, rs) for k, rs in g.items() if any("ada_mean" in summary(r) for r in rs)]
    if ada:  # P1 Table 7
        lines += ["", "BN statistics adaptation (P1 Table 7): accuracy (%) over all corruptions and severities.", "",
                  "| arch | norm | n | not adapted | adapted | gain |", "|---|---|---|---|---|---|"]
        for (a, t, n), rs in ada:
            s = [summary(r) for r in rs]
            lines.append(f"| {a} | {n} | {len(rs)} | {fmt_mean_sem([x['acc_mean'] for x in s])} | "
                         f"{fmt_mean_sem([x['ada_mean'] for x in s])} | "
                         f"{fmt_mean_sem([x['ada_mean'] - x['acc_mean'] for x in s])} |")
    gaps = []  # P2 Sec. 3: accuracy without BN minus with BN, per corruption
    for (a, t, n), rs in g.items():
        ref = g.get((a, t, "none")) or g.get((a, t, "fixup"))
        if n != "bn" or ref is None:
            continue
        cells = []
        for c in names + ["mean"]:
            m1, s1, n1 = mean_sem([summary(r).get(f"acc_{c}") for r in ref])
            m0, s0, n0 = mean_sem([summary(r).get(f"acc_{c}") for r in rs])
            cells.append(f"{100 * (m1 - m0):+.1f}" + (f" ± {100 * math.hypot(s1, s0):.1f}" if n1 > 1 and n0 > 1 else ""))
        gaps.append(f"| {a} | {t} | {ref[0]['norm']} − bn | " + " | ".join(cells) + " |")
    if gaps:
        lines += ["", "Gap (P2 Sec. 3): accuracy without BN minus with BN, points (SEMs in quadrature).", "",
                  "| arch | training | norms | " + " | ".join(short(n) for n in names) + " | mean |",
                  "|---|---|---|" + "---|" * (len(names) + 1)] + gaps
        noise = [n for n in CORRUPTIONS["noise"] if n in names]
        lines += ["", "Noise corruptions per severity (P2 Table 4's claim is about every cell): accuracy (%).", "",
                  "| arch | norm | corruption | " + " | ".join(f"s{s}" for s in cfg["severities"]) + " |",
                  "|---|---|---|" + "---|" * len(cfg["severities"])]
        for (a, t, n), rs in g.items():
            for c in noise:
                lines.append(f"| {a} | {n} | {short(c)} | " + " | ".join(fmt_mean_sem([r.get(f"acc_{c}_s{s}") for r in rs])
                                                                       for s in cfg["severities"]) + " |")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs:", ""] + [f"- {r['arch']} {r['norm']} {r['training']} seed {r['seed']}: {r['reason']}"
                                             for r in failed]
    return "\n".join(lines) + "\n"


COLORS = dict(none="0.25", bn="C0", **{"in": "C1"}, ln="C2", gn="C3", fixup="C4")


def make_figure(records, path, title):
    """P1 Fig 1's panels: accuracy per corruption (mean over severities), one bar per norm, one panel per
    (architecture, training); with adapted BN statistics also a hatched bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g = groups(records)
    panels = list(dict.fromkeys((a, t) for a, t, _ in g))
    ok = [r for r in records if r["status"] == "ok"]
    names = [n for n in CORRUPTION_NAMES if any(f"acc_{n}_s1" in r or f"acc_{n}_s5" in r for r in ok)]
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(max(8, 0.7 * len(names) + 3), 3.2 * max(1, len(panels))),
                             squeeze=False)
    for ax, (a, t) in zip(axes[:, 0], panels):
        norms = [n for n in list(NORMS) + ["fixup"] if (a, t, n) in g]
        bars = [(n, "acc") for n in norms] + [(n, "ada") for n in norms if any("ada_mean" in summary(r) for r in g[(a, t, n)])]
        w = 0.8 / len(bars)
        for i, (n, pre) in enumerate(bars):
            stats = [mean_sem([summary(r).get(f"{pre}_{c}") for r in g[(a, t, n)]]) for c in ["clean"] + names]
            stats[0] = mean_sem([r["acc_clean"] for r in g[(a, t, n)]])
            ax.bar([j + i * w for j in range(len(names) + 1)], [100 * s[0] for s in stats], w, color=COLORS[n],
                   hatch="//" if pre == "ada" else None, yerr=[100 * s[1] if s[2] > 1 else 0 for s in stats], capsize=1.5,
                   label=n + (" adapted" if pre == "ada" else ""), edgecolor="white" if pre == "ada" else None)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(names) + 1)], ["clean"] + [short(n) for n in names], rotation=45,
                      ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{a}, {t} training", fontsize=10)
        ax.legend(fontsize=7, ncol=len(bars), loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(run_dir, records, cfg, finished=True):
    art, preset = cfg["artifact"], cfg["preset"]
    datasets = ", ".join(sorted({r["dataset"] for r in records})) or cfg.get("dataset") or "?"
    header = f"# {ARTIFACTS[art]['title']} ({art}, preset {preset}, {datasets})"
    if not finished:  # say so wherever the numbers are shown
        header += (f"\n\n**Interrupted run: {len(records)} models recorded.** `--resume --out {run_dir}` continues it "
                   "with the saved configuration.")
    write_text_atomic(run_dir / "table.md", make_table(records, cfg, header))
    make_figure(records, run_dir / "figure.png", header[2:].split("\n")[0] + " | accuracy per corruption, mean over "
                "severities; error bars: SEM over seeds" + ("" if finished else " (interrupted run)"))
    write_claims(run_dir, ARTIFACTS[art]["claims"], rows_for_claims(records),
                 "# Claims: " + header[2:])


# ================================================================================================
# 5. Main: data -> corrupted sets -> per model: train (or reuse) -> evaluate -> save -> tables
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, missing = merge_runs(args.plot_only, "exp_corruption.py", planned_runs)
        write_outputs(run_dir, records, cfg, not missing)
        print(f"redrew {run_dir / 'table.md'}, claims.md and {run_dir / 'figure.png'}")
        return
    device = pick_device(args.device)
    if args.compare_released:
        compare_released(args, device)
        return
    todo = plan(args)
    dataset = todo[0][0] if todo else (args.dataset or "cifar10")
    data = build_dataset(dataset, args.data_root, device, args.download, size=args.size, channels=args.channels,
                         n_train=1000 if dataset == "synthetic" else None, seed=0)
    if data.shape[0] != 3:
        raise DataError(f"--dataset {dataset}: corruptions need RGB images, got {data.shape[0]} channel(s); pass "
                        f"--channels 3")
    for _, arch, norm, _ in todo:
        with torch.device("meta"):  # a wrong architecture or norm fails here, before anything is written
            make_model(arch, **model_kwargs(args, data, arch, norm))
    idx = eval_subset(args, data)
    sets = CorruptedSets(args, data, idx, device)
    run_dir = prepare_run_dir("exp_corruption", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    print(f"run directory: {run_dir} | device: {device} | artifact: {ARTIFACTS[args.artifact]['title']} | "
          f"{dataset}: train {tuple(data.x_train.shape)}, evaluated {len(idx)} test images")
    print(f"corruptions: {sets.kind}; {len(sets.names)} of {len(args.corruptions)} evaluated" +
          "".join(f"; skipped {k}: {v}" for k, v in sets.skipped.items()))
    args.corruption_source, args.skipped_corruptions = sets.kind, sets.skipped
    args.recipes = {f"{d} {a} {n} {t}": recipe(args, d, a, n, t) for d, a, n, t in todo}
    write_config(run_dir, args, __file__, device)
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    todo = sweep.todo()
    t0 = time.time()
    for k, (_, name, m) in enumerate(todo):
        ckpt = run_dir / "ckpt" / f"{name}.pt"
        rec = run_one(args, data, sets, m["dataset"], m["arch"], m["norm"], m["training"], m["seed"], device, ckpt, print)
        sweep.save(name, [rec])  # every finished model is kept
        print(f"model {k + 1} of {len(todo)} done here ({len(sweep.runs)} in the run) | {time.time() - t0:.0f}s | ETA "
              f"{(time.time() - t0) / (k + 1) * (len(todo) - k - 1):.0f}s")
    records = sweep.records()
    write_outputs(run_dir, records, vars(args), not sweep.missing())
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir}/results.json, results.csv, table.md, claims.md, figure.png" + sweep.report())


if __name__ == "__main__":
    run_script(main, get_args)
