"""Input dimension, weight decay and BN (P2 Sec. 4, App. B): Tables 11, 6, 12, 7 and Fig 4.

Images are upscaled by nearest neighbour (k = 1..4: MNIST 28 -> 56/84/112, digits 8 -> 16/24/32) and
standardized; attacks are in standardized units with no clipping (DECISIONS.md D19).
  Table 11: a linear softmax model, FGSM eps 0.1 (accuracy and loss) and 0.05 (loss), without weight
            decay and with the lambda that P2 tuned per size; ratios to the k = 1 baseline vs the
            predicted growth k (Simon-Gabriel et al.).
  Tables 6/12: the d -> d/2 -> d/2 -> 10 ReLU MLP with and without one BN layer (after the first
            hidden layer, DECISIONS.md D20): clean, noise N(0, 1) added before upscaling (P2 footnote 6) and
            BIM (eps 0.1, 100 steps of 1e-3); Table 12 as ratios to the k = 1 no-BN row.
  Table 7:  the same MLPs trained with the linear model's weight decay.
  Fig 4:    the 2-unit bottleneck's pre-activations over training, with and without BN (DECISIONS.md D20).
  App. B:   (--artifact appb, MNIST only) the weight-decay and the BN MLP at 28x28 on Tramer et al.'s 100
            invariance-based examples (data/excessive_invariance), scored against their oracle labels.

Quick results (update_readme.py writes this from results/quick/):
    python exp_input_dim.py --preset quick
        8 held / 0 reversed / 12 inconclusive / 0 underpowered
        P2 Table 11: The adversarial damage (FGSM loss - clean loss) grows with the input dimension (k = 4 vs 1):
          +0.200 [+0.195, +0.205] (held)

Run it:
    python exp_input_dim.py --preset quick      # bundled digits, all tables and Fig 4, CPU, ~2 min
    python exp_input_dim.py --dataset mnist     # paper preset on MNIST (--download fetches it)
"""
import functools
import hashlib
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import bim as bim_attack
from common import (Data, DataError, Sweep, add_run_flags, build_dataset, check_attack, check_numbers, claim, eval_mode,
                    fmt_mean_sem, is_main_process, log_to, make_model, make_parser, mean_sem, median_minimal_eps, merge_runs,
                    parse_with_presets, pick_device, prepare_run_dir, print_config, resize_images, run_attack,
                    run_script, save_figure, set_seed, show, train_model, write_claims, write_config, write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

LAMBDA = {2: 0.01, 3: 0.0225, 4: 0.05}  # P2 Table 11's weight decay per upscaling factor (used again in Table 7)

T11 = dict(table="t11", lam=0.0)


ARTIFACTS = {  # name -> title, runs, claims
    "t11": dict(title="P2 Table 11: linear model, FGSM, input dimension x weight decay",
                runs=dict(ks=[1, 2, 3, 4], lambdas=LAMBDA)),
    "t6": dict(title="P2 Tables 6 and 12: MLP with and without one BN layer", runs=dict(ks=[1, 2, 3], norms=["none", "bn"])),
    "t7": dict(title="P2 Table 7: the MLPs with Table 11's weight decay", runs=dict(ks=[2, 3], norms=["none", "bn"])),
    # a picture (P2: BN spreads the points from init): nothing to test as a number
    "fig4": dict(title="P2 Fig 4: 2-unit bottleneck activations over training", runs=dict(norms=["none", "bn"])),
    # P2 App. B: "Our models trained with weight decay obtained 12% higher accuracy (86% vs. 74% correct) compared to
    # batch norm on a small sample of 100 l-inf invariance-based MNIST examples" (DECISIONS.md D20): MNIST only
    "appb": dict(title="P2 App. B: weight decay vs BN on 100 invariance-based MNIST examples",
                 runs=dict(variants=["wd", "bn"])),
}

# Tramer et al.'s invariance-based examples (ftramer/Excessive-Invariance, MIT licence; data/excessive_invariance):
# 28x28 MNIST images changed until their (human, "oracle") label changed, with those labels; sha256 as published
INVARIANCE = {"automated_eps03": ("3f1dad7705a272bee7ff6186e241b591a4bba88f7f3a94c686954ba7f78bb986",
                                  "79c93e7ab230591861ea74996ba6c95942290ed9e209e83f0b45b6b0c468ad18"),
              "automated_eps04": ("751cbe4a5a2b85255e6e38a12e9eca690b2a4d54dc8e9e0d9dd6a582aec37978",
                                  "bb28481ffe49bf13a77a06f43e32895e6270739119e1fc2e1e232aa02bc11316")}

PRESETS = {
    "paper": dict(dataset="mnist", seeds=5, mlp_seeds=5, epochs=50, mlp_epochs=50, bottleneck_epochs=500,
                  bim_steps=100, bim_step=1e-3, snapshots=[0, 20, 500], n_plot=2000),
    # The paper's settings on the digits (8x8, upscaled x1..x4 in place of MNIST 28 -> 112; DECISIONS.md D23): cheap on a CPU.
    "quick": dict(dataset="digits", seeds=5, mlp_seeds=5, epochs=50, mlp_epochs=50, bottleneck_epochs=500,
                  bim_steps=100, bim_step=1e-3, snapshots=[0, 20, 500], n_plot=1500),
    "smoke": dict(dataset="digits", seeds=2, mlp_seeds=1, epochs=3, mlp_epochs=2, bottleneck_epochs=4,
                  bim_steps=3, bim_step=0.04, snapshots=[0, 2, 4], n_plot=300, min_eps_iters=2),
}


def resolve(preset, artifact):
    """The values that run for this preset (shown by --help, saved in config.json)."""
    return dict(PRESETS[preset])


# ================================================================================================
# 2. Experiment
# ================================================================================================

def base_data(args, device):
    """Standardized base-resolution images (28x28 MNIST or 8x8 digits), 1 channel, on `device`."""
    d = build_dataset(args.dataset, args.data_root, device, args.download)
    m, s = d.mean[0], d.std[0]
    args.base_stats = (m, s)  # (recorded in config.json; appb standardizes the invariance examples with them)
    return (d.x_train - m) / s, d.y_train, (d.x_test - m) / s, d.y_test


def upscaled(base, k):
    x_tr, y_tr, x_te, y_te = base
    side = x_tr.shape[-1] * k
    return Data(f"x{k}", resize_images(x_tr, side), y_tr, resize_images(x_te, side), y_te, (0.0,), (1.0,))


def acc_and_loss(model, x, y, spec, generator=None, batch_size=1000):
    """Accuracy and mean cross-entropy of `model` under one attack spec (Table 11 reports both)."""
    correct = loss = torch.zeros((), dtype=torch.float64, device=x.device)  # summed on the device: one wait at the end
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        xa = run_attack(model, xb, yb, spec, generator)
        with torch.no_grad(), eval_mode(model):
            z = model(xa)
        correct = correct + (z.argmax(1) == yb).sum()
        loss = loss + F.cross_entropy(z, yb, reduction="sum").double()
    return float(correct) / len(y), float(loss) / len(y)


def train(args, data, model, epochs, weight_decay, seed, ckpt, on_epoch=None):
    recipe = dict(epochs=epochs, batch_size=args.batch_size, lr=args.lr, momentum=0.0, weight_decay=weight_decay)
    return train_model(model, data, recipe, seed=seed, ckpt=ckpt, log=lambda s: None, on_epoch=on_epoch, amp=args.amp,
                       ddp_bn=args.ddp_bn)


def planned_runs(args):
    """(name, record fields) of every run in a fixed order (the unit of --shard): Table 11's linear models (k,
    lambda, seed), Tables 6/12 and 7's MLPs (k, norm, seed), and Fig 4 as one run."""
    out = []
    if args.artifact in ("all", "t11"):
        configs = [(k, 0.0) for k in (1, 2, 3, 4)] + [(k, lam) for k, lam in LAMBDA.items()]
        out += [(f"t11_k{k}_l{lam:g}_s{s}", dict(table="t11", k=k, lam=lam, norm="none", seed=s)) for k, lam in configs
                for s in range(args.seeds)]
    for table, ks in (("t6", (1, 2, 3)), ("t7", (2, 3))):
        if args.artifact in ("all", table):
            out += [(f"{table}_k{k}_{n}_s{s}", dict(table=table, k=k, lam=LAMBDA[k] if table == "t7" else 0.0, norm=n,
                                                    seed=s))
                    for k in ks for n in ("none", "bn") for s in range(args.mlp_seeds)]
    if args.artifact in ("all", "fig4"):
        out.append(("fig4", dict(table="fig4")))
    if args.artifact == "appb" or (args.artifact == "all" and args.dataset == "mnist"):  # 28x28 MNIST models only
        out += [(f"appb_{v}_s{s}", dict(table="appb", k=1, variant=v, norm="none" if v == "wd" else "bn", seed=s))
                for v in ("wd", "bn") for s in range(args.mlp_seeds)]
    return out


def run_t11(args, base, device, run_dir, k, lam, seed):
    """Table 11: one linear model at upscaling k and weight decay lambda: clean / FGSM accuracy and loss."""
    data = upscaled(base, k)
    set_seed(seed)
    model = make_model("mlp", norm="none", in_dim=data.x_train[0].numel(), hidden=[], init="default").to(device)
    res = train(args, data, model, args.epochs, lam, seed, run_dir / "ckpt" / f"t11_k{k}_l{lam:g}_s{seed}.pt")
    rec = dict(table="t11", k=k, lam=lam, norm="none", seed=seed, status=res["status"], reason=res["reason"])
    if res["status"] == "ok":
        fgsm = dict(kind="fgsm", eps=args.fgsm_eps, clip=None)
        for name, spec in [("clean", dict(kind="clean")), ("fgsm01", fgsm),
                           ("fgsm005", dict(kind="fgsm", eps=args.fgsm_eps / 2, clip=None))]:
            rec[f"acc_{name}"], rec[f"loss_{name}"] = acc_and_loss(model, data.x_test, data.y_test, spec)
        rec |= {f"chk_fgsm_{k}": v for k, v in check_attack(model, data.x_test, data.y_test, fgsm, seed=seed).items()}
    return rec


def run_mlp(args, base, device, run_dir, table, k, norm, seed):
    """Tables 6/12 (no WD, k = 1..3) or Table 7 (WD = Table 11's lambda, k = 2, 3): one MLP +- one BN layer."""
    x_te_base = base[2]
    data = upscaled(base, k)
    lam = LAMBDA[k] if table == "t7" else 0.0
    d = data.x_train[0].numel()
    set_seed(seed)
    model = make_model("mlp", norm=norm, in_dim=d, hidden=[d // 2, d // 2], norm_positions=[0]).to(device)
    ckpt = run_dir / "ckpt" / f"{table}_k{k}_{norm}_s{seed}.pt"
    res = train(args, data, model, args.mlp_epochs, lam, seed, ckpt)
    rec = dict(table=table, k=k, lam=lam, norm=norm, seed=seed, status=res["status"], reason=res["reason"])
    if res["status"] == "ok":
        g = torch.Generator(device=device).manual_seed(seed)
        # P2 footnote 6: N(0, 1) noise is added at the base resolution, then upscaled
        noise = args.noise_std * torch.randn(x_te_base.shape, generator=g, device=device)
        noisy = resize_images(x_te_base + noise, data.shape[-1])
        bim = dict(kind="bim", eps=args.bim_eps, steps=args.bim_steps, step_size=args.bim_step, clip=None)
        rec["acc_clean"], rec["loss_clean"] = acc_and_loss(model, data.x_test, data.y_test, dict(kind="clean"))
        rec["acc_noise"], rec["loss_noise"] = acc_and_loss(model, noisy, data.y_test, dict(kind="clean"))
        rec["acc_bim"], rec["loss_bim"] = acc_and_loss(model, data.x_test, data.y_test, bim)
        chk = check_attack(model, data.x_test, data.y_test, bim, seed=seed)
        rec |= {f"chk_bim_{k}": v for k, v in chk.items()}
        if args.min_eps_iters:  # budget-free (DECISIONS.md D34): each test sample's minimal BIM budget, step scaled
            ratio = args.bim_step / args.bim_eps
            attack = lambda xb, yb, e: bim_attack(model, xb, yb, e, args.bim_steps, step_size=e * ratio, clip=None)
            rec["min_eps_bim"], rec["min_eps_bim_censored"] = median_minimal_eps(
                model, data.x_test, data.y_test, attack, args.min_eps_range * args.bim_eps, iters=args.min_eps_iters)
    return rec


def read_invariance_examples(folder, name):
    """One set of the invariance-based examples as (x in [0, 1], (N, 1, 28, 28) float32; oracle labels int64), each
    file checked against its published sha256 (one DataError line otherwise)."""
    out = []
    for suffix, digest in zip(("", "_labels"), INVARIANCE[name]):
        path = pathlib.Path(folder) / "invariance_examples" / "linf" / f"{name}{suffix}.npy"
        if not path.is_file():
            raise DataError(f"{path} not found: --invariance-dir must hold Tramer et al.'s invariance_examples/linf/ "
                            "(bundled in data/excessive_invariance)")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise DataError(f"{path}: sha256 differs from the published file (corrupt or edited?)")
        out.append(np.load(path, allow_pickle=False))
    x = torch.from_numpy(np.asarray(out[0], dtype=np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(out[1].astype(np.int64))


def run_appb(args, base, device, run_dir, variant, seed):
    """P2 App. B: Tables 6/7's MLP at sqrt(d) = 28 with weight decay (--inv-lambda, no BN) or with one BN layer (no
    weight decay), scored on the invariance examples against their oracle labels (standardized as MNIST)."""
    data = upscaled(base, 1)
    d = data.x_train[0].numel()
    lam, norm = (args.inv_lambda, "none") if variant == "wd" else (0.0, "bn")
    set_seed(seed)
    model = make_model("mlp", norm=norm, in_dim=d, hidden=[d // 2, d // 2], norm_positions=[0]).to(device)
    res = train(args, data, model, args.mlp_epochs, lam, seed, run_dir / "ckpt" / f"appb_{variant}_s{seed}.pt")
    rec = dict(table="appb", k=1, variant=variant, norm=norm, lam=lam, seed=seed, status=res["status"],
               reason=res["reason"])
    if res["status"] == "ok":
        m, s = args.base_stats
        rec["acc_clean"] = acc_and_loss(model, data.x_test, data.y_test, dict(kind="clean"))[0]
        for name in INVARIANCE:
            x, y = read_invariance_examples(args.invariance_dir, name)
            rec[f"acc_{name}"] = acc_and_loss(model, ((x - m) / s).to(device), y.to(device), dict(kind="clean"))[0]
    return rec


def run_fig4(args, base, device, run_dir):
    """Bottleneck MLP (MNIST 784-392-196-2-49-10; digits 64-32-16-2-8-10) +- BN on the two widest hidden
    layers; WD 1e-3. Returns {norm: {epoch: (n, 2) activations}} of the 2-unit layer on training points."""
    data = upscaled(base, 1)
    d = data.x_train[0].numel()
    hidden = [d // 2, d // 4, 2, d // 16]
    x_plot, y_plot = data.x_train[: args.n_plot], data.y_train[: args.n_plot]
    acts, labels = {}, y_plot.cpu().numpy()
    for norm in ("none", "bn"):
        set_seed(0)
        model = make_model("mlp", norm=norm, in_dim=d, hidden=hidden, norm_positions=[0, 1]).to(device)
        layer = model.hidden[3 * 2 + (2 if args.post_relu else 0)]  # Linear of the 2-unit layer (or its ReLU)
        snaps = {}

        def on_epoch(epoch, m):
            if epoch in args.snapshots:
                got = []
                h = layer.register_forward_hook(lambda mod, inp, out: got.append(out.detach().cpu()))
                with torch.no_grad(), eval_mode(m):
                    m(x_plot)
                h.remove()
                snaps[epoch] = got[0].numpy()
            return {}

        train(args, data, model, args.bottleneck_epochs, 1e-3, 0, run_dir / "ckpt" / f"fig4_{norm}.pt", on_epoch)
        acts[norm] = snaps
    if is_main_process():
        np.savez_compressed(run_dir / "fig4_activations.npz", labels=labels,
                        **{f"{n}_{e}": a for n, s in acts.items() for e, a in s.items()})
    return acts, labels


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_input_dim.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        npz = run_dir / "fig4_activations.npz"
        if npz.exists():
            z = np.load(npz)
            acts = {n: {int(k.split("_")[1]): z[k] for k in z.files if k.startswith(n + "_")} for n in ("none", "bn")}
            plot_fig4(acts, z["labels"], run_dir / "fig4.png", cfg["snapshots"])
        print(f"redrew the tables, claims and figure in {run_dir}")
        return
    device = pick_device(args.device)
    base = base_data(args, device)
    run_dir = prepare_run_dir("exp_input_dim", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    print(f"run directory: {run_dir} | base images {tuple(base[0].shape[1:])}, upscaled x1..x4 by nearest neighbour")
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    t0 = time.time()
    for _, name, r in sweep.todo():
        if r["table"] == "t11":
            sweep.save(name, [run_t11(args, base, device, run_dir, r["k"], r["lam"], r["seed"])])
        elif r["table"] in ("t6", "t7"):
            sweep.save(name, [run_mlp(args, base, device, run_dir, r["table"], r["k"], r["norm"], r["seed"])])
        elif r["table"] == "appb":
            sweep.save(name, [run_appb(args, base, device, run_dir, r["variant"], r["seed"])])
        else:
            acts, labels = run_fig4(args, base, device, run_dir)
            plot_fig4(acts, labels, run_dir / "fig4.png", args.snapshots)
            sweep.save(name, [])  # its results are fig4_activations.npz and fig4.png
        print(f"{name} done ({time.time() - t0:.0f}s)")
    records = sweep.records()
    write_outputs(run_dir, records, vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

claim_pp = functools.partial(claim, scale=100.0)  # accuracies: effects in percentage points
CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "t11": [
    claim_pp("t11_acc", "P2 Table 11", "Without weight decay, FGSM accuracy falls as the input dimension "
          "grows (k = 4 vs 1)", "accuracy ratio 0.1 at k = 4", "acc_fgsm01", T11 | dict(k=4), T11 | dict(k=1)),
    claim_pp("t11_damage", "P2 Table 11", "The adversarial damage (FGSM loss - clean loss) grows with the "
          "input dimension (k = 4 vs 1)", "×4 predicted (∝ √d)", "damage01", T11 | dict(k=4),
          T11 | dict(k=1), ">", scale=1.0),
    claim_pp("t11_wd", "P2 Table 11", "Weight decay restores FGSM accuracy at k = 4", "ratio back to ≈ 1",
          "acc_fgsm01", dict(table="t11", k=4, wd=True), T11 | dict(k=4), ">")],
    "t6": [claim_pp("t6_bim", "P2 Tables 6, 12", "One BN layer lowers BIM accuracy", "about −40 points at every k",
          "acc_bim", dict(table="t6", norm="bn"), dict(table="t6", norm="none"), per=("k",), paper_effect=-40.0),
    claim("t6_bim_mineps", "P2 Tables 6, 12", "One BN layer lowers the median minimal BIM budget", "— (budget-free)",
          "min_eps_bim", dict(table="t6", norm="bn"), dict(table="t6", norm="none"), per=("k",)),
    claim_pp("t6_noise", "P2 Tables 6, 12", "One BN layer lowers noise accuracy", "−13 to −16 points",
          "acc_noise", dict(table="t6", norm="bn"), dict(table="t6", norm="none"), per=("k",), paper_effect=-13.0)],
    "t7": [claim_pp("t7_wd", "P2 Table 7", "Weight decay raises BIM accuracy", "always helps",
          "acc_bim", dict(table="t7"), dict(table="t6"), ">", per=("k", "norm")),
    claim_pp("t7_bn", "P2 Table 7", "BN lowers BIM accuracy also with weight decay", "always hurts",
          "acc_bim", dict(table="t7", norm="bn"), dict(table="t7", norm="none"), per=("k",)),
    claim("t7_bn_mineps", "P2 Table 7", "BN lowers the median minimal BIM budget also with weight decay",
          "— (budget-free)", "min_eps_bim", dict(table="t7", norm="bn"), dict(table="t7", norm="none"), per=("k",))],
    "fig4": [],
    "appb": [claim_pp(f"appb_{name}", "P2 App. B", f"Weight decay beats BN on the invariance-based examples ({name})",
                      "86 vs 74 % (which of the two files: not stated)", f"acc_{name}", dict(table="appb", variant="wd"),
                      dict(table="appb", variant="bn"), ">", paper_effect=12.0) for name in INVARIANCE],
}


def make_tables(records, cfg):
    lines = [f"# P2 Sec. 4 / App. B: input dimension, weight decay and BN (preset {cfg['preset']}, {cfg['dataset']})", ""]
    ok = [r for r in records if r["status"] == "ok"]
    get = lambda table, k, lam, norm: [r for r in ok if (r["table"], r["k"], r["lam"], r["norm"]) == (table, k, lam, norm)]
    ms = lambda rs, m, sc=100.0, d=1: fmt_mean_sem([r[m] for r in rs], sc, d)  # one table cell
    base = get("t11", 1, 0.0, "none")
    if base:
        b = {m: mean_sem([r[m] for r in base])[0] for m in ("acc_clean", "acc_fgsm01", "loss_clean", "loss_fgsm01")}
        lines += ["## Table 11: linear model, FGSM (k = 1 absolute; k > 1 as ratios to k = 1, lambda = 0)", "",
                  "| k | lambda | clean acc | eps=0.1 acc | clean loss | eps=0.1 loss | Pred. | damage 0.05 | damage 0.1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, lam in [(1, 0.0)] + [(k, lam) for k in (2, 3, 4) for lam in (0.0, LAMBDA[k])]:
            rs = get("t11", k, lam, "none")
            if not rs:
                continue
            if k == 1:
                cells = [ms(rs, "acc_clean"), ms(rs, "acc_fgsm01"), ms(rs, "loss_clean", 1.0, 3),
                         ms(rs, "loss_fgsm01", 1.0, 3), "–"]
            else:
                cells = [fmt_mean_sem([r[m] / b[m] for r in rs], 1.0, 3) for m in b]  # ratios to k = 1
                cells.append(str(k) if lam == 0 else "")
            cells += [fmt_mean_sem([r["loss_fgsm005"] - r["loss_clean"] for r in rs], 1.0, 3),
                      fmt_mean_sem([r["loss_fgsm01"] - r["loss_clean"] for r in rs], 1.0, 3)]
            lines.append(f"| {k} | {lam:g} | " + " | ".join(cells) + " |")
        lines.append("")
    for table, title in [("t6", "Tables 6 and 12: MLP, no weight decay"), ("t7", "Table 7: MLP with Table 11's weight decay")]:
        rows = [(k, lam) for k, lam in sorted({(r["k"], r["lam"]) for r in ok if r["table"] == table})]
        if not rows:
            continue
        lines += [f"## {title} (accuracy %, mean ± SEM; BIM eps 0.1)", "",
                  "| k | lambda | norm | n | clean | noise | BIM | clean loss | BIM loss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k, lam in rows:
            for norm in ("none", "bn"):
                rs = get(table, k, lam, norm)
                cells = [ms(rs, m) for m in ("acc_clean", "acc_noise", "acc_bim")]
                cells += [ms(rs, m, 1.0, 3) for m in ("loss_clean", "loss_bim")]
                lines.append(f"| {k} | {lam:g} | {norm} | {len(rs)} | " + " | ".join(cells) + " |")
        lines.append("")
    ref = get("t6", 1, 0.0, "none")
    if ref:
        b = {m: mean_sem([r[m] for r in ref])[0] for m in ("acc_clean", "acc_bim", "loss_clean", "loss_bim")}
        lines += ["## Table 12: MLP ratios to the k = 1 no-BN row", "",
                  "| k | norm | clean acc | BIM acc | clean loss | BIM loss |", "|---|---|---|---|---|---|"]
        for k in (1, 2, 3):
            for norm in ("none", "bn"):
                rs = get("t6", k, 0.0, norm)
                if rs and not (k == 1 and norm == "none"):
                    ratios = [fmt_mean_sem([r[m] / b[m] for r in rs], 1.0, 3) for m in b]
                    lines.append(f"| {k} | {norm} | " + " | ".join(ratios) + " |")
        lines.append("")
    inv = [r for r in ok if r["table"] == "appb"]
    if inv:
        lines += ["## P2 App. B: accuracy (%) against the oracle labels of Tramer et al.'s 100 invariance-based examples",
                  "", "| model | lambda | n | clean test | automated_eps03 | automated_eps04 |", "|---|---|---|---|---|---|"]
        for v, what in (("wd", "MLP, weight decay"), ("bn", "MLP, one BN layer")):
            rs = [r for r in inv if r["variant"] == v]
            if rs:
                lines.append(f"| {what} | {rs[0]['lam']:g} | {len(rs)} | " + " | ".join(
                    ms(rs, m) for m in ("acc_clean", "acc_automated_eps03", "acc_automated_eps04")) + " |")
        lines.append("")
    failed = [r for r in records if r["status"] != "ok"]
    lines += [f"- failed: {r['table']} k={r['k']} lambda={r['lam']:g} {r['norm']} seed {r['seed']}: {r['reason']}"
              for r in failed]
    return "\n".join(lines) + "\n"


def write_outputs(run_dir, records, cfg):
    write_text_atomic(run_dir / "table.md", make_tables(records, cfg))
    rows = [r | dict(wd=r["lam"] > 0, damage01=r["loss_fgsm01"] - r["loss_clean"] if "loss_fgsm01" in r else None)
            for r in records]
    claims = [c for name, cs in CLAIMS.items() if any(r["table"] == name for r in records) for c in cs]
    write_claims(run_dir, claims, rows, f"# Claims: P2 Sec. 4 / App. B (preset {cfg['preset']}, {cfg['dataset']})", records,
                 lambda r: f"{r['table']} k={r['k']} lambda={r['lam']:g} {r['norm']} s{r['seed']}")


def plot_fig4(acts, labels, path, snapshots):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(snapshots), figsize=(3.4 * len(snapshots), 6.6), squeeze=False)
    for i, norm in enumerate(("none", "bn")):
        for j, e in enumerate(snapshots):
            ax = axes[i][j]
            a = acts[norm].get(e)
            if a is not None:
                ax.scatter(a[:, 0], a[:, 1], c=labels, cmap="tab10", s=3, vmin=0, vmax=9)
            ax.set_xlim(-10, 10)
            ax.set_ylim(-10, 10)
            ax.set_title(f"{'BN' if norm == 'bn' else 'no BN'}, epoch {e}", fontsize=9)
    fig.suptitle("P2 Fig 4: 2-unit bottleneck activations of training points (colour = digit)")
    fig.tight_layout()
    save_figure(fig, path)


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ["all"] + list(ARTIFACTS), "all", PRESETS)
    g.add_argument("--dataset", choices=["mnist", "digits"], help="dataset")
    g.add_argument("--seeds", type=int, help="seeds for Table 11")
    g.add_argument("--mlp-seeds", type=int, help="seeds for Tables 6, 7, 12 (P2: 5)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="linear model epochs (P2: 50)")
    g.add_argument("--mlp-epochs", type=int, help="MLP epochs (P2: 50)")
    g.add_argument("--bottleneck-epochs", type=int, help="Fig 4 epochs (P2: 500)")
    g.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, no momentum (P2: 1e-2)")
    g.add_argument("--batch-size", type=int, default=128, help="SGD batch size (P2: 128)")
    g.add_argument("--post-relu", action="store_true", help="Fig 4: plot the 2-unit layer after its ReLU (DECISIONS.md D20)")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--snapshots", type=int, nargs="+", help="Fig 4 epochs to plot (P2: init, ~20, end)")
    g.add_argument("--fgsm-eps", type=float, default=0.1, help="Table 11 FGSM budget; the loss is also taken at half of it "
                   "(P2: 0.1 and 0.05, standardized units)")
    g.add_argument("--bim-eps", type=float, default=0.1, help="BIM budget (P2: 0.1)")
    g.add_argument("--bim-steps", type=int, help="BIM iterations (P2: 100)")
    g.add_argument("--bim-step", type=float, help="BIM step size (P2: 1e-3)")
    g.add_argument("--min-eps-iters", type=int, default=6, help="bisection halvings of each test sample's minimal BIM "
                   "budget, Tables 6/7 (step = budget x BIM_STEP / BIM_EPS; 0: not measured; DECISIONS.md D34)")
    g.add_argument("--min-eps-range", type=float, default=4.0, help="the bisection searches [0, RANGE x --bim-eps]")
    g.add_argument("--noise-std", type=float, default=1.0, help="std of the noise added before upscaling (P2 footnote 6)")
    g.add_argument("--n-plot", type=int, help="training points drawn in Fig 4")
    g.add_argument("--inv-lambda", type=float, default=0.01, help="appb: weight decay of the 'weight decay' MLP (P2 gives "
                   "none at sqrt(d) = 28; Table 11's smallest, DECISIONS.md D20)")
    g.add_argument("--invariance-dir", default=str(pathlib.Path(__file__).resolve().parent / "data" / "excessive_invariance"),
                   help="appb: Tramer et al.'s invariance examples (bundled)")
    add_run_flags(p, "exp_input_dim", unit="runs", data="the datasets",
                     outputs="table.md, claims.md and fig4.png")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("seeds", "mlp_seeds", "epochs", "mlp_epochs", "bottleneck_epochs", "bim_steps",
                                         "batch_size", "n_plot"),
                  positive=("fgsm_eps", "bim_eps", "bim_step", "lr", "min_eps_range"),
                  non_negative=("noise_std", "snapshots", "inv_lambda", "min_eps_iters"))
    if args.artifact == "appb" and args.dataset != "mnist":
        p.error("--artifact appb: needs --dataset mnist (the invariance examples are 28x28 MNIST images)")
    if any(e > args.bottleneck_epochs for e in args.snapshots):
        p.error(f"--snapshots {args.snapshots}: expected epochs in 0..{args.bottleneck_epochs} (--bottleneck-epochs)")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
