"""White-box robustness of CNNs with and without normalization.

Reproduces P1 Tables 1, 2, 8 and P2 Tables 1, 2 (= Table 9), 3, 8 and P2 App. A.2 (PGD vs BIM; longer PGD):
train each (dataset, arch, norm, seed), then measure clean, Gaussian-noise and adversarial
accuracy. The papers' claim: normalization keeps or raises clean accuracy and lowers robust accuracy. Beside the
papers' budgets, each model's median minimal PGD budget (budget-free) and, with --attacks strong, the worst case of
PGD, APGD-CE and APGD-DLR (DECISIONS.md D34).

Quick results (update_readme.py writes this from results/quick/):
    python exp_table1.py --preset quick
        19 held / 4 reversed / 36 inconclusive / 3 underpowered
        P1 Table 1: BN lowers CW-ℓ2 accuracy: -40.5 [-52.9, -28.1] (held)

Run it:
    python exp_table1.py --preset quick                    # bundled digits, CPU, ~30 min on one core (README table)
    python exp_table1.py --artifact p1_t1 --data-root data  # P1 Table 1 (CIFAR-10 + SVHN; --download fetches them)
    python exp_table1.py --artifact p2_t1 --device cuda     # P2 Table 1 (VGG8 on SVHN, 5 seeds)
    python exp_table1.py --plot-only runs/exp_table1/<run> # redraw table.md, claims.md, figure

Two input spaces (DECISIONS.md D2): P1 artifacts attack [0,1] pixels (the model standardizes
inside); P2 artifacts attack standardized inputs with the papers' clip ranges. P2 Table 5 and P1 Table 1's ImageNet
block evaluate torchvision's released weights in this project's models on ImageNet's validation set, streamed from
local files (--imagenet-root, --weights-dir; no torchvision); P1's ImageNet ResNets are trained here (He et al.'s
recipe, DECISIONS.md D36). P2 Table 2 selected the epoch with the best *test*
accuracy: both the final and that epoch are measured and labelled, its claims use the selected one (DECISIONS.md D18).
"""
import argparse
import copy
import functools
import math
import textwrap
import time

import torch
import torch.nn.functional as F

from common import (DATASETS, DataError, IMAGENET_MEAN, IMAGENET_STD, ImageNetFolder, NORMS, P2_INPUT, Standardize, Sweep,
                    TV_WEIGHT_FILES, accuracy, add_run_flags, arch_seeds_arg, build_dataset, cache_path, check_attack,
                    check_numbers, claim, class_balanced_subset, curve_area, eval_mode, evaluate, fetch_tv_weights,
                    fmt_mean_sem, imagenet_loader, load_tv_weights, log_to, make_model, make_parser, mean_sem, merge_runs,
                    min_eps_summary, minimal_eps, model_in_space, model_key, model_kwargs, paper_recipe, parse_with_presets,
                    pgd, pick_device, prepare_run_dir, print_config, read_cifar101, run_attack, run_script, save_figure,
                    set_seed, show, single_process, train_model, tv_weights_path, with_overrides, worker_errors, write_claims,
                    write_config, write_text_atomic, HE_IMAGENET, train_stream)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

P1_MODELS = {"cifar10": ["vgg11", "vgg16", "resnet50"], "svhn": ["vgg11", "vgg16"]}
PIXELS, STANDARDIZED = dict(space="pixels"), dict(space="standardized")  # the input space of each artifact (DECISIONS.md D2)
ARTIFACTS = {  # name -> title, runs (input space, {dataset: [archs]}, norms, seeds, seed tries)
    "p1_t1": dict(title="P1 Table 1", runs=PIXELS | dict(models=P1_MODELS, norms=["none", "bn"], seeds=1)),
    "p1_t2": dict(title="P1 Table 2", runs=PIXELS | dict(models=P1_MODELS, norms=list(NORMS), seeds=1)),
    "p1_t8": dict(title="P1 Table 8",
                  runs=PIXELS | dict(models={"cifar10": P1_MODELS["cifar10"]}, norms=["none", "bn"], seeds=1)),
    "p2_t1": dict(title="P2 Table 1", runs=STANDARDIZED | dict(models={"svhn": ["vgg8"]}, norms=["none", "bn"], seeds=5)),
    # P2 App. A.3: "We train WideResNets (WRN) with five unique seeds"; the VGGs of Table 2 have three
    "p2_t2": dict(title="P2 Tables 2 and 9",
                  runs=STANDARDIZED | dict(models={"cifar10": ["vgg8", "wrn28_10"]}, norms=["none", "bn", "fixup"], seeds=3,
                                           arch_seeds={"wrn28_10": 5}, select="best_test")),  # "the best model in
    # terms of test accuracy" (P2 Sec. 3): both the final and the selected epoch are measured, claims on the selected
    "p2_t3": dict(title="P2 Table 3",
                  runs=STANDARDIZED | dict(models={"cifar10": ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]},
                                           norms=["none", "bn"], seeds=3, max_tries=10)),
    # P2 Table 8 trains BN models only; its claim (no deeper VGG-BN is much more robust than VGG8-BN, P2 Table 1)
    # compares with another artifact's runs, so it has no claim of its own here.
    "p2_t8": dict(title="P2 Table 8",
                  runs=STANDARDIZED | dict(models={"svhn": ["vgg11", "vgg13", "vgg16", "vgg19"]}, norms=["bn"], seeds=5)),
    "p2_pgd_vs_bim": dict(title="P2 App. A.2",
                          runs=STANDARDIZED | dict(models={"svhn": ["vgg8"]}, norms=["none", "bn"], seeds=5)),
    # P2 App. A.2's second comparison: "For VGG16 on CIFAR-10, using 40 iterations of PGD with a step size of eps/20,
    # instead of 20 iterations with eps/10, reduced accuracy from 28.9 +- 0.2 % to 28.5 +- 0.3 %". 28.9 +- 0.2 is
    # P2 Table 3's VGG16 *with* BN, so these are Table 3's BN models (its recipe: a --cache hit for p2_t3).
    "p2_pgd_steps": dict(title="P2 App. A.2: PGD 40 x eps/20 vs 20 x eps/10 (VGG16-BN, CIFAR-10)",
                         runs=STANDARDIZED | dict(models={"cifar10": ["vgg16"]}, norms=["bn"], seeds=3)),
}
ARTIFACTS["p2_t9"] = ARTIFACTS["p2_t2"]
# ImageNet from local files (--imagenet-root, --weights-dir; no torchvision). P2 Table 5: torchvision's released
# VGG11-19 +-BN, AlexNet, DenseNet121 and ResNet18, top-1 and top-5, its budgets (noise N(0, 1/4), PGD-linf 0.01 in 20
# steps of 0.001, clip [-2, 2], standardized). P1 Table 1's ImageNet block: torchvision's VGG16/19 +-BN, and ResNet18/50
# with and without BN trained here with He et al.'s recipe (P1 App. B.1), P1's budgets in [0,1] pixels.
IMAGENET_VGGS = ["vgg11", "vgg13", "vgg16", "vgg19"]
ARTIFACTS["p2_t5"] = dict(title="P2 Table 5: torchvision's ImageNet models (VGGs +-BN, AlexNet, DenseNet121, ResNet18)",
                          runs=STANDARDIZED | dict(models={"imagenet": IMAGENET_VGGS + ["alexnet", "densenet121", "resnet18"]},
                                                   norms=["none", "bn"], seeds=1, imagenet=True,
                                                   budgets=dict(eps_linf=0.01)))
ARTIFACTS["p1_t1_imagenet"] = dict(title="P1 Table 1: ImageNet (torchvision's VGG16/19; ResNet18/50 trained here)",
                                   runs=PIXELS | dict(models={"imagenet": ["vgg16", "vgg19", "resnet18", "resnet50"]},
                                                      norms=["none", "bn"], seeds=1, imagenet=True,
                                                      train=["resnet18", "resnet50"]))
# P1 App. B.1 trains its ImageNet ResNets with He et al.'s recipe (common.HE_IMAGENET). A no-norm ResNet may diverge
# at LR 0.1: it is then retrained with a 5-epoch warm-up and the gradient norm clipped at 5, and the record says so
# (`fallback`).
NO_NORM_FALLBACK = dict(warmup_epochs=5.0, clip=5.0)


def tv_name(arch, norm):
    """torchvision's name of the released ImageNet weights of (arch, norm): vgg16 / vgg16_bn, alexnet (no BN),
    densenet121 and resnet18/50 (with BN); None where torchvision releases none (a ResNet without BN)."""
    if arch.startswith("vgg"):
        return arch + ("_bn" if norm == "bn" else "")
    return arch if (norm == "none") == (arch == "alexnet") else None
SKIPPED = {}

PRESETS = {  # the paper's values; attack budgets by convention in resolve()
    "paper": dict(dataset=None, arch=None, norm=None, width=1.0, batch_size=128, weight_decay=5e-4, warmup_epochs=0.0,
                  n_eval=None, attack_steps=20, size=None, gn_groups=None),
    # The bundled UCI digits on CPU, ~20 min on 2 cores as two shards. Decided by DECISIONS.md D35's rules on
    # unnormalized pilot seeds 100-102 only (results/pilots/), before the reported seeds 0-4 were trained: a
    # learning rate per architecture (VGG11 0.005, ResNet18 0.02: the lowest eval-mode training loss of the pilots),
    # budgets at which the unnormalized pilots keep about half their accuracy (l2 1.1, linf and FGSM 22/255),
    # minimal budgets over 4x the budget, and the worst case of PGD and 20-step APGD-CE/DLR beside PGD. From D24:
    # batch 16, 2 warm-up epochs, VGG at 32x32 (at 16x16 its last convs are 1x1, where IN outputs a constant),
    # ResNets at 16x16, gn_groups=2 (GN distinct from IN at these widths), 10 attack steps (P1 App. B.2), 200
    # class-balanced test digits, 5 seeds.
    "quick": dict(dataset="digits", arch=["vgg11", "resnet18"], norm=list(NORMS), seeds=5, width=0.125, epochs=10, lr=0.02,
                  arch_lr={"vgg11": 0.005, "resnet18": 0.02}, batch_size=16, weight_decay=5e-4, warmup_epochs=2.0,
                  n_eval=200, attack_steps=10, size=None, gn_groups=2, eps_l2=1.1, eps_linf=22 / 255, eps_fgsm=22 / 255,
                  min_eps_range=4.0, min_eps_iters=6, attacks="strong", apgd_steps=20),
    "smoke": dict(dataset="synthetic", arch=["vgg8", "resnet18"], norm=list(NORMS), seeds=1, width=1 / 16, epochs=3, lr=0.02,
                  batch_size=32, weight_decay=5e-4, warmup_epochs=0.0, n_eval=100, attack_steps=3, size=None, gn_groups=2,
                  eps_l2=1.0, eps_linf=4 / 255, eps_fgsm=16 / 255, min_eps_iters=3, min_eps_n=30, apgd_steps=5),
}


P1_BUDGETS = dict(eps_l2=0.25, eps_linf=1 / 255, eps_fgsm=4 / 255, noise_std=0.5)  # P1 App. B.2, App. G; pixels
P2_BUDGETS = dict(eps_l2=0.03 * math.sqrt(3072), eps_linf=0.03, eps_fgsm=0.03, noise_std=0.5)  # P2 Sec. 3: eps2 = eps*sqrt(d)


def resolve(preset, artifact):
    """The values that run for this preset and artifact (shown by --help, saved in config.json)."""
    art = ARTIFACTS.get(artifact, ARTIFACTS["p1_t1"])["runs"]
    budgets = (P1_BUDGETS if art["space"] == "pixels" else P2_BUDGETS) | art.get("budgets", {})
    v = budgets | dict(seeds=art["seeds"], max_seed_tries=None, arch_seeds=art.get("arch_seeds", {}), arch_lr={},
                       select=art.get("select", "final")) | PRESETS[preset]
    if art.get("imagenet"):  # the artifact's own models whatever the preset
        v |= dict(dataset=None, arch=None, norm=None, seeds=1)
        if preset == "paper":
            v |= dict(batch_size=HE_IMAGENET["batch_size"], weight_decay=HE_IMAGENET["weight_decay"])
    return v


def seeds_for(args, arch):
    """Successful seeds wanted for `arch` and seeds tried before giving up: --arch-seeds, else --seeds (P2 trains
    its WRNs with five seeds and its VGGs with three)."""
    n = args.arch_seeds.get(arch, args.seeds)
    return n, max(n, args.max_seed_tries)


# ================================================================================================
# 2. Experiment
# ================================================================================================

def plan(args):
    """[(dataset, arch, norm)] for this run, after --dataset/--arch/--norm overrides."""
    art = ARTIFACTS[args.artifact]["runs"]
    models = {args.dataset: args.arch or sum(art["models"].values(), [])} if args.dataset else \
        {d: args.arch or a for d, a in art["models"].items()}
    norms = args.norm or art["norms"]
    return [(d, a, n) for d, archs in models.items() for a in archs for n in norms
            if (n != "fixup" or a.startswith(("resnet", "wrn"))) and  # ImageNet: a model trained here or released
            (not art.get("imagenet") or a in art.get("train", ()) or tv_name(a, n))]


def planned_runs(args):
    """(name, record fields) of every model in a fixed order, the unit of --shard: one model's seeds (with their
    retries, P2 Sec. 3) run in one process, as without shards."""
    return [(f"{d}_{a}_{n}", dict(dataset=d, arch=a, norm=n)) for d, a, n in plan(args)]


def input_size(args, dataset, arch):
    """--size, else the dataset's own size; the 8x8 digits and synthetic images are upscaled to 32x32
    for VGG (five 2x2 pools) and 16x16 for the ResNets."""
    if args.size or dataset not in ("digits", "synthetic"):
        return args.size
    return 32 if arch.startswith("vgg") else 16


def recipe(args, dataset, arch, norm):
    """The paper's training recipe for this model (common.RECIPES: P1 App. B.1, P2 Sec. 3), with flag overrides.
    P1: ResNet50's recipe (App. B.1) for every ResNet, as exp_corruption.py (so --cache shares them), VGG's for the
    VGGs; P2 Table 3: the depth protocol."""
    if args.artifact.startswith("p1"):
        name = "p1_resnet" if arch.startswith("resnet") else "p1_svhn_vgg" if dataset == "svhn" else "p1_cifar_vgg"
    else:
        name = "p2_depth" if args.artifact in ("p2_t3", "p2_pgd_steps") else "p2_svhn" if dataset == "svhn" else "p2_cifar"
    r = with_overrides(paper_recipe(name, norm), args, dataset)
    if arch in args.arch_lr:  # the quick preset's LR per architecture (DECISIONS.md D35)
        r["lr"] = args.arch_lr[arch]
    if args.select == "best_test":  # (a key only when set: the cache keys of final-epoch models are unchanged)
        r["select"] = "best_test"
    return r


def attack_suite(args, space, dataset, std):
    """{name: spec} of the artifact's measurements (P1 App. B.2, App. G; P2 Sec. 3, App. A.2). `std` is
    the per-channel std, used to express the noise (std in standardized units) in P1's pixel space. Step sizes:
    P1 2.5*eps/steps (MadryLab, the pgd default); P2 eps/--step-div (10), BIM eps/--bim-step-div (20); P2 App. A.2's
    longer PGD: twice the steps at half the step."""
    k = args.attack_steps
    if space == "pixels":
        clip, l2, linf = (0.0, 1.0), args.eps_l2, args.eps_linf
        sigma = args.noise_std * torch.tensor(std).view(1, -1, 1, 1)
        return dict(clean=dict(kind="clean"), noise=dict(kind="noise", sigma=sigma),
                    pgd_l2=dict(kind="pgd", norm="l2", eps=l2, steps=k, clip=clip),
                    pgd_linf=dict(kind="pgd", norm="linf", eps=linf, steps=k, clip=clip),
                    cw_l2=dict(kind="pgd", norm="l2", loss="cw", eps=l2, steps=k, clip=clip),
                    cw_linf=dict(kind="pgd", norm="linf", loss="cw", eps=linf, steps=k, clip=clip),
                    fgsm=dict(kind="fgsm", eps=args.eps_fgsm, clip=clip))
    clip = {"svhn": (-1.0, 1.0), "cifar10": (-2.0, 2.0)}.get(dataset)  # P2's clip ranges; none for MNIST
    linf, l2 = args.eps_linf, args.eps_l2
    specs = dict(clean=dict(kind="clean"), noise=dict(kind="noise", sigma=args.noise_std),
                 pgd_linf=dict(kind="pgd", norm="linf", eps=linf, steps=k, step_size=linf / args.step_div, clip=clip),
                 pgd_l2=dict(kind="pgd", norm="l2", eps=l2, steps=k, step_size=l2 / args.step_div, clip=clip))
    if args.artifact == "p2_pgd_vs_bim":
        specs["bim"] = dict(kind="bim", eps=linf, steps=k, step_size=linf / args.bim_step_div, clip=clip)
    if args.artifact == "p2_pgd_steps":
        specs["pgd_linf_long"] = dict(kind="pgd", norm="linf", eps=linf, steps=2 * k, step_size=linf / (2 * args.step_div),
                                      clip=clip)
    return specs


def strong_suite(args, specs):
    """--attacks strong: for PGD-ℓ2 and PGD-ℓ∞, each sample's worst case over the artifact's PGD, APGD-CE and
    APGD-DLR (Croce & Hein 2020; --apgd-steps, AutoAttack's 100) at the same budget, so that a BN-vs-none
    difference can be checked against a stronger attack. Measured beside the standard ones (acc_pgd_*_strong)."""
    out = {}
    for name in ("pgd_l2", "pgd_linf"):
        s = specs[name]
        apgd = dict(kind="apgd", norm=s["norm"], eps=s["eps"], steps=args.apgd_steps, clip=s.get("clip"))
        out[f"{name}_strong"] = dict(kind="worst", attacks=[s, apgd | dict(loss="ce"), apgd | dict(loss="dlr")])
    return out


BUDGET_GRID = (0.25, 0.5, 1, 2, 4, 8, 16)  # the accuracy-vs-eps curve at these multiples of the artifact's budget


def budget_free(args, m, x, y, specs):
    """Robustness without a chosen budget, for PGD-ℓ2 and PGD-ℓ∞ with the artifact's steps and step rule (the step
    scales with the budget): each sample's minimal budget by bisection on [0, --min-eps-range x the budget]
    (common.minimal_eps, --min-eps-iters halvings: resolution range / 2^iters, 1/16 of the budget by default). Keys:
    min_eps_* (median over the samples; samples the attack does not break within the range count as beyond it, so
    the median is exact unless over half of them are censored, when it is the range's end: min_eps_*_censored says
    how many), curve_* (the accuracy they imply at BUDGET_GRID x the budget) and auc_* (its normalised area,
    common.curve_area, over [0, range x budget])."""
    out = {}
    for name in ("pgd_l2", "pgd_linf"):
        s = specs[name]
        eps, key = s["eps"], name[4:]
        if not eps > 0:
            continue
        kw = {k: v for k, v in s.items() if k not in ("kind", "eps", "step_size")}
        ratio = None if s.get("step_size") is None else s["step_size"] / eps  # (P2: eps / --step-div)

        def attack(xb, yb, e, kw=kw, ratio=ratio):
            return pgd(m, xb, yb, e, step_size=None if ratio is None else e * ratio, **kw)

        hi = args.min_eps_range * eps
        d = minimal_eps(m, x, y, attack, hi, iters=args.min_eps_iters)
        out[f"min_eps_{key}"], out[f"min_eps_{key}_censored"] = min_eps_summary(d, hi)
        out[f"curve_{key}"] = [float((d > f * eps).double().mean()) for f in BUDGET_GRID if f * eps <= hi]
        grid = [0.0] + [f * eps for f in BUDGET_GRID if f * eps < hi] + [hi]
        out[f"auc_{key}"] = curve_area(grid, [float((d > e).double().mean()) for e in grid])
    return out


def mean_loss(m, x, y, to_input, batch_size=1000):
    """Mean cross-entropy of model m in eval mode: the quick presets' measure of whether a recipe fits the training set
    (DECISIONS.md D35)."""
    with torch.no_grad(), eval_mode(m):
        total = sum(float(F.cross_entropy(m(to_input(xb)), yb, reduction="sum"))
                    for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return total / len(y)


CHECKED = ("pgd_l2", "pgd_linf", "bim")  # attacks that get the sanity checks of common.check_attack


def run_one(args, data, dataset, arch, norm, seed, device, ckpt, log):
    """Train one model (or take it from --cache) and measure it; returns the record (status 'failed'
    with a reason if training failed)."""
    space = ARTIFACTS[args.artifact]["runs"]["space"]
    set_seed(seed)  # model init
    kw = model_kwargs(arch, norm, data, args.width, args.gn_groups)
    mean, std = (data.mean, data.std) if space == "pixels" else P2_INPUT.get(dataset, (data.mean, data.std))
    model, input_fn = model_in_space(arch, kw, space, mean, std, device)
    r = recipe(args, dataset, arch, norm)
    key = model_key(dataset, input_size(args, dataset, arch), arch, kw, r, seed, args.amp, space, mean, std)
    ckpt = cache_path(args.cache, key) or ckpt
    t0 = time.time()
    res = train_model(model, data, r | dict(input_fn=input_fn), seed=seed, ckpt=ckpt, log=log, amp=args.amp,
                      tag=f"[{dataset} {arch} {norm} s{seed}]", key=key, ddp_bn=args.ddp_bn)
    rec = dict(artifact=args.artifact, dataset=dataset, arch=arch, norm=norm, seed=seed, status=res["status"],
               reason=res["reason"], epochs=r["epochs"], lr=r["lr"], train_acc=res["history"][-1].get("train_acc"))
    if res["status"] != "ok":
        return rec
    idx = torch.arange(len(data.y_test), device=device)
    if args.n_eval and args.n_eval < len(idx):  # a fixed class-balanced subset
        idx = class_balanced_subset(data.y_test, max(1, args.n_eval // data.num_classes))
    x, y = data.x_test[idx], data.y_test[idx]
    x = input_fn(x) if input_fn is not None else x
    specs = attack_suite(args, space, dataset, std)
    for spec in specs.values():
        if torch.is_tensor(spec.get("sigma")):
            spec["sigma"] = spec["sigma"].to(device)
    to_input = input_fn or (lambda t: t)

    strong = strong_suite(args, specs) if args.attacks == "strong" else {}
    sub = class_balanced_subset(y, max(1, args.min_eps_n // data.num_classes)) if args.min_eps_n < len(y) else \
        torch.arange(len(y), device=y.device)  # (the minimal budgets' samples)

    def measure(m, prefix):
        """Every measurement of model m, its keys prefixed: acc_* for the final epoch, sel_acc_* for the selected."""
        accs = evaluate(m, x, y, specs, batch_size=500, seed=seed)
        if strong:
            t1 = time.time()
            accs |= evaluate(m, x, y, strong, batch_size=500, seed=seed)
            log(f"[{dataset} {arch} {norm} s{seed}] --attacks strong: {time.time() - t1:.1f}s")
        if dataset == "cifar10" and args.artifact in ("p2_t2", "p2_t9"):  # CIFAR-10.1: clean and noise (P2 Table 2)
            try:
                x1, y1 = read_cifar101(args.data_root)
                x1 = to_input(torch.from_numpy(x1).to(device).float() / 255.0)
                y1 = torch.from_numpy(y1).to(device)
                c101 = evaluate(m, x1, y1, {k: specs[k] for k in ("clean", "noise")}, batch_size=500, seed=seed)
                accs |= {f"c101_{k}": v for k, v in c101.items()}
            except DataError as e:
                log(f"[{dataset} {arch} {norm} s{seed}] {e}")
        out = {f"{prefix}acc_{k}": v for k, v in accs.items()}
        # P2 Sec. 3's clean generalization gap: training minus test accuracy, both in eval mode (the logged
        # train_acc is the running train-mode accuracy on augmented batches)
        out[f"{prefix}acc_train_eval"] = accuracy(m, data.x_train, data.y_train, input_fn=input_fn)
        out[f"{prefix}gen_gap"] = out[f"{prefix}acc_train_eval"] - out[f"{prefix}acc_clean"]
        out[f"{prefix}loss_train_eval"] = mean_loss(m, data.x_train, data.y_train, to_input)  # how well it was fit
        if args.min_eps_iters:
            out |= {prefix + k: v for k, v in budget_free(args, m, x[sub], y[sub], specs).items()}
        log(f"[{dataset} {arch} {norm} s{seed}] {prefix or 'final '}" + " | ".join(f"{k} {v:.4f}" for k, v in accs.items()))
        return out

    rec |= measure(model, "")
    if res["best"] is not None:  # P2 Table 2 evaluates "the best model in terms of test accuracy": both are reported
        best = copy.deepcopy(model)
        best.load_state_dict(res["best"]["model"])
        rec |= measure(best, "sel_") | dict(sel_epoch=res["best"]["epoch"])
    rec |= dict(n_eval=len(y), time_s=round(time.time() - t0, 1))
    for name in CHECKED:
        if name in specs:
            rec |= {f"chk_{name}_{k}": v for k, v in check_attack(model, x, y, specs[name], seed=seed).items()}
    return rec


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_table1.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        print(f"redrew {run_dir / 'table.md'}, claims.md and {run_dir / 'figure.png'}")
        return
    if ARTIFACTS[args.artifact]["runs"].get("imagenet"):
        return main_imagenet(args)
    device = pick_device(args.device)
    todo = plan(args)
    datasets = {}  # every input is checked before the run directory is created
    for dataset, arch, norm in todo:
        key = (dataset, input_size(args, dataset, arch))
        if key not in datasets:
            datasets[key] = build_dataset(dataset, args.data_root, device, args.download, size=key[1],
                                          n_train=1000 if dataset == "synthetic" else None, seed=0)
        with torch.device("meta"):  # a wrong architecture name or norm fails here, at no cost
            make_model(arch, **model_kwargs(arch, norm, datasets[key], args.width, args.gn_groups))
    run_dir = prepare_run_dir("exp_table1", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    print(f"run directory: {run_dir} | device: {device} | artifact: {ARTIFACTS[args.artifact]['title']}")
    for (dataset, _), d in datasets.items():
        print(f"{dataset}: train {tuple(d.x_train.shape)}, test {tuple(d.x_test.shape)}")
    args.recipes = {f"{d} {a} {n}": recipe(args, d, a, n) for d, a, n in todo}  # the resolved recipe of every model
    write_config(run_dir, args, __file__, device)
    complete = lambda m, recs: (sum(r["status"] == "ok" for r in recs) >= seeds_for(args, m["arch"])[0] or
                                len(recs) >= seeds_for(args, m["arch"])[1])  # (a run directory of an earlier version)
    sweep = Sweep(run_dir, planned_runs(args), args.shard, adopt_complete=complete)
    todo = sweep.todo()
    per_arch = "".join(f", {a}: {n}" for a, n in args.arch_seeds.items())
    print(f"{len(sweep.runs)} models x {args.seeds} seed(s){per_arch} (up to {args.max_seed_tries} tries each); "
          f"{len(todo)} to do here")
    t0 = time.time()
    for k, (_, name, m) in enumerate(todo):
        dataset, arch, norm = m["dataset"], m["arch"], m["norm"]
        data = datasets[(dataset, input_size(args, dataset, arch))]
        records = sweep.previous(name)  # the seeds an interrupted run already finished
        done = {r["seed"] for r in records}
        wanted, tries = seeds_for(args, arch)
        for seed in range(args.first_seed, args.first_seed + tries):
            if sum(r["status"] == "ok" for r in records) >= wanted:
                break
            if seed in done:
                continue
            ckpt = run_dir / "ckpt" / f"{dataset}_{arch}_{norm}_s{seed}.pt"  # unless --cache is given
            records.append(run_one(args, data, dataset, arch, norm, seed, device, ckpt, print))
            sweep.save(name, records, finished=False)  # every finished seed is kept
        sweep.save(name, records)
        n_ok = sum(r["status"] == "ok" for r in records)
        if n_ok < wanted:
            print(f"[{dataset} {arch} {norm}] only {n_ok} of {wanted} seeds trained in {tries} tries")
        print(f"model {k + 1} of {len(todo)} done | {time.time() - t0:.0f}s | ETA "
              f"{(time.time() - t0) / (k + 1) * (len(todo) - k - 1):.0f}s")
    write_outputs(run_dir, sweep.records(), vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir}/results.json, results.csv, table.md, claims.md, figure.png" + sweep.report())


def imagenet_specs(args, space):
    """The ImageNet artifacts' measurements: P1 App. B.2 in [0,1] pixels (PGD and CW, l2 and linf, 2.5*eps/steps);
    P2 Table 5 in standardized units (noise, PGD-linf with step eps/--step-div, clip [-2, 2])."""
    k = args.attack_steps
    if space == "pixels":
        clip = (0.0, 1.0)
        return dict(clean=dict(kind="clean"),
                    pgd_l2=dict(kind="pgd", norm="l2", eps=args.eps_l2, steps=k, clip=clip),
                    pgd_linf=dict(kind="pgd", norm="linf", eps=args.eps_linf, steps=k, clip=clip),
                    cw_l2=dict(kind="pgd", norm="l2", loss="cw", eps=args.eps_l2, steps=k, clip=clip),
                    cw_linf=dict(kind="pgd", norm="linf", loss="cw", eps=args.eps_linf, steps=k, clip=clip))
    return dict(clean=dict(kind="clean"), noise=dict(kind="noise", sigma=args.noise_std),
                pgd_linf=dict(kind="pgd", norm="linf", eps=args.eps_linf, steps=k, step_size=args.eps_linf / args.step_div,
                              clip=(-2.0, 2.0)))


def evaluate_stream(model, loader, specs, to_input, device, seed, tag):
    """Top-1 and top-5 accuracy of every spec, batch by batch from a DataLoader (ImageNet does not fit in memory);
    the noise of batch b is drawn from a generator seeded by (seed, b), so a rerun measures the same."""
    hits = {k: [0, 0] for k in specs}
    n, t0 = 0, time.time()
    for b, (xb, yb) in enumerate(worker_errors(loader)):
        xb, yb = to_input(xb.to(device)), yb.to(device)
        for k, spec in specs.items():
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b)
            xa = run_attack(model, xb, yb, spec, generator=g)
            with torch.no_grad(), eval_mode(model):
                top5 = model(xa).topk(5, dim=1).indices
            hits[k][0] += int((top5[:, 0] == yb).sum())
            hits[k][1] += int((top5 == yb[:, None]).any(1).sum())
        n += len(yb)
        print(f"\r{tag} {n}/{len(loader.dataset)} images, {n / max(time.time() - t0, 1e-9):.1f} images/s", end="", flush=True)
    print()
    return {f"acc_{k}": h[0] / n for k, h in hits.items()} | {f"acc_top5_{k}": h[1] / n for k, h in hits.items()}


def imagenet_recipe(args, fallback=False):
    """He et al.'s ImageNet recipe (HE_IMAGENET) with --epochs (milestones kept at the same fraction), --lr,
    --batch-size, --weight-decay, --warmup-epochs; NO_NORM_FALLBACK on top when `fallback`."""
    r = dict(HE_IMAGENET, batch_size=args.batch_size, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
             clip=None)
    if args.epochs is not None:
        r |= dict(epochs=args.epochs, milestones=tuple(max(1, round(m * args.epochs / r["epochs"])) for m in r["milestones"]))
    if args.lr is not None:
        r["lr"] = args.lr
    return r | (NO_NORM_FALLBACK if fallback else {})


def trained_resnet(args, run_dir, train_set, arch, norm, device):
    """P1 Table 1's ImageNet ResNet (arch, norm), trained here (or resumed, or taken from --cache) on `train_set`; a
    no-norm ResNet that diverges is retrained with NO_NORM_FALLBACK. Returns (model, record fields)."""
    for fallback in (False, True):
        r = imagenet_recipe(args, fallback)
        set_seed(0)  # model init
        model = make_model(f"imagenet_{arch}", norm=norm, num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD).to(device)
        key = model_key("imagenet", args.size or 224, f"imagenet_{arch}", dict(norm=norm), r, 0, args.amp, "pixels",
                        IMAGENET_MEAN, IMAGENET_STD)
        ckpt = cache_path(args.cache, key) or run_dir / "ckpt" / f"imagenet_{arch}_{norm}_s0{'_fallback' * fallback}.pt"
        res = train_stream(model, train_set, r, ckpt=ckpt, key=key, seed=0, workers=args.workers, amp=args.amp,
                           tag=f"[imagenet {arch} {norm}]")
        info = dict(status=res["status"], reason=res["reason"], epochs=r["epochs"], lr=r["lr"], fallback=fallback,
                    train_acc=res["history"][-1].get("train_acc"))
        if res["status"] == "ok" or norm != "none" or fallback or "diverged" not in res["reason"]:
            return model.eval(), info
        print(f"[imagenet {arch} {norm}] diverged at LR {r['lr']}: retraining with a {NO_NORM_FALLBACK['warmup_epochs']:g}-"
              f"epoch warm-up and the gradient norm clipped at {NO_NORM_FALLBACK['clip']:g} (P1 App. B.1's recipe fails)")


def main_imagenet(args):
    """P2 Table 5 and P1 Table 1's ImageNet block: torchvision's released weights in this project's models, and (P1)
    ResNets trained here on --imagenet-root/train, evaluated on (a fixed random subset of, --n-eval) ImageNet's
    validation set streamed from disk."""
    device = pick_device(args.device)
    space, art = ARTIFACTS[args.artifact]["runs"]["space"], ARTIFACTS[args.artifact]["runs"]
    if not args.imagenet_root or not args.weights_dir and any(a not in art.get("train", ()) for _, a, _ in plan(args)):
        raise DataError(f"--artifact {args.artifact}: needs --imagenet-root (ImageNet's val/<wnid>/*.JPEG"
                        f"{' and train/<wnid>/*.JPEG' if art.get('train') else ''}) and --weights-dir (torchvision's "
                        "weight files; --download fetches them)")
    names = {(a, n): tv_name(a, n) for _, a, n in plan(args) if a not in art.get("train", ())}
    if len(names) < len(plan(args)):
        single_process(f"--artifact {args.artifact}'s ResNet training")  # before hours of the VGGs' evaluation
    for name in names.values():  # every input is checked before the run directory is created
        (fetch_tv_weights if args.download else tv_weights_path)(args.weights_dir, name)
    train_set = ImageNetFolder(args.imagenet_root, "train", size=args.size or 224, train=True) \
        if len(names) < len(plan(args)) else None
    val = ImageNetFolder(args.imagenet_root, "val", size=args.size or 224)
    if args.n_eval and args.n_eval < len(val):  # a fixed random subset (seed 0), the same for every model
        val = torch.utils.data.Subset(val, torch.randperm(len(val), generator=torch.Generator().manual_seed(0))
                                      [:args.n_eval].tolist())
    run_dir = prepare_run_dir("exp_table1", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    print(f"run directory: {run_dir} | device: {device} | artifact: {ARTIFACTS[args.artifact]['title']} | "
          f"{len(val)} validation images")
    write_config(run_dir, args, __file__, device)
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    specs = imagenet_specs(args, space)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    to_input = (lambda t: t) if space == "pixels" else Standardize(mean, std).to(device)  # (P2: standardized outside)
    loader = imagenet_loader(val, args.batch_size, workers=args.workers)
    for _, name, m in sweep.todo():
        t0 = time.time()
        arch, norm = m["arch"], m["norm"]
        rec = dict(artifact=args.artifact, dataset="imagenet", arch=arch, norm=norm, seed=0, n_eval=len(val))
        if arch in art.get("train", ()):
            model, info = trained_resnet(args, run_dir, train_set, arch, norm, device)
            rec |= info | dict(weights="trained here")
        else:
            kw = dict(mean=mean, std=std) if space == "pixels" else {}  # (P1: the model standardizes [0,1] pixels inside)
            model = make_model(f"imagenet_{arch}", norm=norm, num_classes=1000, **kw)
            model = load_tv_weights(model, args.weights_dir, names[(arch, norm)]).to(device).eval()
            rec |= dict(status="ok", reason="", weights=TV_WEIGHT_FILES[names[(arch, norm)]])
        if rec["status"] == "ok":
            rec |= evaluate_stream(model, loader, specs, to_input, device, seed=0, tag=f"[imagenet {arch} {norm}]")
        sweep.save(name, [rec | dict(time_s=round(time.time() - t0, 1))])
        print(f"[imagenet {arch} {norm}] " + (" | ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("acc_"))
                                              or f"FAILED: {rec['reason']}"))
    write_outputs(run_dir, sweep.records(), vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir}/results.json, results.csv, table.md, claims.md, figure.png" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

claim_pp = functools.partial(claim, scale=100.0, per=("dataset", "arch"))  # accuracies: effects in percentage points
BN, NONE, FIXUP = dict(norm="bn"), dict(norm="none"), dict(norm="fixup")
NAMES = dict(bn="BN", ln="LN", gn="GN", **{"in": "IN"})
P1_T1_CLAIMS = [
    claim_pp("p1t1_clean", "P1 Table 1", "BN raises clean accuracy", "+1 to +5 points in every row (CIFAR-10 ResNet50 "
          "95.6 vs 92.15)", "acc_clean", BN, NONE, ">", paper_effect=1.0),
    claim_pp("p1t1_pgd_l2", "P1 Table 1", "BN lowers PGD-ℓ2 accuracy", "−5 to −20 points on CIFAR-10/SVHN (ResNet50 9.15 vs "
          "29.24)", "acc_pgd_l2", BN, NONE, paper_effect=-5.0),
    claim_pp("p1t1_pgd_linf", "P1 Table 1", "BN lowers PGD-ℓ∞ accuracy", "−2.5 to −13 points (ResNet50 36.37 vs 49.33)",
          "acc_pgd_linf", BN, NONE, paper_effect=-2.5),
    claim_pp("p1t1_cw_l2", "P1 Table 1", "BN lowers CW-ℓ2 accuracy", "ResNet50 8.72 vs 17.09", "acc_cw_l2", BN, NONE,
          paper_effect=-8.37),
    claim_pp("p1t1_cw_linf", "P1 Table 1", "BN lowers CW-ℓ∞ accuracy", "ResNet50 36.64 vs 49.24", "acc_cw_linf", BN, NONE,
          paper_effect=-12.6),
]
P1_T2_CLAIMS = [claim_pp(f"p1t2_{m}_{n}", "P1 Table 2", f"{NAMES[n]} lowers {label} accuracy", "numbers lost in the paper; "
                      "every norm below none", f"acc_{m}", dict(norm=n), NONE)
                for m, label in (("pgd_l2", "PGD-ℓ2"), ("pgd_linf", "PGD-ℓ∞")) for n in ("in", "ln", "gn")] + [
    claim_pp("p1t2_in_lowest", "P1 Table 2", "IN gives lower PGD-ℓ2 accuracy than BN", "IN lowest everywhere but ResNet50",
          "acc_pgd_l2", {"norm": "in"}, BN)]
P2_T1_CLAIMS = [
    claim_pp("p2t1_clean", "P2 Table 1", "BN raises clean accuracy", "+1.86 ± 0.05", "acc_clean", BN, NONE, ">",
          paper_effect=1.86),
    claim_pp("p2t1_noise", "P2 Table 1", "BN lowers accuracy under Gaussian noise", "−5.5 ± 0.6", "acc_noise", BN, NONE,
          paper_effect=-5.5),
    claim_pp("p2t1_pgd_linf", "P2 Table 1", "BN lowers PGD-ℓ∞ accuracy", "−17 ± 1", "acc_pgd_linf", BN, NONE,
          paper_effect=-17.0),
    claim_pp("p2t1_pgd_l2", "P2 Table 1", "BN lowers PGD-ℓ2 accuracy", "−20 ± 1", "acc_pgd_l2", BN, NONE, paper_effect=-20.0),
]
P2_T2_CLAIMS = [
    claim_pp("p2t2_gen_gap", "P2 Sec. 3", "BN reduces the clean generalization gap (VGG8; train − test accuracy, eval mode)",
             "−1.1 ± 0.2", "gen_gap", BN, NONE, paper_effect=-1.1),
    claim_pp("p2t2_noise", "P2 Table 2", "BN lowers noise accuracy (VGG8)", "−6 ± 1", "acc_noise", BN, NONE,
          paper_effect=-6.0),
    claim_pp("p2t2_pgd_linf", "P2 Table 2", "BN lowers PGD-ℓ∞ accuracy (VGG8)", "−17.3 ± 0.7", "acc_pgd_linf", BN, NONE,
          paper_effect=-17.3),
    claim_pp("p2t2_pgd_l2", "P2 Table 2", "BN lowers PGD-ℓ2 accuracy (VGG8)", "−5.9 ± 0.4", "acc_pgd_l2", BN, NONE,
          paper_effect=-5.9),
    claim_pp("p2t2_c101_clean", "P2 Table 2", "BN raises CIFAR-10.1 clean accuracy (VGG8)", "+2.0 ± 0.3", "acc_c101_clean", BN,
          NONE, ">", paper_effect=2.0),
    claim_pp("p2t2_c101_noise", "P2 Table 2", "BN lowers CIFAR-10.1 noise accuracy (VGG8)", "−6 ± 1", "acc_c101_noise", BN,
          NONE, paper_effect=-6.0),
    claim_pp("p2t9_noise", "P2 Tables 2, 9", "Fixup beats BN under noise (WRN-28-10)", "+11.6 ± 1.9", "acc_noise", FIXUP, BN,
          ">", paper_effect=11.6),
    claim_pp("p2t9_pgd_linf", "P2 Tables 2, 9", "Fixup beats BN under PGD-ℓ∞ (WRN-28-10)", "+5.4 ± 0.6", "acc_pgd_linf",
          FIXUP, BN, ">", paper_effect=5.4),
    claim_pp("p2t9_pgd_l2", "P2 Tables 2, 9", "Fixup beats BN under PGD-ℓ2 (WRN-28-10)", "+1.1 ± 0.4", "acc_pgd_l2", FIXUP,
          BN, ">", paper_effect=1.1),
    claim_pp("p2t9_c101_noise", "P2 Tables 2, 9", "Fixup beats BN under noise on CIFAR-10.1 (WRN-28-10)", "+9.5 ± 1.5",
          "acc_c101_noise", FIXUP, BN, ">", paper_effect=9.5),
]
P2_T3_CLAIMS = [
    claim_pp("p2t3_pgd_linf", "P2 Table 3", "BN (at LR 0.1) lowers PGD-ℓ∞ accuracy at every depth", "L=8: 40.6 vs 55.6; "
          "L=13: 28.5 vs 40.3", "acc_pgd_linf", BN, NONE, paper_effect=-11.8),
    claim_pp("p2t3_noise", "P2 Table 3", "BN lowers noise accuracy at every depth", "L=8: 77 vs 81.7", "acc_noise", BN, NONE,
          paper_effect=-4.7),
    claim_pp("p2t3_deep", "P2 Table 3", "The deepest BN model does not recover VGG8-none's PGD-ℓ∞ accuracy",
          "VGG19-BN 30.0 vs VGG8 55.6", "acc_pgd_linf", dict(arch="vgg19", norm="bn"), dict(arch="vgg8", norm="none"),
          per=("dataset",), paper_effect=-25.6),
]

# The ImageNet artifacts have one model per architecture (torchvision's weights): the architectures are the replicates.
claim_in = functools.partial(claim, scale=100.0, per=("dataset",))
VGGS_ONLY = dict(where=dict(arch=IMAGENET_VGGS))  # (P2 Table 5's AlexNet, DenseNet121 and ResNet18 have no pair)
P2_T5_CLAIMS = [
    claim_in("p2t5_top5_pgd", "P2 Table 5", "BN lowers top-5 PGD-ℓ∞ accuracy (VGG11-19, ImageNet)", "−8.54 to −11.00 "
             "points", "acc_top5_pgd_linf", BN, NONE, paper_effect=-8.54, **VGGS_ONLY),
    claim_in("p2t5_top1_pgd", "P2 Table 5", "BN lowers top-1 PGD-ℓ∞ accuracy (VGG11-19, ImageNet)", "−2.38 to −4.17 "
             "points", "acc_pgd_linf", BN, NONE, paper_effect=-2.38, **VGGS_ONLY),
    claim_in("p2t5_top5_clean", "P2 Table 5", "BN raises top-5 clean accuracy (VGG11-19, ImageNet)", "+0.96 to +1.18 "
             "points", "acc_top5_clean", BN, NONE, ">", paper_effect=0.96, **VGGS_ONLY),
]
# P1 Table 1's ImageNet block: four BN-vs-none pairs (VGG16, VGG19, ResNet18, ResNet50) are the replicates; the paper's
# effects per pair in that order, and the smallest of them as the effect to detect
P1_T1_IMAGENET_CLAIMS = [
    claim_in("p1t1in_clean", "P1 Table 1", "BN raises clean accuracy (ImageNet)", "+1.78, +1.86, +3.99, +4.94",
             "acc_clean", BN, NONE, ">", paper_effect=1.78),
    claim_in("p1t1in_pgd_l2", "P1 Table 1", "BN lowers PGD-ℓ2 accuracy (ImageNet)", "−9.51, −9.58, −13.65, −8.50",
             "acc_pgd_l2", BN, NONE, paper_effect=-8.50),
    claim_in("p1t1in_pgd_linf", "P1 Table 1", "BN lowers PGD-ℓ∞ accuracy (ImageNet)", "−1.24, −1.49, −1.10, −1.64",
             "acc_pgd_linf", BN, NONE, paper_effect=-1.10),
    claim_in("p1t1in_cw_l2", "P1 Table 1", "BN lowers CW-ℓ2 accuracy (ImageNet)", "−9.84, −9.80, −13.03, −8.07",
             "acc_cw_l2", BN, NONE, paper_effect=-8.07),
    claim_in("p1t1in_cw_linf", "P1 Table 1", "BN lowers CW-ℓ∞ accuracy (ImageNet)", "−0.21, −0.27, −0.86, −0.69",
             "acc_cw_linf", BN, NONE, paper_effect=-0.21),
]
# The papers' ImageNet numbers (%), printed under the measured table: P2 Table 5 top-5 clean / noise / PGD-ℓ∞; P1 Table 1
# clean / PGD-ℓ2 / PGD-ℓ∞ / CW-ℓ2 / CW-ℓ∞ (top-1)
PAPER_IMAGENET = {
    "p2_t5": ("top-5 clean / noise / PGD-ℓ∞", {
        ("vgg11", "none"): "88.63 / 49.16 / 37.12", ("vgg11", "bn"): "89.81 / 49.95 / 26.12",
        ("vgg13", "none"): "89.25 / 52.55 / 29.16", ("vgg13", "bn"): "90.37 / 52.12 / 20.63",
        ("vgg16", "none"): "90.38 / 60.67 / 32.81", ("vgg16", "bn"): "91.52 / 65.36 / 21.96",
        ("vgg19", "none"): "90.88 / 64.86 / 34.19", ("vgg19", "bn"): "91.84 / 68.79 / 24.49",
        ("alexnet", "none"): "79.07 / 41.41 / 39.12", ("densenet121", "bn"): "91.97 / 79.85 / 34.75",
        ("resnet18", "bn"): "88.65 / 79.62 / 31.07"}),
    "p1_t1_imagenet": ("clean / PGD-ℓ2 / PGD-ℓ∞ / CW-ℓ2 / CW-ℓ∞", {
        ("vgg16", "none"): "71.59 / 15.55 / 1.79 / 16.66 / 0.23", ("vgg16", "bn"): "73.37 / 6.04 / 0.55 / 6.82 / 0.02",
        ("vgg19", "none"): "72.38 / 16.52 / 2.18 / 17.46 / 0.30", ("vgg19", "bn"): "74.24 / 6.94 / 0.69 / 7.66 / 0.03",
        ("resnet18", "none"): "66.51 / 30.44 / 1.24 / 30.43 / 0.93",
        ("resnet18", "bn"): "70.50 / 16.79 / 0.14 / 17.40 / 0.07",
        ("resnet50", "none"): "71.60 / 28.00 / 2.17 / 28.26 / 0.88",
        ("resnet50", "bn"): "76.54 / 19.50 / 0.53 / 20.19 / 0.19"}),
}

CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "p2_t5": P2_T5_CLAIMS,
    "p1_t1_imagenet": P1_T1_IMAGENET_CLAIMS,
    "p1_t1": P1_T1_CLAIMS,
    "p1_t2": P1_T1_CLAIMS + P1_T2_CLAIMS,
    "p1_t8": [claim_pp("p1t8_fgsm", "P1 Table 8", "BN is *more* accurate under FGSM (a reversal)",
    "VGG16 51.28 vs 23.26; ResNet50 38.07 vs 28.23", "acc_fgsm", BN, NONE, ">", paper_effect=9.84)],
    "p2_t1": P2_T1_CLAIMS,
    "p2_t2": P2_T2_CLAIMS,
    "p2_t3": P2_T3_CLAIMS,
    "p2_t8": [],
    "p2_pgd_vs_bim": P2_T1_CLAIMS + [
    claim_pp("p2a2_bim", "P2 App. A.2", "BIM (step eps/20) is weaker than PGD (step eps/10)",
          "31.3 vs 27.1 (none), 15 vs 10 (BN)", "bim_minus_pgd_linf", {}, None, ">",
          per=("dataset", "arch", "norm"), paper_effect=4.2)],
}
CLAIMS["p2_t2"] = [c | dict(metric="sel_" + c["metric"]) for c in P2_T2_CLAIMS]  # on the selected epoch, as P2 Table 2
CLAIMS["p2_t9"] = CLAIMS["p2_t2"]
CLAIMS["p2_pgd_steps"] = [
    claim_pp("p2a2_steps", "P2 App. A.2", "40 PGD steps of eps/20 find hardly more than 20 of eps/10 (within 1 point)",
             "28.9 → 28.5 (−0.4 ± 0.5)", "long_minus_pgd_linf", {}, None, ">", ref=-0.01, per=("dataset", "arch", "norm"))]

METRICS = ["clean", "top5_clean", "noise", "top5_noise", "pgd_l2", "pgd_linf", "top5_pgd_linf", "pgd_l2_strong",
           "pgd_linf_strong", "pgd_linf_long", "cw_l2", "cw_linf", "fgsm", "bim", "c101_clean", "c101_noise"]


def with_twins(claims, rows):
    """Every claim on PGD accuracy is also tested where measured: on the strong attack's accuracy (--attacks strong)
    and budget-free on the median minimal PGD budget (a less robust model has a smaller one, as it has a lower
    accuracy at a budget, so the predicted sign is the same)."""
    out = list(claims)
    for c in claims:
        prefix = "sel_" if c["metric"].startswith("sel_") else ""
        base = c["metric"][len(prefix):]
        if base not in ("acc_pgd_l2", "acc_pgd_linf"):
            continue
        if any(c["metric"] + "_strong" in r for r in rows):
            out.append(c | dict(id=c["id"] + "_strong", metric=c["metric"] + "_strong",
                                claim=c["claim"] + " (worst case of PGD, APGD-CE, APGD-DLR)"))
        key = prefix + "min_eps_" + base[len("acc_pgd_"):]
        if any(key in r for r in rows):
            out.append(c | dict(id=c["id"] + "_mineps", metric=key, scale=1.0, paper_value="— (budget-free)",
                                paper_effect=None, claim=c["claim"] + " (median minimal PGD budget)"))
    return out


COLORS = dict(none="0.25", bn="C0", **{"in": "C1"}, ln="C2", gn="C3", fixup="C4")  # one colour per norm in every panel

LABELS = dict(clean="clean", top5_clean="clean top-5", top5_noise="noise top-5", top5_pgd_linf="PGD-ℓ∞ top-5",
              noise="noise", pgd_l2="PGD-ℓ2", pgd_linf="PGD-ℓ∞", pgd_linf_long="PGD-ℓ∞ 2x steps of 1/2",
              pgd_l2_strong="PGD-ℓ2 strong", pgd_linf_strong="PGD-ℓ∞ strong",
              cw_l2="CW-ℓ2", cw_linf="CW-ℓ∞", fgsm="FGSM",
              bim="BIM", c101_clean="CIFAR-10.1 clean", c101_noise="CIFAR-10.1 noise")


def groups(records):
    out = {}
    for r in records:
        out.setdefault((r["dataset"], r["arch"], r["norm"]), []).append(r)
    return out


def make_table(records, header):
    ok = [r for r in records if r["status"] == "ok"]
    metrics = [m for m in METRICS if any(f"acc_{m}" in r for r in ok)]
    g = groups(ok)
    lines = [header, "", "Accuracy (%) on the test set, mean ± SEM over seeds (n = successful seeds)" +
             (", final epoch." if any("sel_acc_clean" in r for r in ok) else "."), ""]
    for prefix in ("", "sel_"):
        if prefix and not any("sel_acc_clean" in r for r in ok):
            break
        if prefix:
            lines += ["", "Selected epoch: the best clean test accuracy (P2 Table 2 reports these; its claims use them).",
                      ""]
        lines += ["| dataset | arch | norm | n | " + " | ".join(LABELS[m] for m in metrics) + " | gen. gap |",
                  "|---|---|---|---|" + "---|" * (len(metrics) + 1)]
        for (d, a, n), rs in g.items():
            lines.append(f"| {d} | {a} | {n} | {len(rs)} | " + " | ".join(
                fmt_mean_sem([r.get(f"{prefix}{'' if m == 'gen_gap' else 'acc_'}{m}") for r in rs])
                for m in metrics + ["gen_gap"]) + " |")
    if any("min_eps_l2" in r for r in ok):
        lines += ["", "Budget-free: each sample's minimal PGD budget (bisection), its median over the samples, and the "
                  "normalised area under the accuracy-vs-ε curve it implies; mean ± SEM over seeds (units of the "
                  "attack's input space).", "",
                  "| dataset | arch | norm | n | median min ε ℓ2 | median min ε ℓ∞ | area ℓ2 | area ℓ∞ |",
                  "|---|---|---|---|---|---|---|---|"]
        for (d, a, n), rs in g.items():
            lines.append(f"| {d} | {a} | {n} | {len(rs)} | " + " | ".join(
                fmt_mean_sem([r.get(k) for r in rs], scale=1.0, digits=3)
                for k in ("min_eps_l2", "min_eps_linf", "auc_l2", "auc_linf")) + " |")
    diffs = []
    for (d, a, n), rs in g.items():  # difference to the unnormalized model (Fixup for a Fixup-vs-BN WRN)
        ref = g.get((d, a, "none")) or g.get((d, a, "fixup"))
        if ref is None or rs is ref:
            continue
        cells = []
        for m in metrics:
            (m1, s1, n1) = mean_sem([r.get(f"acc_{m}") for r in rs])
            (m0, s0, n0) = mean_sem([r.get(f"acc_{m}") for r in ref])
            if not (n1 and n0):
                cells.append("–")
                continue
            both = n1 > 1 and n0 > 1
            cells.append(f"{100 * (m1 - m0):+.1f}" + (f" ± {100 * math.hypot(s1, s0):.1f}" if both else ""))
        diffs.append(f"| {d} | {a} | {n} − {ref[0]['norm']} | " + " | ".join(cells) + " |")
    if diffs:
        lines += ["", "Difference to the unnormalized model (percentage points; SEMs added in quadrature).", "",
                  "| dataset | arch | norms | " + " | ".join(LABELS[m] for m in metrics) + " |",
                  "|---|---|---|" + "---|" * len(metrics)] + diffs
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs (P2 reports these and retries seeds):", ""]
        lines += [f"- {r['dataset']} {r['arch']} {r['norm']} seed {r['seed']}: {r['reason']}" for r in failed]
    return "\n".join(lines) + "\n"


def make_figure(records, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in records if r["status"] == "ok"]
    panels = sorted({(r["dataset"], r["arch"]) for r in ok})
    metrics = [m for m in METRICS if any(f"acc_{m}" in r for r in ok)]
    curves = [k for k in ("l2", "linf") if any(f"curve_{k}" in r for r in ok)]  # budget-free rows, when measured
    fig, axes = plt.subplots(1 + len(curves), max(1, len(panels)), figsize=(6 * max(1, len(panels)), 3.6 * (1 + len(curves))),
                             squeeze=False)
    g = groups(ok)
    for row, k in enumerate(curves, 1):  # accuracy vs eps implied by the per-sample minimal budgets, mean over seeds
        for ax, (d, a) in zip(axes[row], panels):
            for n in [n for n in list(NORMS) + ["fixup"] if (d, a, n) in g]:
                cs = [r[f"curve_{k}"] for r in g[(d, a, n)] if r.get(f"curve_{k}")]
                if cs:
                    m = min(map(len, cs))
                    ax.plot(BUDGET_GRID[:m], [100 * sum(c[i] for c in cs) / len(cs) for i in range(m)], "o-",
                            color=COLORS[n], label=n, ms=3)
            ax.axvline(1.0, color="0.6", ls="--", lw=1)  # the artifact's (the paper's) budget
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"ε / the artifact's {'ℓ2' if k == 'l2' else 'ℓ∞'} budget (dashed)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-3, 103)
            ax.set_title(f"{a} on {d}: PGD-{'ℓ2' if k == 'l2' else 'ℓ∞'} vs ε (from each sample's minimal budget)",
                         fontsize=9)
            ax.legend(fontsize=8)
    for ax, (d, a) in zip(axes[0], panels):
        norms = [n for n in list(NORMS) + ["fixup"] if (d, a, n) in g]
        w = 0.8 / len(norms)
        for i, n in enumerate(norms):
            stats = [mean_sem([r.get(f"acc_{m}") for r in g[(d, a, n)]]) for m in metrics]
            ax.bar([j + i * w for j in range(len(metrics))], [100 * s[0] for s in stats], w, color=COLORS[n],
                   yerr=[100 * s[1] if s[2] > 1 else 0 for s in stats], capsize=2, label=n)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(metrics))], [LABELS[m] for m in metrics], rotation=25,
                      ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 115)
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"{a} on {d}")
        ax.legend(fontsize=8, ncol=len(norms), loc="upper center")
    fig.suptitle(textwrap.fill(title, 60 * max(1, len(panels))), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def claims_for(artifact):
    """An artifact's claims; P1 Tables 1, 2 and 8 share their models and attacks, so a P1 run tests all three."""
    if ARTIFACTS[artifact]["runs"]["space"] == "pixels" and artifact != "p1_t1_imagenet":
        return list({c["id"]: c for a in ("p1_t1", "p1_t2", "p1_t8") for c in CLAIMS[a]}.values())
    return CLAIMS[artifact]


def write_outputs(run_dir, records, cfg):
    datasets = ", ".join(sorted({r["dataset"] for r in records}))
    art, preset = cfg["artifact"], cfg["preset"]
    header = f"# {ARTIFACTS[art]['title']} ({art}, preset {preset}, {datasets})"
    table = make_table(records, header)
    if art in PAPER_IMAGENET:  # the papers' own numbers under the measured ones
        what, numbers = PAPER_IMAGENET[art]
        table += (f"\nThe paper's numbers ({what}, %):\n\n| arch | norm | paper |\n|---|---|---|\n" +
                  "".join(f"| {a} | {n} | {v} |\n" for (a, n), v in numbers.items()))
    write_text_atomic(run_dir / "table.md", table)
    make_figure(records, run_dir / "figure.png", header[2:] + f" | ε ℓ2 {cfg['eps_l2']:.3g}, ℓ∞ {cfg['eps_linf']:.3g}, "
                f"FGSM {cfg['eps_fgsm']:.3g}; error bars: SEM over seeds")
    rows = [r | ({"bim_minus_pgd_linf": r["acc_bim"] - r["acc_pgd_linf"]} if "acc_bim" in r else {})
            | ({"long_minus_pgd_linf": r["acc_pgd_linf_long"] - r["acc_pgd_linf"]} if "acc_pgd_linf_long" in r else {})
            for r in records]
    write_claims(run_dir, with_twins(claims_for(art), rows), rows,
                 f"# Claims: {ARTIFACTS[art]['title']} ({art}, preset {preset}, {datasets})",
                 records, lambda r: f"{r['dataset']} {r['arch']} {r['norm']} s{r['seed']}")


# ================================================================================================
# 5. Command line
# ================================================================================================

def arch_lr_arg(text):
    """argparse type of --arch-lr ARCH=LR."""
    arch, _, lr = text.partition("=")
    try:
        value = float(lr)
    except ValueError:
        value = float("nan")
    if not arch or not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARCH=LR with a finite LR > 0 (e.g. vgg11=0.01)")
    return arch, value


def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "p1_t1", PRESETS, SKIPPED)
    g.add_argument("--dataset", choices=DATASETS, help="override the artifact's datasets")
    g.add_argument("--arch", nargs="+", help="override the architectures (e.g. vgg11 resnet18)")
    g.add_argument("--norm", nargs="+", choices=list(NORMS) + ["fixup"], help="override the norms")
    g.add_argument("--seeds", type=int, help="successful seeds per model (P2: mean ± SEM over them)")
    g.add_argument("--select", choices=["final", "best_test"], help="also measure the epoch of best clean test accuracy "
                   "(P2 Tables 2/9: best_test; both the final and the selected model are reported, labelled)")
    g.add_argument("--arch-seeds", nargs="*", metavar="ARCH=N", type=arch_seeds_arg,
                   help="seeds for particular architectures (P2 Tables 2/9: wrn28_10=5); an empty list: --seeds for all")
    g.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST_SEED, FIRST_SEED+1, ...: the quick "
                   "presets' budgets and LRs were chosen on pilot seeds 100+, never on the reported seeds 0-4 "
                   "(DECISIONS.md D35)")
    g.add_argument("--max-seed-tries", type=int, help="seeds tried per model before giving up (P2 Table 3: 10; "
                   "unset: --seeds)")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=float, help="channel multiplier (1 = the paper's models)")
    g.add_argument("--epochs", type=int, help="training epochs (unset: each model's recipe: P1 VGG 200 on "
                   "CIFAR-10 / 50 on SVHN, ResNet50 350; P2 50 SVHN / 150 CIFAR-10 / 350 Table 3)")
    g.add_argument("--lr", type=float, help="initial learning rate (unset: each model's recipe: 0.01, "
                   "ResNet50 0.1, P2 Table 3 BN 0.1)")
    g.add_argument("--arch-lr", nargs="*", metavar="ARCH=LR", type=arch_lr_arg,
                   help="learning rate of particular architectures, every norm (the quick preset's: DECISIONS.md D35); "
                        "an empty list: --lr for all")
    g.add_argument("--batch-size", type=int, help="SGD batch size")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (not stated by the papers: DECISIONS.md D1)")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up")
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (unset: min(32, channels))")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--n-eval", type=int, help="test samples attacked, class-balanced (unset: the full test set)")
    g.add_argument("--attack-steps", type=int, help="PGD/CW/BIM iterations")
    g.add_argument("--step-div", type=float, default=10.0, help="P2 artifacts: PGD step = eps / STEP_DIV (P2 Sec. 3: 10; "
                   "P1 uses MadryLab's 2.5 eps / steps)")
    g.add_argument("--bim-step-div", type=float, default=20.0, help="P2 App. A.2: BIM step = eps / BIM_STEP_DIV (20)")
    g.add_argument("--eps-l2", type=float, help="PGD-ℓ2 and CW-ℓ2 budget (P1: pixels; P2: standardized, 0.03·√3072)")
    g.add_argument("--eps-linf", type=float, help="PGD-ℓ∞, CW-ℓ∞ and BIM budget")
    g.add_argument("--eps-fgsm", type=float, help="FGSM budget (P1 Table 8: 4/255)")
    g.add_argument("--noise-std", type=float, help="Gaussian noise std in standardized units (P2: variance 1/4)")
    g.add_argument("--attacks", choices=["standard", "strong"], default="standard", help="strong: also measure PGD-ℓ2 "
                   "and PGD-ℓ∞ as each sample's worst case over PGD, APGD-CE and APGD-DLR (acc_pgd_*_strong)")
    g.add_argument("--apgd-steps", type=int, default=100, help="--attacks strong: APGD iterations (AutoAttack: 100)")
    g.add_argument("--min-eps-iters", type=int, default=8, help="bisection halvings of each sample's minimal PGD budget "
                   "(ℓ2 and ℓ∞; 0: not measured)")
    g.add_argument("--min-eps-range", type=float, default=16.0, help="the bisection searches [0, RANGE x the budget]")
    g.add_argument("--min-eps-n", type=int, default=1000, help="evaluation samples (class-balanced) whose minimal budget "
                   "is searched (a median over 1000 is precise to a few %%)")
    g = add_run_flags(p, "exp_table1", unit="runs", data="cifar-10-batches-py/, svhn/, mnist/",
                         cache="shared checkpoint cache: reuse a model trained by any script with the same dataset, "
                               "architecture, norm, width, recipe and seed", outputs="table.md, claims.md and the figure")
    g.add_argument("--size", type=int, help="resize images to size x size (unset: the dataset's own; "
                   "digits 32 for VGG, 16 otherwise; ImageNet's crop, 224)")
    g.add_argument("--imagenet-root", help="p2_t5, p1_t1_imagenet: ImageNet folder with val/<wnid>/*.JPEG (or the flat "
                   "validation folder with ILSVRC2012_devkit_t12/) and, to train P1's ResNets, train/<wnid>/*.JPEG")
    g.add_argument("--weights-dir", help="p2_t5, p1_t1_imagenet: torchvision's weight files under their release names "
                   "(e.g. vgg16-397923af.pth; --download fetches them); not needed for the ResNets P1 trains")
    g.add_argument("--workers", type=int, default=4, help="ImageNet: DataLoader worker processes")
    args = parse_with_presets(p, resolve, argv)
    args.arch_seeds = dict(args.arch_seeds or {})  # (ARCH=N pairs from the command line, a dict from a preset)
    args.arch_lr = dict(args.arch_lr or {})
    if args.plot_only:
        return args
    args.max_seed_tries = args.max_seed_tries or ARTIFACTS[args.artifact]["runs"].get("max_tries", args.seeds)
    check_numbers(p, args, at_least_one=("epochs", "batch_size", "attack_steps", "n_eval", "seeds", "max_seed_tries",
                                         "size", "gn_groups", "apgd_steps", "min_eps_n"),
                  positive=("width", "lr", "step_div", "bim_step_div", "min_eps_range"),
                  non_negative=("eps_l2", "eps_linf", "eps_fgsm", "noise_std", "weight_decay", "warmup_epochs", "first_seed",
                                "workers", "min_eps_iters"))
    if args.max_seed_tries < args.seeds:
        p.error(f"--max-seed-tries {args.max_seed_tries} < --seeds {args.seeds}")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
