"""Depth x batch size for fully connected ReLU nets with and without BN (P2 Figs 2, 3, 5).

Every cell of a depth x batch-size grid trains a constant-width ReLU MLP (Linear -> [BN] -> ReLU) with
plain SGD at a learning rate proportional to the batch size (eta = c * B, P2/Yang et al.: c = 1e-5),
BN epsilon 1e-3. Heatmaps of clean, noise (N(0, 1/4)) and BIM accuracy, failed cells marked, with
Yang et al.'s maximum trainable depth 16 / ln lambda_G(B) drawn over the BN panels (DECISIONS.md D21).
Fig 3: the plug-in entropy of the 7-bit-quantized softmax output on the training set (I(X;T) = H(T))
with Paninski's interval. The grid runs cell by cell; --resume continues an interrupted sweep.

Quick results (update_readme.py writes this from results/quick/):
    python exp_depth_batch.py --preset quick
        2 held / 0 reversed / 5 inconclusive / 0 underpowered
        P2 Figs 2, 5: At trainable depths BN nets are less robust to BIM than unnormalized ones (cells >= 90 % clean,
          pooled over depths): -9.9 [-15.6, -4.3] (held)
    python exp_depth_batch.py --preset quick --artifact fig5a
        1 held / 0 reversed / 6 inconclusive / 0 underpowered
        P2 Figs 2, 5: At trainable depths BN nets are less robust to BIM than unnormalized ones (cells >= 90 % clean,
          pooled over depths): -7.0 [-13.2, -0.7] (held)
    python exp_depth_batch.py --preset quick --artifact fig5b
        0 held / 0 reversed / 7 inconclusive / 0 underpowered
        P2 Figs 2, 5: At trainable depths BN nets are less robust to BIM than unnormalized ones (cells >= 90 % clean,
          pooled over depths): +2.4 [-1.4, +6.2] (inconclusive)

Run it:
    python exp_depth_batch.py --preset quick                 # digits, a reduced grid, 3 seeds, CPU (~7 min)
    python exp_depth_batch.py --dataset mnist --download     # paper preset: depths 10..60 x batch 5..500
    python exp_depth_batch.py --artifact fig5b               # both nets 40 epochs (fig5a: 10; fig2: BN 10 / none 40)

Settings the paper leaves open (DECISIONS.md D21): width 384, depths 10, 15, ..., 60, batches 5, 10, 15,
20, 50, 100, 200, 500; BIM eps 0.1, 20 steps of 0.01 (standardized units, no clipping); SGD without
momentum; after training, the BN running statistics are recomputed exactly over the training set
(cumulative average, one pass).
"""
import functools
import math
import time

import torch

from common import (Data, Sweep, add_run_flags, bim, build_dataset, check_attack, check_numbers, claim, cumulative_bn_stats,
                    entropy_ci_bits, eval_mode, evaluate, log_to, make_model, make_parser, max_trainable_depth, mean_sem,
                    median_minimal_eps, merge_runs, parse_with_presets, pick_device, prepare_run_dir, print_config,
                    quantized_entropy_bits, run_script, save_figure, set_seed, show, train_model, write_claims, write_config,
                    write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

ARTIFACTS = {  # name -> title, runs ((BN, none) epochs of each figure), claims
    "fig2": dict(title="P2 Figs 2/3: depth x batch, BN 10 epochs / none 40", runs=dict(epochs=(10, 40))),
    "fig5a": dict(title="P2 Fig 5(a): depth x batch, 10 epochs each", runs=dict(epochs=(10, 10))),
    "fig5b": dict(title="P2 Fig 5(b): depth x batch, 40 epochs each", runs=dict(epochs=(40, 40))),
}

PRESETS = {  # DECISIONS.md D21
    "paper": dict(dataset="mnist", depths=list(range(10, 61, 5)), batches=[5, 10, 15, 20, 50, 100, 200, 500], width=384,
                  lr_per_sample=1e-5, seeds=3, n_eval=None, epoch_scale=1.0),
    # Digits (1,500 training images) give ~40x fewer steps per epoch than MNIST, so c = 1e-3 (DECISIONS.md D23) and a
    # reduced grid with width 64 to fit a CPU, 3 seeds as the paper (DECISIONS.md D35); epochs as in the paper's figure.
    "quick": dict(dataset="digits", depths=[2, 6, 10, 20, 30, 40], batches=[8, 32, 128], width=64, lr_per_sample=1e-3,
                  seeds=3, n_eval=None, epoch_scale=1.0),
    "smoke": dict(dataset="digits", depths=[2, 6], batches=[8, 32], width=16, lr_per_sample=1e-3, seeds=1, n_eval=100,
                  epoch_scale=0.1, min_eps_iters=2),
}


def resolve(preset, artifact):
    """The values that run for this preset (shown by --help, saved in config.json)."""
    return dict(PRESETS[preset])


# ================================================================================================
# 2. Experiment
# ================================================================================================

def standardized(args, device):
    d = build_dataset(args.dataset, args.data_root, device, args.download)
    m, s = d.mean[0], d.std[0]
    x_tr, x_te = ((d.x_train - m) / s).flatten(1), ((d.x_test - m) / s).flatten(1)
    return Data(args.dataset, x_tr, d.y_train, x_te[: args.n_eval], d.y_test[: args.n_eval], (0.0,), (1.0,))


@torch.no_grad()
def recompute_bn_stats(model, x, batch_size):
    """Exact BN running statistics over the training set: reset, then the cumulative average (BN momentum None)
    over one train-mode pass in batches of the training batch size (DECISIONS.md D21); a last batch of one sample
    is left out (BN has no batch variance of one sample)."""
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    cumulative_bn_stats(model, [xb for xb in x.split(batch_size) if len(xb) > 1], bns)
    model.eval()


def planned_runs(args):
    """Every cell of the grid as (name, record fields) in a fixed order (the unit --shard distributes)."""
    return [(f"{n}_L{d}_B{b}_s{s}", dict(norm=n, depth=d, batch=b, seed=s))
            for n in ("bn", "none") for d in args.depths for b in args.batches for s in range(args.seeds)]


def run_one(args, data, norm, depth, batch, seed, device, ckpt):
    epochs_bn, epochs_none = ARTIFACTS[args.artifact]["runs"]["epochs"]
    epochs = max(1, round((epochs_bn if norm == "bn" else epochs_none) * args.epoch_scale))
    set_seed(seed)
    model = make_model("mlp", norm=norm, in_dim=data.x_train.shape[1], hidden=[args.width] * depth,
                       bn_eps=args.bn_eps).to(device)
    recipe = dict(epochs=epochs, batch_size=batch, lr=args.lr_per_sample * batch, momentum=0.0, weight_decay=0.0)
    res = train_model(model, data, recipe, seed=seed, ckpt=ckpt, log=lambda s: None, amp=args.amp, ddp_bn=args.ddp_bn)
    rec = dict(artifact=args.artifact, dataset=args.dataset, norm=norm, depth=depth, batch=batch, seed=seed, epochs=epochs,
               lr=recipe["lr"], status=res["status"], reason=res["reason"])
    if res["status"] != "ok":
        return rec
    if norm == "bn":
        recompute_bn_stats(model, data.x_train, batch)
    specs = dict(clean=dict(kind="clean"), noise=dict(kind="noise", sigma=math.sqrt(args.noise_var)),
                 bim=dict(kind="bim", eps=args.bim_eps, steps=args.bim_steps, step_size=args.bim_step, clip=None))
    rec |= {f"acc_{k}": v for k, v in evaluate(model, data.x_test, data.y_test, specs, seed=seed).items()}
    rec |= {f"chk_bim_{k}": v for k, v in check_attack(model, data.x_test, data.y_test, specs["bim"], seed=seed).items()}
    if args.min_eps_iters:  # budget-free (DECISIONS.md D34): each test sample's minimal BIM budget, the step scaled with it
        ratio = args.bim_step / args.bim_eps
        attack = lambda xb, yb, e: bim(model, xb, yb, e, args.bim_steps, step_size=e * ratio, clip=None)
        rec["min_eps_bim"], rec["min_eps_bim_censored"] = median_minimal_eps(
            model, data.x_test, data.y_test, attack, args.min_eps_range * args.bim_eps, iters=args.min_eps_iters)
    with torch.no_grad(), eval_mode(model):
        probs = torch.cat([model(xb).softmax(1) for xb in data.x_train.split(2000)]).cpu()
    rec["entropy_bits"] = quantized_entropy_bits(probs, bits=7)  # P2 Fig 3: H(T) of the 7-bit softmax output
    return rec


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_depth_batch.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        print(f"redrew the table, claims and figures in {run_dir}")
        return
    device = pick_device(args.device)
    data = standardized(args, device)
    args.n_train = len(data.y_train)
    run_dir = prepare_run_dir("exp_depth_batch", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    todo = sweep.todo()
    print(f"run directory: {run_dir} | {len(sweep.runs)} cells, {len(sweep.mine())} in this process, {len(todo)} to do "
          f"| d = {data.x_train.shape[1]}")
    t0 = time.time()
    for i, name, c in todo:
        ckpt = run_dir / "ckpt" / f"{name}.pt"
        rec = run_one(args, data, c["norm"], c["depth"], c["batch"], c["seed"], device, ckpt)
        sweep.save(name, [rec])  # cell by cell: an interrupted sweep resumes here
        accs = " ".join(f"{k[4:]} {v:.3f}" for k, v in rec.items() if k.startswith("acc_"))
        print(f"[{i + 1}/{len(sweep.runs)}] {name}: {rec['status']} {accs} ({time.time() - t0:.0f}s)")
    write_outputs(run_dir, sweep.records(), vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

claim_pp = functools.partial(claim, scale=100.0)  # accuracies: effects in percentage points
GRID_CLAIMS = [
    claim_pp("grid_bim", "P2 Figs 2, 5", "At trainable depths BN nets are less robust to BIM than unnormalized ones "
          "(cells >= 90 % clean, pooled over depths)", "figure only", "acc_bim", dict(norm="bn", trained=True),
          dict(norm="none", trained=True), per=("batch",)),
    claim("grid_bim_mineps", "P2 Figs 2, 5", "At trainable depths BN nets need a smaller BIM budget than unnormalized "
          "ones (median minimal budget; cells >= 90 % clean, pooled over depths)", "— (budget-free)", "min_eps_bim",
          dict(norm="bn", trained=True), dict(norm="none", trained=True), per=("batch",)),
    claim_pp("grid_bn_batch", "P2 Fig 2", "BN's BIM accuracy falls as the batch size grows (largest vs smallest B, "
          "trained cells)", "figure only", "acc_bim", dict(norm="bn", trained=True, largest_batch=True),
          dict(norm="bn", trained=True, smallest_batch=True)),
]

CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "fig2": GRID_CLAIMS,
    "fig5a": GRID_CLAIMS,
    "fig5b": GRID_CLAIMS,
}


def cell_stats(records, norm, depth, batch, key):
    rs = [r for r in records if (r["norm"], r["depth"], r["batch"]) == (norm, depth, batch)]
    ok = [r[key] for r in rs if r["status"] == "ok"]
    return (mean_sem(ok)[0] if ok else None), len(rs) - len(ok), len(rs)


def plot_grid(records, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    depths = sorted({r["depth"] for r in records})
    batches = sorted({r["batch"] for r in records})
    metrics = [("acc_clean", "clean"), ("acc_noise", "noise"), ("acc_bim", "BIM")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8), squeeze=False)
    for i, norm in enumerate(("bn", "none")):
        for j, (key, name) in enumerate(metrics):
            ax = axes[i][j]
            grid = np.full((len(depths), len(batches)), np.nan)
            for a, d in enumerate(depths):
                for b, bs in enumerate(batches):
                    v, n_failed, n = cell_stats(records, norm, d, bs, key)
                    if v is not None:
                        grid[a, b] = 100 * v
                    if n and n_failed == n:
                        ax.text(b, a, "x", ha="center", va="center", color="red", fontsize=12)  # every seed failed
            im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=100, cmap="viridis")
            ax.set_xticks(range(len(batches)), batches)
            ax.set_yticks(range(len(depths)), depths)
            ax.set_xlabel("batch size")
            ax.set_ylabel("depth (hidden layers)")
            ax.set_title(f"{'BN' if norm == 'bn' else 'no BN'}: {name} accuracy (%)")
            if norm == "bn":  # Yang et al.'s depth limit, on the depth axis by linear interpolation of the rows
                xs = [b for b, bs in enumerate(batches) if bs > 3]
                ys = [np.interp(max_trainable_depth(batches[b]), depths, range(len(depths))) for b in xs]
                ax.plot(xs, ys, "w--", lw=2, label="16 / ln λ_G(B)")
                ax.legend(fontsize=7, loc="upper right")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_entropy(records, path, n_train, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ci = entropy_ci_bits(n_train, bits=7, n_classes=10)
    depths = sorted({r["depth"] for r in records})
    for norm, style in (("bn", "-"), ("none", ":")):
        for k, bs in enumerate(sorted({r["batch"] for r in records})):
            vals = [cell_stats(records, norm, d, bs, "entropy_bits")[0] for d in depths]
            pts = [(d, v) for d, v in zip(depths, vals) if v is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=ci, linestyle=style, marker="o", ms=3,
                            capsize=2, color=f"C{k}", label=f"{norm}, B={bs}")
    ax.axhline(math.log2(10), color="gray", lw=0.8)
    ax.axhline(math.log2(n_train), color="gray", lw=0.8)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("Î(X;T) = Ĥ(T), bits")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


def make_table(records, cfg):
    depths = sorted({r["depth"] for r in records})
    batches = sorted({r["batch"] for r in records})
    lines = [f"# P2 Figs 2/3/5 grid ({cfg['artifact']}, preset {cfg['preset']}, {cfg['dataset']}, width {cfg['width']}, "
             f"eta = {cfg['lr_per_sample']:g} x B)", "",
             "Accuracy (%) clean / noise / BIM per cell, mean over successful seeds; 'x' = every seed failed to train.",
             "Yang et al.'s depth limit 16/ln lambda_G(B): " + ", ".join(f"B={b}: {max_trainable_depth(b):.1f}"
                                                                        for b in batches if b > 3), ""]
    for norm in ("bn", "none"):
        lines += [f"## {'BN' if norm == 'bn' else 'no BN'}", "", "| depth | " + " | ".join(f"B={b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for d in depths:
            cells = []
            for b in batches:
                vals = [cell_stats(records, norm, d, b, k) for k in ("acc_clean", "acc_noise", "acc_bim", "entropy_bits")]
                if vals[0][2] == 0:
                    cells.append("")
                elif vals[0][0] is None:
                    cells.append("x")
                else:
                    cells.append(" / ".join(f"{100 * v[0]:.0f}" for v in vals[:3]) + f" ({vals[3][0]:.1f} b)")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("(b) = plug-in entropy of the 7-bit softmax output on the training set, bits (P2 Fig 3); "
                 f"Paninski half-width ±{entropy_ci_bits(cfg.get('n_train', 60000)):.2f} bits.")
    return "\n".join(lines) + "\n"


def write_outputs(run_dir, records, cfg):
    write_text_atomic(run_dir / "table.md", make_table(records, cfg))
    title = f"P2 Fig {'2' if cfg['artifact'] == 'fig2' else '5'} ({cfg['artifact']}, {cfg['dataset']}, preset {cfg['preset']})"
    plot_grid(records, run_dir / "heatmaps.png", title)
    plot_entropy(records, run_dir / "entropy.png", cfg.get("n_train", 60000), "P2 Fig 3: plug-in entropy of the output")
    batches = [r["batch"] for r in records]
    rows = [r | dict(trained=r.get("acc_clean", 0) >= 0.9, largest_batch=r["batch"] == max(batches),
                     smallest_batch=r["batch"] == min(batches)) for r in records]
    write_claims(run_dir, CLAIMS[cfg["artifact"]], rows, "# Claims: " + title, records,
                 lambda r: f"{r['norm']} L={r['depth']} B={r['batch']} s{r['seed']}")


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "fig2", PRESETS)
    g.add_argument("--dataset", choices=["mnist", "digits"], help="dataset")
    g.add_argument("--depths", type=int, nargs="+", help="numbers of hidden layers L")
    g.add_argument("--batches", type=int, nargs="+", help="batch sizes B")
    g.add_argument("--seeds", type=int, help="seeds per cell (P2: 3)")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=int, help="hidden width (P2/Yang: 384)")
    g.add_argument("--lr-per-sample", type=float, help="c in eta = c * B (P2: 1e-5)")
    g.add_argument("--epoch-scale", type=float, help="multiply the figure's epochs (smoke runs)")
    g.add_argument("--bn-eps", type=float, default=1e-3, help="BN epsilon c (P2: 1e-3)")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--n-eval", type=int, help="test samples evaluated (unset: all)")
    g.add_argument("--noise-var", type=float, default=0.25, help="Gaussian noise variance (DECISIONS.md D19)")
    g.add_argument("--bim-eps", type=float, default=0.1, help="BIM budget, standardized units (P2: 0.1)")
    g.add_argument("--bim-steps", type=int, default=20, help="BIM iterations")
    g.add_argument("--bim-step", type=float, default=0.01, help="BIM step size")
    g.add_argument("--min-eps-iters", type=int, default=6, help="bisection halvings of each test sample's minimal BIM "
                   "budget (step = budget x BIM_STEP / BIM_EPS; 0: not measured; DECISIONS.md D34)")
    g.add_argument("--min-eps-range", type=float, default=4.0, help="the bisection searches [0, RANGE x --bim-eps]")
    add_run_flags(p, "exp_depth_batch", unit="cells", data="the datasets")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("depths", "width", "seeds", "n_eval", "bim_steps"),
                  positive=("lr_per_sample", "epoch_scale", "bn_eps", "bim_eps", "bim_step", "min_eps_range"),
                  non_negative=("noise_var", "min_eps_iters"))
    if min(args.batches) < 2:
        p.error(f"--batches {args.batches}: expected batch sizes >= 2 (BN needs two samples)")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
