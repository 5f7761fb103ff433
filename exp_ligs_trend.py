"""Feature robustness (LIGS) apart from usefulness (clean accuracy) over the whole of training (P1 Sec. 4).

Reproduces P1 Figs 4 and 10 (clean accuracy, robust accuracy and LIGS per epoch, standard vs
adversarial training, five norms), Fig 2 (LIGS under four perturbation types), Fig 5 (the LIGS
regularizer), Fig 8 (width, depth, activation, weight decay, learning rate, optimizer) and an
empirical Fig 3 (clean accuracy vs LIGS, coloured by robust accuracy). Every run is measured at
epoch 0 (before any step) and after every epoch, on a fixed class-balanced evaluation subset.

Quick results (update_readme.py writes this from results/quick/):
    python exp_ligs_trend.py --preset quick --artifact fig2
        4 held / 0 reversed / 0 inconclusive / 0 underpowered
        P1 Fig 2: none keeps higher LIGS than BN (uniform perturbation): +0.007 [+0.005, +0.009] (held)
    python exp_ligs_trend.py --preset quick --artifact fig4
        7 held / 2 reversed / 4 inconclusive / 0 underpowered
        P1 Fig 4: Adversarial training keeps LIGS close to 1 (above 0.95): +0.046 [+0.045, +0.046] (held)
    python exp_ligs_trend.py --preset quick --artifact fig5
        1 held / 0 reversed / 3 inconclusive / 0 underpowered
        P1 Fig 5: The LIGS regularizer (λ = 10) raises LIGS: +0.011 [+0.001, +0.022] (held)
    python exp_ligs_trend.py --preset quick --artifact fig8
        0 held / 2 reversed / 3 inconclusive / 0 underpowered
        P1 Fig 8: A wider net has slightly higher LIGS: +0.015 [-0.006, +0.036] (inconclusive)

Run it:
    python exp_ligs_trend.py --norm bn                      # P1 Fig 4, BN only (CIFAR-10; --download fetches it)
    python exp_ligs_trend.py --preset quick                 # Figs 4/10 on the bundled digits, CPU, ~10-15 min
    python exp_ligs_trend.py --preset quick --artifact fig5 # the regularizer; also fig2, fig8
    python exp_ligs_trend.py --plot-only runs/exp_ligs_trend/<run>

P1 Table 4/5 are empty, so the training setup is DECISIONS.md D14: ResNet18, SGD 0.9, WD 5e-4,
batch 128, LR 0.01, 150 epochs, /10 at 50 and 100, crop+flip. Adversarial training: l2 PGD eps 0.5,
7 steps of 0.1, adversarial examples only (DECISIONS.md D15), generated in eval mode (the authors' code used
targeted random labels in train mode). LIGS: Gaussian sigma 0.01, no clipping,
eval mode (DECISIONS.md D12). Fig 11 trains on ImageNet itself, streamed from --data-root/imagenet/{train,val}/<wnid>/
(He et al.'s recipe, 224 crops, 1,000 validation images for LIGS and PGD, clean accuracy on the whole validation set),
or on a labelled substitute, 100 of its classes at 64x64 read into memory (--dataset imagenet100 --size 64
--per-class 10).
"""
import math
import pathlib
import time

import torch

from common import (DATASETS, HE_IMAGENET, IMAGENET_MEAN, IMAGENET_STD, NORMS, ImageNetFolder, collect, eval_mode,
                    imagenet_loader, train_stream, worker_errors, Sweep, add_run_flags, build_dataset, cache_path,
                    check_attack, check_numbers, claim,
                    class_balanced_subset, epoch_metrics, fast_layout, fmt_mean_sem, ligs_sigma_matched, log_to, make_model,
                    make_parser, mean_sem, median_minimal_eps, merge_runs, parse_with_presets, pgd, pick_device,
                    prepare_run_dir, print_config, run_script, save_figure, set_seed, show, single_process, train_model,
                    write_claims, write_config, write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

LAMBDAS = [0.0, 0.1, 1.0, 10.0]  # DECISIONS.md D13

FACTORS = {  # P1 Fig 8 settings, DECISIONS.md D16; the base run is ResNet18-BN, standard training
    "width": [0.5, 1.0, 2.0], "depth": ["resnet18", "resnet34", "resnet50"], "act": ["relu", "leaky_relu", "selu"],
    "weight_decay": [0.0, 5e-4, 5e-3], "lr": [0.01, 0.1, 0.5], "optimizer": ["sgd", "adagrad", "adam"],
}


OPT_LR = {"adagrad": 0.01, "adam": 1e-3}  # DECISIONS.md D16: learning rates of the other optimizers

ARTIFACTS = {  # name -> title, runs (what varies), claims
    "fig4": dict(title="P1 Figs 4 and 10: {standard, adversarial} x norms", runs=dict(training=["standard", "adversarial"],
                 norms=list(NORMS))),
    "fig2": dict(title="P1 Fig 2: LIGS with Gaussian, uniform, FGSM and PGD perturbations, none vs bn",
                 runs=dict(norms=["none", "bn"], perturbations=["gaussian", "uniform", "fgsm", "pgd"])),
    "fig5": dict(title="P1 Fig 5: LIGS regularizer, ResNet18-BN", runs=dict(norms=["bn"], lambdas=LAMBDAS)),
    "fig8": dict(title="P1 Fig 8: width, depth, activation, weight decay, learning rate, optimizer (ResNet18-BN)",
                 runs=dict(norms=["bn"], factors=FACTORS)),
    # P1 Fig 11: torchvision's ResNet18/50 layout with each norm on ImageNet, He et al.'s recipe (common.HE_IMAGENET),
    # streamed from disk (common.train_stream); or, labelled as such, on 100 ImageNet classes at 64x64
    # (common.read_imagenet100: --dataset imagenet100 --size 64 --per-class 10), trained in memory
    "fig11": dict(title="P1 Fig 11: ResNet18/50 x norms on ImageNet",
                  runs=dict(norms=list(NORMS), archs=["imagenet_resnet18", "imagenet_resnet50"])),
}
FIG11_SUBSTITUTE = " -- SUBSTITUTE: 100 classes at 64x64"  # (in every title of a run on imagenet100)
FIG11_PAPER = dict(dataset="imagenet", size=224, epochs=HE_IMAGENET["epochs"], lr=HE_IMAGENET["lr"],
                   milestones=list(HE_IMAGENET["milestones"]), batch_size=HE_IMAGENET["batch_size"],
                   weight_decay=HE_IMAGENET["weight_decay"], per_class=1)  # 1,000 LIGS/PGD samples


SKIPPED = {}

PRESETS = {  # DECISIONS.md D14 (base run), D15 (adversarial training)
    "paper": dict(dataset="cifar10", arch="resnet18", width=1.0, seeds=1, epochs=150, lr=0.1, milestones=[50, 100],
                  batch_size=128, weight_decay=5e-4, warmup_epochs=0.0, per_class=100, attack_steps=10, eps=0.25,
                  adv_eps=0.5, adv_steps=7, adv_step_size=0.1, size=None, gn_groups=None, norm=None,
                  training=["standard", "adversarial"], lambdas=LAMBDAS),
    # The bundled digits at 16x16 with the exp_table1 quick recipe (the one setting found to train every norm:
    # batch 16, LR 0.02, two warm-up epochs; DECISIONS.md D24). Budgets 4x P1's (robust eps 1.0, adversarial
    # training eps 2.0 with 3 steps of 2.5*eps/3). 5 seeds of none vs BN (P1 Fig 4; Fig 10's IN/LN/GN with
    # --norm) so that their difference can be told from seed noise; Fig 5 with 3 seeds of lambda 0, 1, 10.
    "quick": dict(dataset="digits", arch="resnet18", width=0.125, seeds=5, epochs=8, lr=0.02, milestones=[4, 6],
                  batch_size=16, weight_decay=5e-4, warmup_epochs=2.0, per_class=20, attack_steps=10, eps=1.0,
                  adv_eps=2.0, adv_steps=3, adv_step_size=2.5 * 2.0 / 3, size=16, gn_groups=2, norm=["none", "bn"],
                  training=["standard", "adversarial"], lambdas=[0.0, 1.0, 10.0]),
    "smoke": dict(dataset="synthetic", arch="resnet18", width=1 / 16, seeds=1, epochs=2, lr=0.05, milestones=[1],
                  batch_size=32, weight_decay=5e-4, warmup_epochs=0.0, per_class=5, attack_steps=3, eps=0.25,
                  adv_eps=0.5, adv_steps=2, adv_step_size=0.1, size=16, gn_groups=2, norm=None,
                  training=["standard", "adversarial"], lambdas=LAMBDAS, min_eps_iters=2),
}


QUICK_SEEDS = {"fig5": 3, "fig8": 3}  # quick: fewer seeds where a run costs more (fig5: double backprop) or many runs


def resolve(preset, artifact):
    """The values that run for this preset and artifact (shown by --help, saved in config.json)."""
    v = dict(PRESETS[preset])
    if preset == "quick":
        v["seeds"] = QUICK_SEEDS.get(artifact, v["seeds"])
    v["norm"] = v["norm"] if artifact == "fig4" and v["norm"] else ARTIFACTS.get(artifact, ARTIFACTS["fig4"])["runs"]["norms"]
    if artifact == "fig11" and preset == "paper":
        v |= FIG11_PAPER
    return v


# ================================================================================================
# 2. Experiment
# ================================================================================================

def runs(args):
    """[(variant, overrides)] for the chosen figure; overrides change one thing of the base run
    (P1 Sec. 4.2: only the variable under study changes)."""
    if args.artifact == "fig4":
        return [(f"{t} {n}", dict(norm=n, adversarial=t == "adversarial"))
                for t in args.training for n in args.norm]
    if args.artifact == "fig2":
        return [(f"standard {n}", dict(norm=n, all_perturbations=True)) for n in args.norm]
    if args.artifact == "fig5":
        return [(f"lambda={lam:g}", dict(norm="bn", ligs_lambda=lam)) for lam in args.lambdas]
    if args.artifact == "fig11":  # (--arch imagenet_resnet18 runs one of the two)
        archs = [args.arch] if args.arch.startswith("imagenet_") else ARTIFACTS["fig11"]["runs"]["archs"]
        return [(f"{a.split('_')[1]} {n}", dict(norm=n, arch=a)) for a in archs for n in args.norm]
    out = []
    for f in args.factors:  # fig8
        for v in FACTORS[f]:
            o = dict(norm="bn", factor=f, value=v)
            if f == "width":
                o["width"] = args.width * v
            elif f == "depth":
                o["arch"] = v
            elif f == "optimizer":
                o |= dict(optimizer=v, lr=OPT_LR.get(v, args.lr))
            else:
                o[f] = v
            out.append((f"{f}={v}", o))
    return out


def planned_runs(args):
    """(name, record fields) of every training run, variant by variant, in a fixed order (the unit of --shard)."""
    return [(f"{v.replace(' ', '_').replace('=', '-')}_s{s}", dict(variant=v, seed=s)) for v, _ in runs(args)
            for s in range(args.seeds)]


def run_one(args, data, subset, variant, o, seed, device, ckpt):
    """Train one variant with per-epoch measurements; returns one record per epoch."""
    set_seed(seed)
    arch, width = o.get("arch", args.arch), o.get("width", args.width)
    kw = dict(gn_groups=args.gn_groups) if args.gn_groups else {}
    model = make_model(arch, norm=o["norm"], width=width, num_classes=data.num_classes, in_channels=data.shape[0],
                       act=o.get("act", "relu"), mean=data.mean, std=data.std, **kw).to(device)
    model = fast_layout(model)
    adv = dict(kind="pgd", norm="l2", eps=args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size,
               clip=(0.0, 1.0)) if o.get("adversarial") else None
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=o.get("lr", args.lr), milestones=args.milestones,
                  optimizer=o.get("optimizer", "sgd"), weight_decay=o.get("weight_decay", args.weight_decay),
                  warmup_epochs=args.warmup_epochs, augment=args.dataset == "cifar10", adv=adv,
                  ligs_lambda=o.get("ligs_lambda", 0.0), ligs_sigma=args.sigma)
    x_sub, y_sub = data.x_test[subset], data.y_test[subset]
    perturbations = ("gaussian", "uniform", "fgsm", "pgd") if o.get("all_perturbations") else ("gaussian",)
    sigma_dm = ligs_sigma_matched(args.sigma, data.shape)  # LIGS at the same relative noise as on CIFAR-10 as well
    sigma_dm = None if math.isclose(sigma_dm, args.sigma) else sigma_dm
    on_epoch = lambda e, m: epoch_metrics(m, data.x_test, data.y_test, x_sub, y_sub, args.eps, args.attack_steps,
                                          args.sigma, seed, perturbations, sigma_dm=sigma_dm)  # P1 Sec. 4
    key = dict(dataset=args.dataset, size=args.size, arch=arch, recipe=recipe, seed=seed, amp=args.amp,
               model=dict(norm=o["norm"], width=width, act=o.get("act", "relu"), **kw),
               measure=dict(eps=args.eps, steps=args.attack_steps, per_class=args.per_class, sigma=args.sigma,
                            perturbations=perturbations) | ({} if sigma_dm is None else dict(sigma_dm=sigma_dm)))
    # (the key: everything behind the weights and the history)
    res = train_model(model, data, recipe, seed=seed, ckpt=cache_path(args.cache, key) or ckpt, amp=args.amp,
                      on_epoch=on_epoch, tag=f"[{variant} s{seed}]", key=key, ddp_bn=args.ddp_bn)
    base = dict(artifact=args.artifact, dataset=args.dataset, arch=arch, norm=o["norm"], seed=seed, variant=variant,
                training="adversarial" if adv else "standard", factor=o.get("factor"), value=str(o.get("value")),
                ligs_lambda=o.get("ligs_lambda", 0.0), status=res["status"], reason=res["reason"])
    return final_checks(args, model, x_sub, y_sub, [base | h for h in res["history"]], seed)


def final_checks(args, model, x_sub, y_sub, rows, seed):
    """The final model's attack sanity checks and budget-free robustness, added to the last history row."""
    if rows[-1]["status"] == "ok":  # Carlini et al. 2019 checks of the robust-accuracy attack, on the final model
        spec = dict(kind="pgd", norm="l2", eps=args.eps, steps=args.attack_steps, clip=(0.0, 1.0))
        rows[-1] |= {f"chk_pgd_l2_{k}": v for k, v in check_attack(model, x_sub, y_sub, spec, seed=seed).items()}
        if args.min_eps_iters:  # budget-free robustness of the final model (DECISIONS.md D34)
            med, censored = median_minimal_eps(model, x_sub, y_sub,
                                               lambda xb, yb, e: pgd(model, xb, yb, e, args.attack_steps, norm="l2"),
                                               args.min_eps_range * args.eps, iters=args.min_eps_iters)
            rows[-1] |= dict(min_eps_l2=med, min_eps_l2_censored=censored)
    return rows


def run_imagenet(args, train_set, val_loader, x_sub, y_sub, variant, o, seed, device, ckpt):
    """P1 Fig 11 on ImageNet itself: one ResNet trained with common.train_stream (He et al.'s recipe, random-resized
    crops and flips streamed from disk), measured before training and after every epoch as P1 Sec. 4 does: clean
    accuracy on the whole validation set (streamed), PGD-ℓ2 robust accuracy and LIGS on the fixed subset in memory."""
    set_seed(seed)
    kw = dict(gn_groups=args.gn_groups) if args.gn_groups else {}
    model = make_model(o["arch"], norm=o["norm"], num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw).to(device)
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, milestones=args.milestones,
                  weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, clip=None)

    def on_epoch(e, m):
        out = epoch_metrics(m, x_sub, y_sub, x_sub, y_sub, args.eps, args.attack_steps, args.sigma, seed,
                            sigma_dm=ligs_sigma_matched(args.sigma, x_sub.shape[1:]))
        hits = n = 0
        with torch.no_grad(), eval_mode(m):
            for xb, yb in worker_errors(val_loader):
                hits += int((m(xb.to(device)).argmax(1) == yb.to(device)).sum())
                n += len(yb)
        return out | dict(clean_acc=hits / n)  # (the whole validation set, not the subset)
    key = dict(dataset="imagenet", size=args.size, arch=o["arch"], recipe=recipe, seed=seed, amp=args.amp,
               model=dict(norm=o["norm"], **kw), measure=dict(eps=args.eps, steps=args.attack_steps, n=len(y_sub),
                                                              sigma=args.sigma, val=len(val_loader.dataset)))
    res = train_stream(model, train_set, recipe, ckpt=cache_path(args.cache, key) or ckpt, key=key, seed=seed,
                       workers=args.workers, amp=args.amp, on_epoch=on_epoch, tag=f"[{variant} s{seed}]")
    base = dict(artifact=args.artifact, dataset="imagenet", arch=o["arch"], norm=o["norm"], seed=seed, variant=variant,
                training="standard", factor=None, value="None", ligs_lambda=0.0, status=res["status"],
                reason=res["reason"])
    return final_checks(args, model.eval(), x_sub, y_sub, [base | h for h in res["history"]], seed)


def imagenet_inputs(args, device):
    """P1 Fig 11's ImageNet: the training set streamed with augmentation, a loader of the validation set, and
    --per-class validation images of every class (the first of each class in file order) on the device."""
    root = pathlib.Path(args.data_root) / "imagenet"
    train_set = ImageNetFolder(root, "train", size=args.size, train=True)
    val = ImageNetFolder(root, "val", size=args.size)
    first = {}
    for i, (_, c) in enumerate(val.samples):
        first.setdefault(c, []).append(i)
    pick = [i for c in sorted(first) for i in first[c][:args.per_class]]
    x_sub, y_sub = collect(imagenet_loader(torch.utils.data.Subset(val, pick), 64, workers=args.workers), "LIGS subset")
    return train_set, imagenet_loader(val, args.batch_size, workers=args.workers), x_sub.to(device), y_sub.to(device)


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_ligs_trend.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        print(f"redrew the table, claims and figures in {run_dir}")
        return
    device = pick_device(args.device)
    if args.dataset == "imagenet":  # P1 Fig 11 on ImageNet itself, streamed
        single_process("--dataset imagenet (each model is trained by common.train_stream)")
        inputs = imagenet_inputs(args, device)
        described = f"train {len(inputs[0])} images, eval subset {len(inputs[3])}, validation {len(inputs[1].dataset)}"
    else:
        data = build_dataset(args.dataset, args.data_root, device, args.download, size=args.size,
                             n_train=1000 if args.dataset == "synthetic" else None)
        subset = class_balanced_subset(data.y_test, args.per_class)
        described = f"train {tuple(data.x_train.shape)}, eval subset {len(subset)}"
    run_dir = prepare_run_dir("exp_ligs_trend", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    print(f"run directory: {run_dir} | {args.dataset}: {described} ({args.per_class}/class) | robust eps {args.eps:g} "
          f"(l2, {args.attack_steps} steps)")
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    overrides = dict(runs(args))
    t0 = time.time()
    for _, name, r in sweep.todo():
        ckpt = run_dir / "ckpt" / f"{name}.pt"
        o = overrides[r["variant"]]
        sweep.save(name, run_imagenet(args, *inputs, r["variant"], o, r["seed"], device, ckpt) if args.dataset == "imagenet"
                   else run_one(args, data, subset, r["variant"], o, r["seed"], device, ckpt))
    write_outputs(run_dir, sweep.records(), vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

STD, ADV = dict(training="standard"), dict(training="adversarial")

FIG4_CLAIMS = [
    claim("fig4_ligs_falls", "P1 Fig 4", "LIGS falls during standard training", "falls over training (figure only)",
          "ligs_change", STD, per=("norm",)),
    claim("fig4_ligs_falls_useful", "P1 Fig 4", "LIGS falls during standard training, from the first useful epoch "
          "(clean accuracy >= --useful-acc)", "falls over training (figure only)", "ligs_change_useful", STD,
          per=("norm",)),
    claim("fig4_ligs_dm_falls_useful", "P1 Fig 4", "LIGS at the dimension-matched sigma falls from the first useful epoch",
          "falls over training (figure only)", "ligs_dm_change_useful", STD, per=("norm",)),
    claim("fig4_bn_ligs", "P1 Fig 4", "BN gives lower LIGS than none (standard training)", "clearly lower during the "
          "whole run (figure only)", "ligs", STD | dict(norm="bn"), STD | dict(norm="none")),
    claim("fig4_bn_ligs_dm", "P1 Fig 4", "BN gives lower LIGS than none at the dimension-matched sigma (standard "
          "training)", "clearly lower during the whole run (figure only)", "ligs_dm", STD | dict(norm="bn"),
          STD | dict(norm="none")),
    claim("fig4_bn_robust", "P1 Fig 4", "BN gives lower robust accuracy than none (standard training)", "lower (figure "
          "only)", "robust_acc", STD | dict(norm="bn"), STD | dict(norm="none"), scale=100.0),
    claim("fig4_bn_robust_mineps", "P1 Fig 4", "BN gives a smaller median minimal PGD-ℓ2 budget than none (standard "
          "training, final model)", "— (budget-free)", "min_eps_l2", STD | dict(norm="bn"), STD | dict(norm="none")),
    claim("fig4_bn_clean", "P1 Fig 4", "BN gives slightly higher clean accuracy (standard training)", "slightly higher "
          "(figure only)", "clean_acc", STD | dict(norm="bn"), STD | dict(norm="none"), ">", scale=100.0),
    *[claim(f"fig10_{n}_ligs", "P1 Fig 10", f"{n.upper()} gives lower LIGS than none (standard training)", "like BN "
            "(figure only)", "ligs", STD | dict(norm=n), STD | dict(norm="none")) for n in ("in", "ln", "gn")],
    claim("fig4_adv_ligs", "P1 Fig 4", "Adversarial training keeps LIGS close to 1 (above 0.95)", "close to 1 (figure "
          "only)", "ligs", ADV, None, ">", per=("norm",), ref=0.95),
    claim("fig4_adv_vs_std", "P1 Fig 4", "Standard training gives lower LIGS than adversarial training",
          "much lower (figure only)", "ligs", STD, ADV, per=("norm",)),
]


FIG2_CLAIMS = [claim(f"fig2_{k}", "P1 Fig 2", f"none keeps higher LIGS than BN ({name} perturbation)", "always above "
                     "(figure only)", k, dict(norm="none"), dict(norm="bn"), ">")
               for k, name in (("ligs", "Gaussian"), ("ligs_uniform", "uniform"), ("ligs_fgsm", "FGSM"), ("ligs_pgd", "PGD"))]

FIG5_CLAIMS = [
    claim(f"fig5_{m}_{lam:g}", "P1 Fig 5", f"The LIGS regularizer (λ = {lam:g}) raises {what}", "by a large margin (figure "
          "only)", m, dict(ligs_lambda=lam), dict(ligs_lambda=0.0), ">", scale=100.0 if m == "robust_acc" else 1.0)
    for lam in (1.0, 10.0) for m, what in (("ligs", "LIGS"), ("robust_acc", "robust accuracy"))]


FIG8_CLAIMS = [
    claim("fig8_width", "P1 Fig 8", "A wider net has slightly higher LIGS", "slightly higher (figure only)", "ligs",
          dict(factor="width", value="2.0"), dict(factor="width", value="0.5"), ">"),
    claim("fig8_depth", "P1 Fig 8", "A deeper net has slightly lower LIGS", "slightly lower (figure only)", "ligs",
          dict(factor="depth", value="resnet50"), dict(factor="depth", value="resnet18")),
    claim("fig8_selu", "P1 Fig 8", "SELU gives higher LIGS than ReLU", "slightly higher (figure only)", "ligs",
          dict(factor="act", value="selu"), dict(factor="act", value="relu"), ">"),
    claim("fig8_lr", "P1 Fig 8", "A high LR (0.5) gives lower final LIGS than 0.01", "slightly lower at the end (figure "
          "only)", "ligs", dict(factor="lr", value="0.5"), dict(factor="lr", value="0.01")),
    claim("fig8_adam", "P1 Fig 8", "Adam gives higher LIGS than SGD", "slightly higher (figure only)", "ligs",
          dict(factor="optimizer", value="adam"), dict(factor="optimizer", value="sgd"), ">"),
]

FIG11_CLAIMS = [  # P1 Sec. 4.3 on Fig 11: on ImageNet too, every norm gives lower LIGS than none
    *[claim(f"fig11_{n}_ligs", "P1 Fig 11", f"{n.upper()} gives lower LIGS than none (ImageNet, or its substitute where "
            "the title says so)", "lower (figure only)", "ligs", dict(norm=n), dict(norm="none"), per=("arch",))
      for n in ("bn", "in", "ln", "gn")],
    claim("fig11_bn_clean", "P1 Fig 11", "BN gives higher clean accuracy than none (ImageNet, or its substitute)",
          "higher (figure only)", "clean_acc", dict(norm="bn"), dict(norm="none"), ">", per=("arch",), scale=100.0),
]

CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "fig11": FIG11_CLAIMS,
    "fig4": FIG4_CLAIMS,
    "fig2": FIG2_CLAIMS,
    "fig5": FIG5_CLAIMS,
    "fig8": FIG8_CLAIMS,
}


def by_variant(records):
    out = {}
    for r in records:
        out.setdefault(r["variant"], {}).setdefault(r["epoch"], []).append(r)
    return out


def curve(rows_by_epoch, key):
    epochs = sorted(e for e, rs in rows_by_epoch.items() if any(key in r and r[key] is not None for r in rs))
    stats = [mean_sem([r.get(key) for r in rows_by_epoch[e]]) for e in epochs]
    return epochs, [s[0] for s in stats], [s[1] if s[2] > 1 else 0.0 for s in stats]


def make_table(records, header):
    cols = ["clean_acc", "robust_acc", "ligs", "ligs_uniform", "ligs_fgsm", "ligs_pgd"]
    cols = [c for c in cols if any(c in r for r in records)]
    lines = [header, "", "Epoch 0 and final epoch, mean ± SEM over seeds; accuracies in %, LIGS as a cosine; time = seconds",
             "per training epoch (mean over epochs).", "",
             "| variant | status | " + " | ".join(f"{c} (ep 0)" for c in cols) + " | "
             + " | ".join(f"{c} (final)" for c in cols) + " | time/epoch |", "|---|---|" + "---|" * (2 * len(cols) + 1)]
    for variant, rows in by_variant(records).items():
        last = max(rows)
        cells = []
        for e in (0, last):
            for c in cols:
                vals = [r.get(c) for r in rows.get(e, [])]
                acc = c.endswith("acc")
                cells.append(fmt_mean_sem(vals, scale=100.0 if acc else 1.0, digits=1 if acc else 3))
        times = [r["time_s"] for e, rs in rows.items() if e > 0 for r in rs if "time_s" in r]
        status = ",".join(sorted({r["status"] for rs in rows.values() for r in rs}))
        lines.append(f"| {variant} | {status} | " + " | ".join(cells) + f" | {sum(times) / max(1, len(times)):.1f} |")
    failed = {(r["variant"], r["seed"]): r["reason"] for r in records if r["status"] == "failed"}
    lines += [""] + [f"- failed: {v} seed {s}: {why}" for (v, s), why in failed.items()]
    return "\n".join(lines) + "\n"


def make_figures(records, run_dir, artifact, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    V = by_variant(records)

    colors = dict(none="0.25", bn="C0", ln="C2", gn="C3", **{"in": "C1"})  # one colour per norm, as in exp_table1

    def panel(ax, variants, key, ylabel, label=lambda v: v, scale=1.0):
        for v in variants:
            e, m, s = curve(V[v], key)
            if e:
                ax.errorbar(e, [scale * x for x in m], yerr=[scale * x for x in s], marker="o", ms=3, capsize=2,
                            label=label(v), color=colors.get(label(v)))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    metrics = [("clean_acc", "clean accuracy (%)", 100.0), ("robust_acc", "robust accuracy (%)", 100.0), ("ligs", "LIGS", 1.0)]
    if artifact == "fig4":
        trainings = [t for t in ("standard", "adversarial") if any(v.startswith(t) for v in V)]
        fig, axes = plt.subplots(3, len(trainings), figsize=(5 * len(trainings), 9), squeeze=False)
        for j, t in enumerate(trainings):
            for i, (k, yl, sc) in enumerate(metrics):
                panel(axes[i][j], [v for v in V if v.startswith(t)], k, yl, lambda v: v.split()[1], sc)
            axes[0][j].set_title(f"{t} training")
            axes[0][j].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, run_dir / "fig4.png")
        fig, ax = plt.subplots(figsize=(6, 4.5))  # empirical P1 Fig 3: usefulness vs robustness
        pts = [r for r in records if r.get("ligs") is not None]
        sc = ax.scatter([100 * r["clean_acc"] for r in pts], [r["ligs"] for r in pts], c=[100 * r["robust_acc"] for r in pts],
                        cmap="viridis", marker="o", s=[12 + 4 * r["epoch"] for r in pts])
        for v in V:
            e, m_acc, _ = curve(V[v], "clean_acc")
            _, m_l, _ = curve(V[v], "ligs")
            if e:  # label the final epoch of each run: "std bn", "adv ln", ...
                ax.annotate(v.replace("standard", "std").replace("adversarial", "adv"), (100 * m_acc[-1], m_l[-1]),
                            fontsize=6, xytext=(2, -8 if v.startswith("adv") else 3), textcoords="offset points")
        fig.colorbar(sc, label="robust accuracy (%)")
        ax.set_xlabel("clean accuracy (%)  [usefulness]")
        ax.set_ylabel("LIGS  [robustness]")
        ax.set_title("P1 Fig 3, measured (all epochs; size = epoch)", fontsize=10)
        fig.tight_layout()
        save_figure(fig, run_dir / "fig3_scatter.png")
    elif artifact == "fig11":  # one column per architecture, the norms as curves (P1 Fig 11: ResNet18 top, ResNet50)
        archs = [a for a in ("resnet18", "resnet50") if any(v.startswith(a) for v in V)]
        fig, axes = plt.subplots(3, len(archs), figsize=(5 * len(archs), 9), squeeze=False)
        for j, a in enumerate(archs):
            for i, (k, yl, sc) in enumerate(metrics):
                panel(axes[i][j], [v for v in V if v.startswith(a)], k, yl, lambda v: v.split()[1], sc)
            axes[0][j].set_title(a)
            axes[0][j].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, run_dir / "fig11.png")
    elif artifact == "fig2":
        fig, axes = plt.subplots(1, 4, figsize=(18, 4), squeeze=False)
        for ax, (k, name) in zip(axes[0], [("ligs", "Gaussian"), ("ligs_uniform", "uniform"), ("ligs_fgsm", "FGSM"),
                                           ("ligs_pgd", "PGD")]):
            panel(ax, list(V), k, "LIGS", lambda v: v.split()[-1])
            ax.set_title(name)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, run_dir / "fig2.png")
    elif artifact == "fig5":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), squeeze=False)
        for ax, (k, yl, sc) in zip(axes[0], [metrics[2], metrics[1], metrics[0]]):
            panel(ax, list(V), k, yl, scale=sc)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, run_dir / "fig5.png")
    else:
        factors = list(dict.fromkeys(r["factor"] for r in records if r.get("factor")))
        fig, axes = plt.subplots(2, len(factors), figsize=(3.6 * len(factors), 7), squeeze=False)
        for j, f in enumerate(factors):
            vs = [v for v in V if v.startswith(f + "=")]
            panel(axes[0][j], vs, "ligs", "LIGS", lambda v: v.split("=", 1)[1])
            panel(axes[1][j], vs, "clean_acc", "clean accuracy (%)", lambda v: v.split("=", 1)[1], 100.0)
            axes[0][j].set_title(f)
            axes[0][j].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        save_figure(fig, run_dir / "fig8.png")


def claim_rows(records, useful_acc=0.9):
    """One row per run (variant, seed): its final epoch, plus ligs_change = final LIGS - epoch-0 LIGS (as P1 Fig 4 is
    read), and ligs_change_useful (ligs_dm_change_useful) = final LIGS - LIGS at the first epoch with clean accuracy
    >= `useful_acc` (None if reached only at the last epoch or never): a random-init network's LIGS says nothing
    about learned features, and at small scale it sits below a trained one's (DECISIONS.md D35)."""
    runs = {}
    for r in records:
        if "step" not in r:
            runs.setdefault((r["variant"], r["seed"]), []).append(r)
    out = []
    for rows in runs.values():
        rows = sorted(rows, key=lambda r: r["epoch"])
        first, last = rows[0], rows[-1]
        useful = next((r for r in rows[:-1] if r.get("clean_acc", 0.0) >= useful_acc), None)  # (a trend: >= 2 epochs)
        row = dict(last)
        for key, start in (("ligs", first), ("ligs", useful), ("ligs_dm", useful)):
            name = f"{key}_change" + ("_useful" if start is useful else "")
            ok = start is not None and last.get(key) is not None and start.get(key) is not None
            row[name] = last[key] - start[key] if ok else None
        out.append(row | dict(useful_epoch=None if useful is None else useful["epoch"]))
    return out


def write_outputs(run_dir, records, cfg):
    artifact, preset = cfg["artifact"], cfg["preset"]
    datasets = sorted({r["dataset"] for r in records})
    title = ARTIFACTS[artifact]["title"] + (FIG11_SUBSTITUTE if artifact == "fig11" and "imagenet100" in datasets else "")
    header = f"# {title} (preset {preset}, {', '.join(datasets)})"
    write_text_atomic(run_dir / "table.md", make_table(records, header))
    budgets = f" | robust acc: l2 PGD eps {cfg['eps']:g}, {cfg['attack_steps']} steps; error bars: SEM over seeds"
    make_figures(records, run_dir, artifact, header[2:] + budgets)
    write_claims(run_dir, CLAIMS[artifact], claim_rows(records, cfg.get("useful_acc", 0.9)), "# Claims: " + header[2:],
                 records, lambda r: f"{r['variant']} s{r['seed']}")


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "fig4", PRESETS, SKIPPED)
    g.add_argument("--norm", nargs="+", choices=list(NORMS), help="norms (fig4, fig2)")
    g.add_argument("--lambdas", nargs="+", type=float, help="fig5: regularizer weights")
    g.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS), help="fig8: factors to vary")
    g.add_argument("--dataset", choices=DATASETS + ("imagenet",), help="dataset (imagenet: fig11 only, streamed from "
                   "--data-root/imagenet/{train,val}/<wnid>/; imagenet100: its labelled 100-class substitute)")
    g.add_argument("--arch", help="base architecture")
    g.add_argument("--seeds", type=int, help="seeds per run (P1 reports one)")
    g = p.add_argument_group("training")
    g.add_argument("--training", nargs="+", choices=["standard", "adversarial"], help="fig4: standard and/or adversarial")
    g.add_argument("--width", type=float, help="channel multiplier of the base model")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--lr", type=float, help="initial learning rate")
    g.add_argument("--milestones", type=int, nargs="*", help="epochs where the LR is divided by 10")
    g.add_argument("--batch-size", type=int, help="SGD batch size")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up epochs")
    g.add_argument("--adv-eps", type=float, help="adversarial training: l2 PGD budget (DECISIONS.md D15)")
    g.add_argument("--adv-steps", type=int, help="adversarial training: PGD steps")
    g.add_argument("--adv-step-size", type=float, help="adversarial training: PGD step size")
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (unset: min(32, channels))")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--per-class", type=int, help="evaluation subset per class (P1 App. B.2: 100)")
    g.add_argument("--eps", type=float, help="l2 budget of the per-epoch robust accuracy (P1 App. B.2: 0.25)")
    g.add_argument("--attack-steps", type=int, help="its PGD steps, of 2.5*eps/steps each (P1 App. B.2: 10)")
    g.add_argument("--sigma", type=float, default=0.01, help="LIGS perturbation scale (P1 App. B.4); on inputs of "
                   "other than 3072 values LIGS is also measured at sigma * sqrt(3072 / d), the same noise norm (ligs_dm)")
    g.add_argument("--min-eps-iters", type=int, default=6, help="bisection halvings of each subset sample's minimal "
                   "PGD-ℓ2 budget, final model (0: not measured; DECISIONS.md D34)")
    g.add_argument("--min-eps-range", type=float, default=4.0, help="the bisection searches [0, RANGE x --eps]")
    g.add_argument("--useful-acc", type=float, default=0.9, help="LIGS trends are also measured from the first epoch "
                   "with at least this clean accuracy (DECISIONS.md D35)")
    g = add_run_flags(p, "exp_ligs_trend", unit="runs", data="the datasets",
                         cache="shared checkpoint cache: reuse a model (with its per-epoch measurements) trained with the "
                               "same data, model, recipe, measurements and seed")
    g.add_argument("--size", type=int, help="resize images to size x size (unset: the dataset's own; ImageNet's crop)")
    g.add_argument("--workers", type=int, default=4, help="ImageNet: DataLoader worker processes")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    if args.dataset == "imagenet" and args.artifact != "fig11":
        p.error(f"--dataset imagenet: only --artifact fig11 trains on ImageNet (not {args.artifact})")
    args.size = args.size or (224 if args.dataset == "imagenet" else None)
    check_numbers(p, args, at_least_one=("epochs", "batch_size", "attack_steps", "per_class", "seeds", "adv_steps", "size",
                                         "gn_groups", "milestones"),
                  positive=("width", "lr", "eps", "adv_eps", "adv_step_size", "sigma", "useful_acc", "min_eps_range"),
                  non_negative=("weight_decay", "warmup_epochs", "lambdas", "min_eps_iters", "workers"))
    return args


if __name__ == "__main__":
    run_script(main, get_args)
