"""Batch norm on the adversarial-spheres task (P2 Figs 1, 7, 8; App. C).

Figs 1/7: two mini-batches of 2-D sphere points (radius 1 vs 1.3) through a deep *linear* network at
initialization, with and without BN, each layer projected jointly onto its first two principal
components. Without BN the net is one linear map, so the nested circles stay nested (separable by a
quadratic); with BN each mini-batch gets its own affine map and the classes mix. The separability of
the pooled projection is measured with a quadratic-feature logistic fit.
Fig 8: a 2-hidden-layer, 1000-unit ReLU MLP with and without BN, trained with plain SGD (batch 50) at
several learning rates and seeds; training loss/accuracy with 95 % bands; noisy-test accuracy of the
models that reached 100 % training accuracy at the smallest learning rate (P2: BN 94.83 %, none 96.06 %).

Quick results (update_readme.py writes this from results/quick/):
    python exp_spheres.py --preset quick
        2 held / 0 reversed / 1 inconclusive / 0 underpowered
        P2 Fig 8: The BN net cannot be trained to 100 % training accuracy at η = 0.01 (fewer than half the seeds):
          -0.500 [-0.500, -0.500] (held)

Run it:
    python exp_spheres.py                     # both figures at the paper's scale (CPU, ~3 min)
    python exp_spheres.py --artifact fig1     # or fig8; --preset smoke for seconds
    python exp_spheres.py --plot-only runs/exp_spheres/<run>

Settings the paper leaves open follow the authors' code (DECISIONS.md D22): Figs 1/7 as their notebook (input
Linear(2, 10), 30 blocks BN -> Linear(10, 10), 2 x 32 evenly spaced points), except that each batch is normalized
with its own statistics as P2 describes (the notebook's batch-1 running statistics make every layer one affine
map for both batches: --bn-stats first-batch); Fig 8 as their ReLUNetwork (BN before each Linear, momentum
None). Test noise variance 0.005, 200 epochs, 250 points per class (P2: "500 samples"). Flags restore the other
choices (--bn-place after, --points random, --mlp bn-after).
"""
import time

import torch
import torch.nn as nn

from common import (Data, DeepLinear, Sweep, accuracy, add_run_flags, check_numbers, claim, fmt_mean_sem, log_to, make_model,
                    make_parser, make_spheres, mean_sem, merge_runs, parse_with_presets, pick_device, prepare_run_dir,
                    print_config, run_script, save_figure, set_seed, show, train_model, write_claims, write_config,
                    write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

LRS = {"none": [0.001, 0.01, 0.1], "bn": [0.001, 0.01]}  # P2 App. C: no-BN reaches zero training error up to 0.1

ARTIFACTS = {  # name -> title, runs, claims
    "fig1": dict(title="P2 Figs 1/7: deep linear net at init, joint PCA per layer", runs=dict(norms=["bn", "none"])),
    "fig8": dict(title="P2 Fig 8 and App. C: learning-rate sensitivity and noisy test accuracy", runs=dict(lrs=LRS)),
}


PRESETS = {  # the paper's scale is cheap, so quick = paper (DECISIONS.md D22)
    "paper": dict(seeds=5, epochs=200, n_train=250, n_test=10000, width=1000, lin_width=10, lin_depth=30),
    "quick": dict(seeds=5, epochs=200, n_train=250, n_test=10000, width=1000, lin_width=10, lin_depth=30),
    "smoke": dict(seeds=2, epochs=15, n_train=100, n_test=500, width=64, lin_width=10, lin_depth=6),
}


def resolve(preset, artifact):
    """The values that run for this preset (shown by --help, saved in config.json)."""
    return dict(PRESETS[preset])


# ================================================================================================
# 2. Experiment
# ================================================================================================

# --- Figs 1/7: the deep linear network at initialization ---------------------------------------------------------

def joint_pca(a, b):
    """Project two batches' activations jointly onto their first two principal components."""
    z = torch.cat([a, b]).double()
    z = z - z.mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    p = z @ v[:2].T
    return p[: len(a)], p[len(a):]


def quadratic_separability(p, y, steps=300):
    """Training accuracy of a logistic fit on quadratic features [p1, p2, p1^2, p2^2, p1 p2] of the
    pooled 2-D projection: 1.0 when the classes stay nested ellipses."""
    p = (p - p.mean(0)) / p.std(0).clamp_min(1e-12)
    f = torch.cat([p, p ** 2, p[:, :1] * p[:, 1:]], 1)
    f = (f - f.mean(0)) / f.std(0).clamp_min(1e-12)
    w = torch.zeros(f.shape[1], dtype=f.dtype, requires_grad=True)
    b = torch.zeros((), dtype=f.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(f @ w + b, y.double()) + 1e-6 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((f @ w + b > 0).long() == y).double().mean())


def fig1_batches(args):
    """Two mini-batches of `batch_points` sphere points. 'even' (the authors' notebook): batch_points points evenly
    spaced on the unit circle (angles 2 pi k / (batch_points + 1)) are class 0, the same points x 1.3 class 1; all of
    them shuffled (seed 3, as the notebook, though with torch's generator) and cut into two batches. 'random':
    each batch its own draw of half the points per class."""
    g = torch.Generator().manual_seed(3)
    if args.points == "random":
        return [make_spheres(args.batch_points // 2, args.dim, generator=g) for _ in range(2)]
    theta = torch.linspace(0, 2 * torch.pi, args.batch_points + 1)[:-1]
    ring = torch.stack([theta.cos(), theta.sin()], 1)
    x, y = torch.cat([ring, 1.3 * ring]), torch.arange(2).repeat_interleave(args.batch_points)
    perm = torch.randperm(len(y), generator=g)
    return [(x[p], y[p]) for p in perm.split(args.batch_points)]


def run_fig1(args, device):
    """Both nets at init on the same two batches; returns records and the projections for the figure."""
    batches = fig1_batches(args)
    records, proj = [], {}
    for norm in ("bn", "none"):
        set_seed(0)
        net = DeepLinear(args.dim, args.lin_width, args.lin_depth, 2, norm, bn_momentum=None,
                         bn_first=args.bn_place == "before").double().to(device)
        with torch.no_grad():
            if norm == "bn" and args.bn_stats == "first-batch":
                net.train()
                net.layer_outputs(batches[0][0].double().to(device))  # momentum=None: running stats := batch 1's
                net.eval()
            else:
                net.train()  # BN normalizes each batch with its own statistics
            outs = [net.layer_outputs(x.double().to(device)) for x, _ in batches]
        y = torch.cat([batches[0][1], batches[1][1]])
        for layer in shown_layers(args.lin_depth):
            a, b = joint_pca(outs[0][layer].cpu(), outs[1][layer].cpu())
            proj[(norm, layer)] = (a, b)
            records.append(dict(artifact="fig1", norm=norm, layer=layer, bn_stats=args.bn_stats,
                                separability=quadratic_separability(torch.cat([a, b]), y)))
    return records, proj, [bt[1] for bt in batches]


def shown_layers(depth):
    """Every other layer up to 14, the deepest P2 Fig 1 names ("classes are mixed by Layer 14")."""
    return list(range(0, min(depth + 1, 15), 2))


def plot_fig1(proj, labels, path, depth):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = shown_layers(depth)
    fig, axes = plt.subplots(2, len(layers), figsize=(2.2 * len(layers), 4.8), squeeze=False)
    for i, norm in enumerate(("bn", "none")):
        for j, layer in enumerate(layers):
            ax = axes[i][j]
            for k, (pts, lab) in enumerate(zip(proj[(norm, layer)], labels)):
                scale = 100.0 if norm == "none" else 1.0  # P2 Fig 7b scales the shrinking unnormalized net by 100
                for c in (0, 1):
                    sel = lab == c
                    ax.scatter(scale * pts[sel, 0], scale * pts[sel, 1], s=12, color="C0" if c == 0 else "C3",
                               facecolors="none" if k == 1 else None, linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {layer}", fontsize=8)
        axes[i][0].set_ylabel("with BN" if norm == "bn" else "without BN (x100)")
    fig.suptitle("P2 Figs 1/7: two mini-batches (filled / hollow), classes by colour, deep linear net at init")
    fig.tight_layout()
    save_figure(fig, path)


# --- Fig 8: learning-rate sensitivity of the 2 x 1000 ReLU MLP ----------------------------------------------------

def planned_runs(args):
    """(name, record fields) of every run in a fixed order (the unit of --shard): fig1 is one run, fig8 one per
    norm, learning rate and seed."""
    out = [("fig1", dict(artifact="fig1"))] if args.artifact in ("all", "fig1") else []
    if args.artifact in ("all", "fig8"):
        out += [(f"fig8_{n}_lr{lr:g}_s{s}", dict(artifact="fig8", norm=n, lr=lr, seed=s))
                for n, lrs in LRS.items() for lr in lrs for s in range(args.seeds)]
    return out


class SpheresMLP(nn.Module):
    """The authors' ReLUNetwork (AngusG/bn-adversarial-spheres, P2 App. C "the same architecture as in [8]"):
    Linear(dim, width) without activation, then two blocks [BN ->] Linear(width, width) -> ReLU, then Linear(width, 2);
    BN before each Linear with momentum None (running statistics: the average over all training batches), PyTorch
    default init."""

    def __init__(self, dim, width, norm):
        super().__init__()
        bn = (lambda: nn.BatchNorm1d(width, momentum=None)) if norm == "bn" else nn.Identity
        self.net = nn.Sequential(nn.Linear(dim, width), *[m for _ in range(2) for m in (bn(), nn.Linear(width, width),
                                                                                     nn.ReLU())], nn.Linear(width, 2))

    def forward(self, x):
        return self.net(x)


def run_fig8(args, device, run_dir, norm, lr, seed, log):
    """One fig8 run: per-epoch rows and a final row with the noisy test accuracy."""
    std = args.noise_var ** 0.5
    g = torch.Generator().manual_seed(1000 + seed)
    x_tr, y_tr = make_spheres(args.n_train, args.dim, generator=g)
    x_te, y_te = make_spheres(args.n_test, args.dim, generator=g)
    x_te = x_te + std * torch.randn(x_te.shape, generator=g)  # noisy test set, variance 0.005
    data = Data("spheres", x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device), (0.0,), (1.0,),
                num_classes=2)
    set_seed(seed)
    if args.mlp == "authors":
        model = SpheresMLP(args.dim, args.width, norm).to(device)
    else:
        model = make_model("mlp", norm=norm, in_dim=args.dim, hidden=[args.width] * 2, num_classes=2, init="default")
        model = model.to(device)
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=lr, momentum=0.0, weight_decay=0.0)
    ckpt = run_dir / "ckpt" / f"{norm}_lr{lr:g}_s{seed}.pt"
    res = train_model(model, data, recipe, seed=seed, ckpt=ckpt, log=lambda s: None, amp=args.amp, ddp_bn=args.ddp_bn)
    base = dict(artifact="fig8", norm=norm, lr=lr, seed=seed, status=res["status"], reason=res["reason"])
    rows = [base | h for h in res["history"] if h["epoch"] > 0]
    final = dict(train_acc_eval=accuracy(model, data.x_train, data.y_train),
                 noisy_test_acc=accuracy(model, data.x_test, data.y_test)) if res["status"] == "ok" else {}
    rows.append(base | dict(epoch="final") | final)
    last_loss = rows[-2].get("train_loss", float("nan")) if len(rows) > 1 else float("nan")
    log(f"[{norm} lr={lr:g} s{seed}] {res['status']} final train loss {last_loss:.4f} "
        + " ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return rows


def plot_fig8(records, path, steps_per_epoch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), squeeze=False)
    runs = sorted({(r["norm"], r["lr"]) for r in records if r.get("artifact") == "fig8"}, key=lambda t: (t[1], t[0]))
    for k, (norm, lr) in enumerate(runs):
        rows = [r for r in records if r.get("artifact") == "fig8" and (r["norm"], r["lr"]) == (norm, lr)
                and r["epoch"] != "final"]
        epochs = sorted({r["epoch"] for r in rows})
        for ax, key in zip(axes[0], ("train_loss", "train_acc")):
            stats = [mean_sem([r[key] for r in rows if r["epoch"] == e]) for e in epochs]
            m = [s[0] for s in stats]
            h = [1.96 * s[1] if s[2] > 1 else 0.0 for s in stats]  # 95 % band
            xs = [e * steps_per_epoch for e in epochs]
            color = f"C{sorted({t[1] for t in runs}).index(lr)}"
            ax.plot(xs, m, linestyle="--" if norm == "bn" else "-", color=color, label=f"{norm}, η={lr:g}")
            ax.fill_between(xs, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], color=color, alpha=0.2)
    axes[0][0].set_ylabel("training loss")
    axes[0][0].set_yscale("log")
    axes[0][1].set_ylabel("training accuracy")
    for ax in axes[0]:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8)
    fig.suptitle("P2 Fig 8: 2x1000 ReLU MLP on 2-D spheres, plain SGD, batch 50 (BN dashed; 95 % bands over seeds)")
    fig.tight_layout()
    save_figure(fig, path)


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_spheres.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        if any(r.get("artifact") == "fig8" for r in records):
            plot_fig8(records, run_dir / "fig8.png", -(-2 * cfg["n_train"] // cfg["batch_size"]))
        print(f"redrew {run_dir / 'table.md'}, claims.md and fig8.png (fig1.png needs a rerun of --artifact fig1)")
        return
    device = pick_device(args.device)
    run_dir = prepare_run_dir("exp_spheres", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    t0 = time.time()
    for _, name, r in sweep.mine():
        if name == "fig1":  # recomputed, also on --resume: it is instant and its figure is not kept in the records
            fig1, proj, labels = run_fig1(args, device)
            plot_fig1(proj, labels, run_dir / "fig1.png", args.lin_depth)
            sweep.save(name, fig1)
            print(f"fig1 done in {time.time() - t0:.1f}s")
        elif name not in sweep.finished():
            sweep.save(name, run_fig8(args, device, run_dir, r["norm"], r["lr"], r["seed"], print))
    records = sweep.records()
    if any(r.get("artifact") == "fig8" for r in records):
        plot_fig8(records, run_dir / "fig8.png", -(-2 * args.n_train // args.batch_size))
    write_outputs(run_dir, records, vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "fig1": [claim("fig1_mix", "P2 Figs 1, 7", "With BN the classes are mixed at the deepest layer shown, "
    "without BN they stay separable", "mixed by layer 14 (figure only)", "separability",
    dict(norm="bn", deepest=True), dict(norm="none", deepest=True))],
    "fig8": [
    claim("fig8_bn_lr", "P2 Fig 8", "The BN net cannot be trained to 100 % training accuracy at η = 0.01 "
          "(fewer than half the seeds)", "cannot be trained", "fits", dict(norm="bn", lr=0.01), None, "<",
          ref=0.5),
    claim("fig8_none_lr", "P2 Fig 8", "The no-norm net reaches 100 % training accuracy at η = 0.1 "
          "(more than half the seeds)", "zero training error up to 0.1", "fits", dict(norm="none", lr=0.1),
          None, ">", ref=0.5),
    claim("appc_noise", "P2 App. C", "BN lowers noisy-test accuracy (models at 100 % training accuracy)",
          "94.83 vs 96.06 (η = 0.001)", "noisy_test_acc", dict(norm="bn", fits=1.0),
          dict(norm="none", fits=1.0), per=("lr",), scale=100.0, paper_effect=-1.23)],
}


def claim_rows(records):
    """Rows for the claims: Fig 1 per (norm, layer) with `deepest` marking the last layer shown; Fig 8 one
    per (norm, lr, seed) with fits (1.0 / 0.0) and the noisy-test accuracy of models that fit."""
    fig1 = [r for r in records if r.get("artifact") == "fig1"]
    deepest = max((r["layer"] for r in fig1), default=None)
    rows = [r | dict(deepest=r["layer"] == deepest) for r in fig1]
    for r in records:
        if r.get("artifact") == "fig8" and r["epoch"] == "final":
            fits = float(r["status"] == "ok" and r.get("train_acc_eval") == 1.0)
            rows.append(dict(artifact="fig8", norm=r["norm"], lr=r["lr"], seed=r["seed"], status="ok", fits=fits,
                             noisy_test_acc=r.get("noisy_test_acc") if fits else None))
    return rows


def write_outputs(run_dir, records, cfg):
    write_text_atomic(run_dir / "table.md", make_table(records, cfg))
    claims = [c for name, cs in CLAIMS.items() if any(r.get("artifact") == name for r in records) for c in cs]
    write_claims(run_dir, claims, claim_rows(records), f"# Claims: P2 Figs 1, 7, 8 on the adversarial spheres "
                 f"(preset {cfg['preset']})")


def make_table(records, args_like):
    lines = [f"# P2 Figs 1, 7, 8 on the adversarial spheres (preset {args_like['preset']})", ""]
    fig1 = [r for r in records if r.get("artifact") == "fig1"]
    if fig1:
        layers = sorted({r["layer"] for r in fig1})
        lines += ["Figs 1/7: accuracy of a quadratic-feature logistic fit on the joint 2-PC projection of both",
                  f"mini-batches (BN statistics: {fig1[0]['bn_stats']}); 1.0 = classes still nested.", "",
                  "| norm | " + " | ".join(f"layer {ly}" for ly in layers) + " |", "|---|" + "---|" * len(layers)]
        for norm in ("bn", "none"):
            lines.append(f"| {norm} | " + " | ".join(f"{r['separability']:.2f}" for r in fig1 if r["norm"] == norm) + " |")
        lines.append("")
    fig8 = [r for r in records if r.get("artifact") == "fig8" and r["epoch"] == "final"]
    if fig8:
        lines += ["Fig 8: per (norm, learning rate): seeds that trained (not diverged / above chance), seeds at",
                  "100 % training accuracy (eval mode), and noisy-test accuracy (%) of those, mean ± SEM.", "",
                  "| norm | η | seeds | trained | 100 % train | noisy test acc (100 % train) | noisy test acc (trained) |",
                  "|---|---|---|---|---|---|---|"]
        for norm, lrs in LRS.items():
            for lr in lrs:
                rs = [r for r in fig8 if r["norm"] == norm and r["lr"] == lr]
                if not rs:
                    continue
                ok = [r for r in rs if r["status"] == "ok"]
                full = [r for r in ok if r.get("train_acc_eval") == 1.0]
                lines.append(f"| {norm} | {lr:g} | {len(rs)} | {len(ok)} | {len(full)} | "
                             f"{fmt_mean_sem([r['noisy_test_acc'] for r in full], digits=2)} | "
                             f"{fmt_mean_sem([r['noisy_test_acc'] for r in ok], digits=2)} |")
        failed = [r for r in fig8 if r["status"] != "ok"]
        lines += [""] + [f"- {r['norm']} η={r['lr']:g} seed {r['seed']}: {r['reason']}" for r in failed]
    return "\n".join(lines) + "\n"


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ["all"] + list(ARTIFACTS), "all", PRESETS)
    g.add_argument("--seeds", type=int, help="Fig 8 seeds (P2: 5)")
    g.add_argument("--bn-stats", default="batch", choices=["batch", "first-batch"],
                   help="Figs 1/7: each batch's own statistics (the mechanism P2 describes), or the notebook's running "
                        "statistics of batch 1 for both batches (then every layer is one affine map: DECISIONS.md D22)")
    g.add_argument("--bn-place", default="before", choices=["before", "after"],
                   help="Figs 1/7: BN before each linear layer (the notebook) or after it")
    g.add_argument("--points", default="even", choices=["even", "random"],
                   help="Figs 1/7: evenly spaced circle points (the notebook) or random ones")
    g.add_argument("--mlp", default="authors", choices=["authors", "bn-after"],
                   help="Fig 8: the authors' ReLUNetwork (input Linear, then [BN ->] Linear -> ReLU twice, BN momentum "
                        "None) or Linear -> [BN] -> ReLU twice (earlier versions of this project)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="Fig 8 training epochs")
    g.add_argument("--width", type=int, help="Fig 8 hidden width (P2: 1000)")
    g.add_argument("--batch-size", type=int, default=50, help="P2 App. C: 50")
    g.add_argument("--lin-width", type=int, help="Figs 1/7 deep linear net width")
    g.add_argument("--lin-depth", type=int, help="Figs 1/7 depth (the notebook: 30; every other layer up to 14 shown)")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--n-test", type=int, help="noisy test points per class (P2: 10000)")
    g.add_argument("--noise-var", type=float, default=0.005, help="test noise variance (DECISIONS.md D22)")
    g = add_run_flags(p, "exp_spheres", unit="runs", outputs="table.md, claims.md and fig8.png")
    g.add_argument("--n-train", type=int, help="training points per class")
    g.add_argument("--dim", type=int, default=2, help="sphere dimension (P2: 2)")
    g.add_argument("--batch-points", type=int, default=32, help="Figs 1/7 points per mini-batch (the notebook: 32)")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("seeds", "epochs", "n_train", "n_test", "width", "lin_width", "lin_depth",
                                         "batch_size", "dim", "batch_points"), non_negative=("noise_var",))
    if args.lin_depth < 2:
        p.error(f"--lin-depth {args.lin_depth}: expected >= 2 (layers 0, 2, ... are shown)")
    if args.batch_points < 4 or args.batch_points % 2:
        p.error(f"--batch-points {args.batch_points}: expected an even number >= 4")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
