"""Training stability vs feature robustness (P1 Sec. 4.4, App. H).

Fig 9: ResNet-20/56 with and without identity shortcuts (BN), and Fixup vs BN (ResNet-20): clean
accuracy, robust accuracy and LIGS per epoch. Figs 14-17: Santurkar et al.'s probes along the
gradient at regular training steps -- loss variation, l2 gradient change and effective
beta-smoothness -- for ResNet18 x five norms (14), VGG16 x norms (15), ResNet18-BN with vs without
shortcut (16) and Fixup vs BN on ResNet-20 and ResNet-56 (17, as its caption).

Quick results (update_readme.py writes this from results/quick/):
    python exp_landscape.py --preset quick --artifact fig14
        0 held / 1 reversed / 1 inconclusive / 0 underpowered
        P1 Fig 14: BN makes the ResNet18 landscape smoother than none (β-smoothness): +12.621 [+8.382, +16.859]
          (reversed)
    python exp_landscape.py --preset quick --artifact fig15
        0 held / 0 reversed / 5 inconclusive / 0 underpowered
        P1 Fig 15: BN makes the VGG16 landscape smoother than none (β-smoothness): -41.573 [-88.900, +5.754]
          (inconclusive)
    python exp_landscape.py --preset quick --artifact fig16
        0 held / 0 reversed / 0 inconclusive / 0 underpowered
    python exp_landscape.py --preset quick --artifact fig17
        0 held / 0 reversed / 4 inconclusive / 0 underpowered
        P1 Fig 17: Fixup gives less stable gradients than BN (resnet20, β-smoothness): +14.495 [-21.307, +50.297]
          (inconclusive)
    python exp_landscape.py --preset quick --artifact fig9
        0 held / 0 reversed / 1 inconclusive / 0 underpowered
        P1 Fig 9: BN gives lower LIGS than Fixup (ResNet-20): -0.009 [-0.066, +0.049] (inconclusive)

Run it:
    python exp_landscape.py --artifact fig14 --download     # paper preset, CIFAR-10
    python exp_landscape.py --preset quick --artifact fig9  # bundled digits, CPU; also fig14..fig17
    python exp_landscape.py --plot-only runs/exp_landscape/<run>

Probes (DECISIONS.md D17): on the step's own minibatch, step lengths lr x {0.5, 1, ..., 4}, every 20
steps during the first 10 epochs (paper preset), in train mode through common.landscape_probe, which
leaves parameters, optimizer state and BN running statistics bit-identical (tested). Training setup:
DECISIONS.md D14 (SGD 0.9, WD 5e-4, batch 128, LR 0.01, 150 epochs, /10 at 50 and 100, crop+flip).
The Fig 9 Fixup network is ResNet-20 (DECISIONS.md D17).
"""
import time

from common import (DATASETS, NORMS, Sweep, add_run_flags, build_dataset, cache_path, check_attack, check_numbers, claim,
                    class_balanced_subset, epoch_metrics, fast_layout, fmt_mean_sem, landscape_probe, log_to, make_model,
                    make_parser, mean_sem, merge_runs, parse_with_presets, pick_device, prepare_run_dir, print_config,
                    run_script, save_figure, set_seed, show, train_model, write_claims, write_config, write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

ARTIFACTS = {  # name -> title, runs ([(variant, arch, norm, shortcut)], measure: "epoch" metrics or "probe"s), claims
    "fig9": dict(title="P1 Fig 9: shortcuts (ResNet-20/56, BN) and Fixup vs BN (ResNet-20): accuracy and LIGS",
                 runs=dict(models=[("resnet20 shortcut", "resnet20", "bn", True),
                                   ("resnet20 no shortcut", "resnet20", "bn", False),
                                   ("resnet56 shortcut", "resnet56", "bn", True),
                                   ("resnet56 no shortcut", "resnet56", "bn", False),
                                   ("resnet20 fixup", "resnet20", "fixup", True)], measure="epoch")),
    "fig14": dict(title="P1 Fig 14: landscape of ResNet18 x norms",
                  runs=dict(models=[(n, "resnet18", n, True) for n in NORMS], measure="probe")),
    "fig15": dict(title="P1 Fig 15: landscape of VGG16 x norms",
                  runs=dict(models=[(n, "vgg16", n, True) for n in NORMS], measure="probe")),
    "fig16": dict(title="P1 Fig 16: landscape of ResNet18-BN with vs without shortcut",
                  runs=dict(models=[("shortcut", "resnet18", "bn", True), ("no shortcut", "resnet18", "bn", False)],
                            measure="probe")),  # P1: a trivial effect (not tested, see `claim`)
    "fig17": dict(title="P1 Fig 17: landscape of Fixup vs BN, ResNet-20 (top) and ResNet-56 (bottom)",
                  runs=dict(models=[(f"{a} {n}", a, n, True) for a in ("resnet20", "resnet56") for n in ("bn", "fixup")],
                            measure="probe")),
}

STEP_MULTIPLIERS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]  # x base LR (DECISIONS.md D17)


PRESETS = {  # DECISIONS.md D14 (training), D17 (probes)
    "paper": dict(dataset="cifar10", width=1.0, seeds=1, epochs=150, lr=0.1, milestones=[50, 100], batch_size=128,
                  weight_decay=5e-4, warmup_epochs=0.0, probe_every=20, probe_epochs=10, per_class=100, attack_steps=10,
                  eps=0.25, size=None, gn_groups=None),
    # Bundled digits with the exp_table1 quick recipe (batch 16, LR 0.02, 2 warm-up epochs: trains every norm);
    # ResNets see 16x16 digits, VGG16 32x32 (IN on 1x1 maps outputs a constant). ResNet-20/56 at width 0.5.
    # 10 epochs: Fixup ResNet-20 stays at chance for the first ~4 epochs (measured: 14 % train accuracy after 6).
    # 3 seeds, so that a difference can be told from seed noise (DECISIONS.md D35).
    "quick": dict(dataset="digits", width=0.125, seeds=3, epochs=10, lr=0.02, milestones=[5, 8], batch_size=16,
                  weight_decay=5e-4, warmup_epochs=2.0, probe_every=10, probe_epochs=10, per_class=20, attack_steps=10,
                  eps=1.0, size=None, gn_groups=2),
    "smoke": dict(dataset="synthetic", width=1 / 16, seeds=1, epochs=2, lr=0.05, milestones=[1], batch_size=32,
                  weight_decay=5e-4, warmup_epochs=0.0, probe_every=10, probe_epochs=2, per_class=5, attack_steps=3,
                  eps=0.25, size=None, gn_groups=2),
}


def resolve(preset, artifact):
    """The values that run for this preset (shown by --help, saved in config.json)."""
    return dict(PRESETS[preset])


# ================================================================================================
# 2. Experiment
# ================================================================================================

def input_size(args, arch):
    if args.size or args.dataset not in ("digits", "synthetic"):
        return args.size
    return 32 if arch.startswith("vgg") else 16  # VGG needs 32x32 for its five pools (see exp_table1)


def models(args):
    """The artifact's (variant, arch, norm, shortcut) models, restricted to --norm."""
    return [t for t in ARTIFACTS[args.artifact]["runs"]["models"] if args.norm is None or t[2] in args.norm]


def planned_runs(args):
    """(name, record fields) of every training run in a fixed order (the unit of --shard)."""
    return [(f"{v.replace(' ', '_')}_s{s}", dict(variant=v, seed=s)) for v, *_ in models(args) for s in range(args.seeds)]


def run_one(args, data, subset, variant, arch, norm, shortcut, seed, device, ckpt):
    """Train one model; Fig 9 measures every epoch, Figs 14-17 probe the landscape every k steps."""
    set_seed(seed)
    kind = ARTIFACTS[args.artifact]["runs"]["measure"]
    # ResNet-20/56 are already narrow (16-64 channels): they use min(1, 4 * width), i.e. 0.5 in the quick preset
    width = min(1.0, 4 * args.width) if arch in ("resnet20", "resnet56") else args.width
    kw = dict(gn_groups=args.gn_groups) if args.gn_groups else {}
    if not shortcut:
        kw["shortcut"] = False
    model = fast_layout(make_model(arch, norm=norm, width=width, num_classes=data.num_classes, in_channels=data.shape[0],
                                   mean=data.mean, std=data.std, **kw).to(device))
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, milestones=args.milestones,
                  weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, augment=args.dataset == "cifar10")
    steps = [m * args.lr for m in STEP_MULTIPLIERS]
    steps_per_epoch = -(-len(data.y_train) // args.batch_size)

    def on_step(step, m, x, y):
        if step % args.probe_every == 0 and step < args.probe_epochs * steps_per_epoch:
            return landscape_probe(m, x, y, steps)

    x_sub, y_sub = data.x_test[subset], data.y_test[subset]
    on_epoch = (lambda e, m: epoch_metrics(m, data.x_test, data.y_test, x_sub, y_sub, args.eps,
                                           args.attack_steps, args.sigma, seed)) if kind == "epoch" else None
    measure = dict(eps=args.eps, steps=args.attack_steps, per_class=args.per_class, sigma=args.sigma) if kind == "epoch" \
        else dict(probe_every=args.probe_every, probe_epochs=args.probe_epochs, step_multipliers=STEP_MULTIPLIERS)
    key = dict(dataset=args.dataset, size=input_size(args, arch), arch=arch, model=dict(norm=norm, width=width, **kw),
               recipe=recipe, seed=seed, amp=args.amp, measure=measure)  # everything behind the weights and the history
    res = train_model(model, data, recipe, seed=seed, ckpt=cache_path(args.cache, key) or ckpt, amp=args.amp,
                      on_epoch=on_epoch, on_step=on_step if kind == "probe" else None, tag=f"[{variant} s{seed}]", key=key,
                      ddp_bn=args.ddp_bn)
    base = dict(artifact=args.artifact, dataset=args.dataset, arch=arch, norm=norm, shortcut=shortcut, seed=seed,
                variant=variant, status=res["status"], reason=res["reason"])
    rows = [base | h for h in res["history"]]
    if kind == "epoch" and res["status"] == "ok":  # Carlini et al. 2019 checks of the robust-accuracy attack
        spec = dict(kind="pgd", norm="l2", eps=args.eps, steps=args.attack_steps, clip=(0.0, 1.0))
        rows[-1] |= {f"chk_pgd_l2_{k}": v for k, v in check_attack(model, x_sub, y_sub, spec, seed=seed).items()}
    return rows


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_landscape.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        print(f"redrew the table, claims and figure in {run_dir}")
        return
    device = pick_device(args.device)
    todo = models(args)
    datasets = {}
    for _, arch, _, _ in todo:
        size = input_size(args, arch)
        if size not in datasets:
            datasets[size] = build_dataset(args.dataset, args.data_root, device, args.download, size=size,
                                           n_train=1000 if args.dataset == "synthetic" else None)
    run_dir = prepare_run_dir("exp_landscape", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    print(f"run directory: {run_dir} | {len(todo)} models x {args.seeds} seed(s) | probe step lengths "
          f"{[round(m * args.lr, 4) for m in STEP_MULTIPLIERS]} every {args.probe_every} steps")
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    spec = {t[0]: t for t in todo}
    t0 = time.time()
    for _, name, r in sweep.todo():
        variant, arch, norm, shortcut = spec[r["variant"]]
        data = datasets[input_size(args, arch)]
        subset = class_balanced_subset(data.y_test, args.per_class)
        ckpt = run_dir / "ckpt" / f"{name}.pt"
        sweep.save(name, run_one(args, data, subset, variant, arch, norm, shortcut, r["seed"], device, ckpt))
    write_outputs(run_dir, sweep.records(), vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

def probe_claims(fig, bigger, smaller, text):
    return [claim(f"{fig}_{m}", f"P1 {fig.replace('fig', 'Fig ')}", f"{text} ({name})", "figure only", m,
                  dict(variant=smaller), dict(variant=bigger)) for m, name in (("beta", "β-smoothness"),
                                                                                ("gdiff_max", "gradient change"))]


CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "fig9": [claim("fig9_ligs", "P1 Fig 9", "BN gives lower LIGS than Fixup (ResNet-20)", "figure only", "ligs",
    dict(variant="resnet20 shortcut"), dict(variant="resnet20 fixup"))],
    "fig14": probe_claims("fig14", "none", "bn", "BN makes the ResNet18 landscape smoother than none"),
    "fig15": probe_claims("fig15", "none", "bn", "BN makes the VGG16 landscape smoother than none") + [
    claim(f"fig15_{n}_beta", "P1 Fig 15", f"{n.upper()} smooths less than BN (β-smoothness)",
          "figure only", "beta", dict(variant=n), dict(variant="bn"), ">") for n in ("in", "ln", "gn")],
    "fig16": [],
    "fig17": [
    claim(f"fig17_{a}_{m}", "P1 Fig 17", f"Fixup gives less stable gradients than BN ({a}, {name})",
          "figure only", m, dict(variant=f"{a} fixup"), dict(variant=f"{a} bn"), ">")
    for a in ("resnet20", "resnet56") for m, name in (("beta", "β-smoothness"), ("gdiff_max", "gradient change"))],
}

COLORS = dict(none="0.25", bn="C0", ln="C2", gn="C3", fixup="C4", **{"in": "C1"})


def series(records, variant, key, probes):
    rows = [r for r in records if r["variant"] == variant and key in r and ("step" in r) == probes and r[key] is not None]
    xs = sorted({r["step" if probes else "epoch"] for r in rows})
    stats = [mean_sem([r[key] for r in rows if r["step" if probes else "epoch"] == x]) for x in xs]
    return xs, [s[0] for s in stats]


def make_table(records, header, kind):
    variants = list(dict.fromkeys(r["variant"] for r in records))
    lines = [header, ""]
    if kind == "epoch":
        lines += ["Epoch 0 and final epoch (accuracy in %, LIGS as a cosine), mean ± SEM over seeds.", "",
                  "| variant | status | clean (ep 0) | LIGS (ep 0) | clean (final) | robust (final) | LIGS (final) |",
                  "|---|---|---|---|---|---|---|"]
        for v in variants:
            rows = [r for r in records if r["variant"] == v and "step" not in r]
            last = max(r["epoch"] for r in rows)
            at = lambda e, k, sc=100.0, d=1: fmt_mean_sem([r.get(k) for r in rows if r["epoch"] == e], sc, d)
            status = ",".join(sorted({r["status"] for r in rows}))
            lines.append(f"| {v} | {status} | {at(0, 'clean_acc')} | {at(0, 'ligs', 1.0, 3)} | {at(last, 'clean_acc')} | "
                         f"{at(last, 'robust_acc')} | {at(last, 'ligs', 1.0, 3)} |")
    else:
        lines += ["Mean over all probes (and seeds) of the loss range (max - min over step lengths), the largest l2",
                  "gradient change and the effective beta-smoothness; smaller = smoother, more predictive gradients.", "",
                  "| variant | status | probes | loss range | max gradient change | beta | final train acc |",
                  "|---|---|---|---|---|---|---|"]
        for v in variants:
            probes = [r for r in records if r["variant"] == v and "step" in r]
            epochs = [r for r in records if r["variant"] == v and "step" not in r and "train_acc" in r]
            status = ",".join(sorted({r["status"] for r in records if r["variant"] == v}))
            rng = [r["loss_max"] - r["loss_min"] for r in probes]
            lines.append(f"| {v} | {status} | {len(probes)} | {fmt_mean_sem(rng, 1.0, 3)} | "
                         f"{fmt_mean_sem([r['gdiff_max'] for r in probes], 1.0, 3)} | "
                         f"{fmt_mean_sem([r['beta'] for r in probes], 1.0, 2)} | "
                         f"{fmt_mean_sem([epochs[-1]['train_acc']] if epochs else [])} |")
    failed = {(r["variant"], r["seed"]): r["reason"] for r in records if r["status"] == "failed"}
    lines += [""] + [f"- failed: {v} seed {s}: {why}" for (v, s), why in failed.items()]
    return "\n".join(lines) + "\n"


def make_figure(records, path, title, kind):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = list(dict.fromkeys(r["variant"] for r in records))
    color = lambda v: COLORS.get(v.split()[-1], COLORS.get(v))
    if kind == "epoch":
        groups = [("shortcut", [v for v in variants if "fixup" not in v]),
                  ("Fixup vs BN", [v for v in variants if v in ("resnet20 shortcut", "resnet20 fixup")])]
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
        for j, (name, vs) in enumerate(groups):
            for i, (key, yl, sc) in enumerate([("clean_acc", "clean accuracy (%)", 100.0), ("ligs", "LIGS", 1.0)]):
                ax = axes[i][j]
                for v in vs:
                    xs, ys = series(records, v, key, probes=False)
                    ax.plot(xs, [sc * y for y in ys], marker="o", ms=3, label=v,
                            linestyle="--" if "no shortcut" in v else "-", color="C4" if "fixup" in v else None)
                ax.set_xlabel("epoch")
                ax.set_ylabel(yl)
                ax.grid(alpha=0.3)
            axes[0][j].set_title(name)
            axes[0][j].legend(fontsize=8)
    else:  # one row per architecture where the variants name one (Fig 17: ResNet-20 top, ResNet-56 bottom)
        arch_of = lambda v: v.split()[0] if v.startswith("resnet") else ""
        rows = list(dict.fromkeys(arch_of(v) for v in variants))
        fig, axes = plt.subplots(len(rows), 3, figsize=(16, 4 * len(rows)), squeeze=False)
        for v in variants:
            xs, lo = series(records, v, "loss_min", probes=True)
            _, hi = series(records, v, "loss_max", probes=True)
            _, glo = series(records, v, "gdiff_min", probes=True)
            _, ghi = series(records, v, "gdiff_max", probes=True)
            _, beta = series(records, v, "beta", probes=True)
            if not xs:
                continue
            c, row = color(v), axes[rows.index(arch_of(v))]
            row[0].fill_between(xs, lo, hi, alpha=0.35, color=c, label=v)
            row[1].fill_between(xs, glo, ghi, alpha=0.35, color=c, label=v)
            row[2].plot(xs, beta, color=c, label=v)
        ylabels = ["loss landscape (range over step lengths)", "l2 gradient change", "effective β-smoothness"]
        for row in axes:
            for ax, yl in zip(row, ylabels):
                ax.set_xlabel("training step")
                ax.set_ylabel(yl)
                ax.grid(alpha=0.3)
            row[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def claim_rows(records, kind):
    """One row per run (variant, seed): Fig 9 its final epoch; Figs 14-17 its probes' means of loss_range,
    gdiff_max and beta."""
    runs = {}
    for r in records:
        runs.setdefault((r["variant"], r["seed"]), []).append(r)
    out = []
    for rows in runs.values():
        epochs = sorted((r for r in rows if "step" not in r), key=lambda r: r["epoch"])
        probes = [r for r in rows if "step" in r]
        row = dict(epochs[-1])
        if kind == "probe" and probes:
            row |= dict(loss_range=mean_sem([r["loss_max"] - r["loss_min"] for r in probes])[0],
                        gdiff_max=mean_sem([r["gdiff_max"] for r in probes])[0], beta=mean_sem([r["beta"] for r in probes])[0])
        out.append(row)
    return out


def write_outputs(run_dir, records, cfg):
    artifact, preset = cfg["artifact"], cfg["preset"]
    title, kind = ARTIFACTS[artifact]["title"], ARTIFACTS[artifact]["runs"]["measure"]
    header = f"# {title} (preset {preset}, {', '.join(sorted({r['dataset'] for r in records}))})"
    write_text_atomic(run_dir / "table.md", make_table(records, header, kind))
    budget = f" | robust acc: l2 PGD eps {cfg['eps']:g}" if kind == "epoch" and "eps" in cfg else ""
    make_figure(records, run_dir / f"{artifact}.png", header[2:] + budget, kind)
    write_claims(run_dir, CLAIMS[artifact], claim_rows(records, kind), "# Claims: " + header[2:], records,
                 lambda r: f"{r['variant']} s{r['seed']}")


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "fig14", PRESETS)
    g.add_argument("--norm", nargs="+", choices=list(NORMS) + ["fixup"], help="narrow the compared norms")
    g.add_argument("--dataset", choices=DATASETS, help="dataset")
    g.add_argument("--seeds", type=int, help="seeds per model")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=float, help="channel multiplier (ResNet-20/56 use min(1, 4x this))")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--lr", type=float, help="initial learning rate")
    g.add_argument("--milestones", type=int, nargs="*", help="epochs where the LR is divided by 10")
    g.add_argument("--batch-size", type=int, help="SGD batch size")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up epochs")
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (unset: min(32, channels))")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--probe-every", type=int, help="probe every k optimizer steps")
    g.add_argument("--probe-epochs", type=int, help="probe during the first k epochs")
    g.add_argument("--per-class", type=int, help="Fig 9 evaluation subset per class (P1 App. B.2: 100)")
    g.add_argument("--eps", type=float, help="Fig 9: l2 budget of the robust accuracy (P1 App. B.2: 0.25)")
    g.add_argument("--attack-steps", type=int, help="Fig 9: its PGD steps, of 2.5*eps/steps each")
    g.add_argument("--sigma", type=float, default=0.01, help="LIGS perturbation scale (P1 App. B.4)")
    g = add_run_flags(p, "exp_landscape", unit="runs", data="the datasets",
                         cache="shared checkpoint cache: reuse a model (with its per-epoch measurements) trained with the "
                               "same data, model, recipe, measurements and seed",
                         outputs="table.md, claims.md and the figure")
    g.add_argument("--size", type=int, help="resize images (unset: digits 32 for VGG, 16 for ResNets)")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("epochs", "batch_size", "probe_every", "probe_epochs", "per_class", "seeds",
                                         "attack_steps", "size", "gn_groups", "milestones"),
                  positive=("width", "lr", "eps", "sigma"), non_negative=("weight_decay", "warmup_epochs"))
    if args.norm and not any(t[2] in args.norm for t in ARTIFACTS[args.artifact]["runs"]["models"]):
        p.error(f"--norm {' '.join(args.norm)}: {args.artifact} compares "
                f"{sorted({t[2] for t in ARTIFACTS[args.artifact]['runs']['models']})}")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
