"""Training stability vs feature robustness (P1 Sec. 4.4, App. H; SPEC §7).

Fig 9: ResNet-20/56 with and without identity shortcuts (BN), and Fixup vs BN (ResNet-20): clean
accuracy, robust accuracy and LIGS per epoch. Figs 14-17: Santurkar et al.'s probes along the
gradient at regular training steps -- loss variation, l2 gradient change and effective
beta-smoothness -- for ResNet18 x five norms (14), VGG16 x norms (15), ResNet18-BN with vs without
shortcut (16) and Fixup vs BN ResNet18 (17).

    python exp_landscape.py --artifact fig14 --download     # paper preset, CIFAR-10
    python exp_landscape.py --preset quick --artifact fig9  # bundled digits, CPU; also fig14..fig17
    python exp_landscape.py --plot-only runs/exp_landscape/<run>

Probes (SPEC 2.4, A17): on the step's own minibatch, step lengths lr x {0.5, 1, ..., 4}, every 20
steps during the first 10 epochs (paper preset), in train mode through common.landscape_probe, which
leaves parameters, optimizer state and BN running statistics bit-identical (tested). Training setup:
SPEC §5.1 [DEFAULT] (SGD 0.9, WD 5e-4, batch 128, LR 0.01, 150 epochs, /10 at 50 and 100, crop+flip).
The Fig 9 Fixup network is ResNet-20 (SPEC A18).
"""
import argparse
import pathlib
import sys
import time

from common import (NORMS, DataError, apply_preset, build_dataset, class_balanced_subset, epoch_metrics, fmt_mean_sem,
                    landscape_probe, load_records, load_run_config, make_model, mean_sem, pick_device, prepare_run_dir,
                    print_config, save_records, set_seed, train_model, write_config, write_text_atomic)

# ================================================================================================
# Args: artifacts (the compared models) and presets
# ================================================================================================

ARTIFACTS = {  # name -> (title, [(variant, arch, norm, shortcut)], measure: "epoch" metrics or "probe"s)
    "fig9": ("P1 Fig 9: shortcuts (ResNet-20/56, BN) and Fixup vs BN (ResNet-20): accuracy and LIGS", [
        ("resnet20 shortcut", "resnet20", "bn", True), ("resnet20 no shortcut", "resnet20", "bn", False),
        ("resnet56 shortcut", "resnet56", "bn", True), ("resnet56 no shortcut", "resnet56", "bn", False),
        ("resnet20 fixup", "resnet20", "fixup", True)], "epoch"),
    "fig14": ("P1 Fig 14: landscape of ResNet18 x norms", [(n, "resnet18", n, True) for n in NORMS], "probe"),
    "fig15": ("P1 Fig 15: landscape of VGG16 x norms", [(n, "vgg16", n, True) for n in NORMS], "probe"),
    "fig16": ("P1 Fig 16: landscape of ResNet18-BN with vs without shortcut", [
        ("shortcut", "resnet18", "bn", True), ("no shortcut", "resnet18", "bn", False)], "probe"),
    "fig17": ("P1 Fig 17: landscape of Fixup vs BN ResNet18", [
        ("bn", "resnet18", "bn", True), ("fixup", "resnet18", "fixup", True)], "probe"),
}
STEP_MULTIPLIERS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]  # x base LR (SPEC A17: 0.05..0.4 at LR 0.1)

PRESETS = {
    "paper": dict(dataset="cifar10", width=1.0, seeds=1, epochs=150, lr=0.01, milestones=[50, 100], batch_size=128,
                  weight_decay=5e-4, warmup_epochs=0.0, probe_every=20, probe_epochs=10, per_class=100, attack_steps=10,
                  eps_scale=1.0, size=None, gn_groups=None),
    # Bundled digits with the exp_table1 quick recipe (batch 16, LR 0.02, 2 warm-up epochs: trains every norm);
    # ResNets see 16x16 digits, VGG16 32x32 (IN on 1x1 maps outputs a constant). ResNet-20/56 at width 0.5.
    # 10 epochs: Fixup ResNet-20 stays at chance for the first ~4 epochs (measured: 14 % train accuracy after 6).
    "quick": dict(dataset="digits", width=0.125, seeds=1, epochs=10, lr=0.02, milestones=[5, 8], batch_size=16,
                  weight_decay=5e-4, warmup_epochs=2.0, probe_every=10, probe_epochs=10, per_class=20, attack_steps=10,
                  eps_scale=4.0, size=None, gn_groups=2),
    "smoke": dict(dataset="synthetic", width=1 / 16, seeds=1, epochs=2, lr=0.05, milestones=[1], batch_size=32,
                  weight_decay=5e-4, warmup_epochs=0.0, probe_every=10, probe_epochs=2, per_class=5, attack_steps=3,
                  eps_scale=1.0, size=None, gn_groups=2),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--artifact", default="fig14", choices=sorted(ARTIFACTS), help="figure to reproduce")
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="paper settings, quick (digits, CPU) or smoke")
    p.add_argument("--norm", nargs="+", default=None, choices=list(NORMS) + ["fixup"], help="narrow the compared norms")
    p.add_argument("--dataset", default=None, choices=["cifar10", "svhn", "mnist", "digits", "synthetic"])
    p.add_argument("--width", type=float, default=None, help="channel multiplier (ResNet-20/56 use 4x this, 0.5 in quick)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (SPEC A3: 150)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (SPEC A3: 0.01)")
    p.add_argument("--milestones", type=int, nargs="*", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--probe-every", type=int, default=None, help="probe every k optimizer steps (SPEC A17: 20)")
    p.add_argument("--probe-epochs", type=int, default=None, help="probe during the first k epochs (SPEC A17: 10)")
    p.add_argument("--per-class", type=int, default=None, help="Fig 9 evaluation subset per class (P1: 100)")
    p.add_argument("--attack-steps", type=int, default=None)
    p.add_argument("--eps-scale", type=float, default=None)
    p.add_argument("--sigma", type=float, default=0.01, help="LIGS perturbation scale")
    p.add_argument("--size", type=int, default=None, help="resize images (digits: 32 for VGG, 16 for ResNets)")
    p.add_argument("--gn-groups", type=int, default=None)
    p.add_argument("--data-root", default="data")
    p.add_argument("--download", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--out", default=None, help="run directory (default runs/exp_landscape/<timestamp>)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--plot-only", metavar="RUN_DIR", default=None)
    args = p.parse_args(argv)
    if args.plot_only:
        return args
    apply_preset(args, PRESETS)
    for name in ("epochs", "batch_size", "probe_every", "per_class", "seeds", "attack_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ================================================================================================
# Experiment-local helpers
# ================================================================================================

def input_size(args, arch):
    if args.size or args.dataset not in ("digits", "synthetic"):
        return args.size
    return 32 if arch.startswith("vgg") else 16  # VGG needs 32x32 for its five pools (see exp_table1)


def run_one(args, data, subset, variant, arch, norm, shortcut, seed, device, ckpt):
    """Train one model; Fig 9 measures every epoch, Figs 14-17 probe the landscape every k steps."""
    set_seed(seed)
    kind = ARTIFACTS[args.artifact][2]
    # ResNet-20/56 are already narrow (16-64 channels): they use min(1, 4 * width), i.e. 0.5 in the quick preset
    width = min(1.0, 4 * args.width) if arch in ("resnet20", "resnet56") else args.width
    kw = dict(gn_groups=args.gn_groups) if args.gn_groups else {}
    if not shortcut:
        kw["shortcut"] = False
    model = make_model(arch, norm=norm, width=width, num_classes=data.num_classes, in_channels=data.shape[0],
                       mean=data.mean, std=data.std, **kw).to(device)
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, milestones=args.milestones,
                  weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, augment=args.dataset == "cifar10")
    steps = [m * args.lr for m in STEP_MULTIPLIERS]
    steps_per_epoch = -(-len(data.y_train) // args.batch_size)

    def on_step(step, m, x, y):
        if step % args.probe_every == 0 and step < args.probe_epochs * steps_per_epoch:
            return landscape_probe(m, x, y, steps)

    x_sub, y_sub = data.x_test[subset], data.y_test[subset]
    on_epoch = (lambda e, m: epoch_metrics(m, data.x_test, data.y_test, x_sub, y_sub, 0.25 * args.eps_scale,
                                           args.attack_steps, args.sigma, seed)) if kind == "epoch" else None
    res = train_model(model, data, recipe, seed=seed, ckpt=ckpt, amp=args.amp, on_epoch=on_epoch,
                      on_step=on_step if kind == "probe" else None, tag=f"[{variant} s{seed}]")
    base = dict(artifact=args.artifact, dataset=args.dataset, arch=arch, norm=norm, shortcut=shortcut, seed=seed,
                variant=variant, status=res["status"], reason=res["reason"])
    return [base | h for h in res["history"]]


# ================================================================================================
# Table and figures (regenerated from results.json by --plot-only)
# ================================================================================================

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
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4), squeeze=False)
        for v in variants:
            xs, lo = series(records, v, "loss_min", probes=True)
            _, hi = series(records, v, "loss_max", probes=True)
            _, glo = series(records, v, "gdiff_min", probes=True)
            _, ghi = series(records, v, "gdiff_max", probes=True)
            _, beta = series(records, v, "beta", probes=True)
            if not xs:
                continue
            c = color(v)
            axes[0][0].fill_between(xs, lo, hi, alpha=0.35, color=c, label=v)
            axes[0][1].fill_between(xs, glo, ghi, alpha=0.35, color=c, label=v)
            axes[0][2].plot(xs, beta, color=c, label=v)
        ylabels = ["loss landscape (range over step lengths)", "l2 gradient change", "effective β-smoothness"]
        for ax, yl in zip(axes[0], ylabels):
            ax.set_xlabel("training step")
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(run_dir, records, artifact, preset):
    title, _, kind = ARTIFACTS[artifact]
    header = f"# {title} (preset {preset}, {', '.join(sorted({r['dataset'] for r in records}))})"
    write_text_atomic(run_dir / "table.md", make_table(records, header, kind))
    make_figure(records, run_dir / f"{artifact}.png", header[2:], kind)


# ================================================================================================
# Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir = pathlib.Path(args.plot_only)
        cfg = load_run_config(run_dir, "exp_landscape.py")
        write_outputs(run_dir, load_records(run_dir), cfg["artifact"], cfg["preset"])
        print(f"redrew the table and figure in {run_dir}")
        return
    print_config(args)
    device = pick_device(args.device)
    todo = [t for t in ARTIFACTS[args.artifact][1] if args.norm is None or t[2] in args.norm]
    datasets = {}
    for _, arch, _, _ in todo:
        size = input_size(args, arch)
        if size not in datasets:
            datasets[size] = build_dataset(args.dataset, args.data_root, device, args.download, size=size,
                                           n_train=1000 if args.dataset == "synthetic" else None)
    run_dir = prepare_run_dir("exp_landscape", args.out, args.resume)
    write_config(run_dir, args, __file__, device)
    print(f"run directory: {run_dir} | {len(todo)} models x {args.seeds} seed(s) | probe step lengths "
          f"{[round(m * args.lr, 4) for m in STEP_MULTIPLIERS]} every {args.probe_every} steps")
    records = load_records(run_dir) if args.resume and (run_dir / "results.json").exists() else []
    done = {(r["variant"], r["seed"]) for r in records}
    t0 = time.time()
    for variant, arch, norm, shortcut in todo:
        data = datasets[input_size(args, arch)]
        subset = class_balanced_subset(data.y_test, args.per_class)
        for seed in range(args.seeds):
            if (variant, seed) in done:
                continue
            ckpt = run_dir / "ckpt" / f"{variant.replace(' ', '_')}_s{seed}.pt"
            records += run_one(args, data, subset, variant, arch, norm, shortcut, seed, device, ckpt)
            save_records(run_dir, records, finished=False)
    save_records(run_dir, records, finished=True)
    write_outputs(run_dir, records, args.artifact, args.preset)
    print((run_dir / "table.md").read_text())
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    try:
        main(get_args())
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")
