"""Which norm's features transfer (P1 Table 3) and black-box transfer between BN and unnormalized VGGs (P2 Table 10).

P1 Table 3: from each source VGG16 (five norms; standard or l2-adversarially trained) extract images that
carry only the features the source uses (P1 App. B.3: match the source's penultimate features of each training
image x from a training image of another class, 1000 steps of 0.1, label y), then ask every target of the
same training type: --mode evaluate (default) the fraction of extracted images it classifies as y (the
diagonal, source = target, is a sanity check), or --mode retrain: its test accuracy after training on
the extracted set (Ilyas et al.'s protocol). P2 Table 10: untargeted BIM-linf examples made on VGG11 with
and without BN, evaluated on VGG11/13/16/19 with and without BN (top-1 and top-5; the diagonal is the
white-box value), on ImageNet with torchvision's released weights from a local folder, or on the
offline substitute (CIFAR-10 or the digits, VGGs trained here), labelled as such.

Quick results (update_readme.py writes this from results/quick/):
    python exp_transfer.py --preset quick --artifact p1_t3 --cache cache
        0 held / 3 reversed / 5 inconclusive / 0 underpowered
        P1 Table 3: Among standard sources, no norm transfers better than BN: -18.0 [-23.7, -12.3] (reversed)
    python exp_transfer.py --preset quick --artifact p2_t10 --cache cache
        0 held / 2 reversed / 6 inconclusive / 1 underpowered
        P2 Table 10: A BN source fools an unnormalized VGG13 less than an unnormalized source fools VGG13-BN: -7.7
          [-13.8, -1.7] (reversed)

Run it:
    python exp_transfer.py --artifact p1_t3 --cache cache              # CIFAR-10, VGG16 x 5 norms x 2 trainings
    python exp_transfer.py --artifact p1_t3 --mode retrain             # Ilyas-style: 25 trainings per block
    python exp_transfer.py --artifact p2_t10 --imagenet-root IMAGENET --weights-dir WEIGHTS
    python exp_transfer.py --preset quick --artifact p2_t10            # the substitute on the digits, CPU
    python exp_transfer.py --plot-only runs/exp_transfer/<run>

Models are trained with exp_corruption.py's (P1) and exp_table1.py's (P2 Table 3) recipes and cache
keys, so --cache reuses models those scripts trained (DECISIONS.md D30).
"""
import functools
import time

import torch

from common import (Data, DataError, IMAGENET_MEAN, IMAGENET_STD, ImageNetFolder, NORMS, Standardize, Sweep, TV_WEIGHT_FILES,
                    accuracy, add_run_flags, build_dataset, cache_path, check_numbers, claim, class_balanced_subset, eval_mode,
                    fmt_mean_sem, imagenet_subset, invert_features, load_tv_weights, log_to, make_model, make_parser, mean_sem,
                    merge_runs, model_in_space, model_key, model_kwargs, other_label_indices, paper_recipe, parse_with_presets,
                    pgd, pick_device, prepare_run_dir, print_config, run_script, save_figure, set_seed, show, train_model,
                    tv_weights_path, with_overrides, write_claims, write_config, write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

ARTIFACTS = {
    "p1_t3": dict(title="P1 Table 3: feature transfer between VGGs with five norms",
                  runs=dict(space="pixels", norms=list(NORMS), trainings=["standard", "adversarial"])),
    "p2_t10": dict(title="P2 Table 10: black-box BIM transfer from VGG11 +-BN to VGG11/13/16/19 +-BN",
                   runs=dict(space="standardized", norms=["none", "bn"], archs=["vgg11", "vgg13", "vgg16", "vgg19"])),
}

TV_NAMES = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]  # torchvision's ImageNet VGGs (P2 Table 10)



RETRAIN = dict(epochs=150, lr=0.01, milestones=(50, 100), augment=True)        # P1 Table 6, D_NR row


PRESETS = {
    "paper": dict(dataset="cifar10", size=None, channels=None, arch=None, width=1.0, epochs=None, lr=None,
                  batch_size=128, weight_decay=5e-4, warmup_epochs=0.0, adv_eps=0.5, adv_steps=7, adv_step_size=0.1,
                  per_class=None, inv_steps=1000, inv_step=0.1, eps=0.03, bim_steps=10, bim_step=None, n_eval=None,
                  retrain_epochs=150, gn_groups=None, seeds=1),
    # The digits at 32x32 RGB with exp_corruption.py's quick recipe (VGG11 for VGG16, DECISIONS.md D28), budgets
    # 4x (adversarial training eps 2.0; BIM eps 0.12 standardized), inversion 100 steps of 0.4, 3 seeds.
    "quick": dict(dataset="digits", size=32, channels=3, arch=None, width=0.125, epochs=10, lr=0.02, batch_size=16,
                  weight_decay=5e-4, warmup_epochs=2.0, adv_eps=2.0, adv_steps=3, adv_step_size=2.5 * 2.0 / 3,
                  per_class=10, inv_steps=100, inv_step=0.4, eps=0.12, bim_steps=10, bim_step=None, n_eval=None,
                  retrain_epochs=10, gn_groups=2, seeds=3),
    "smoke": dict(dataset="synthetic", size=16, channels=None, arch=None, width=1 / 16, epochs=1, lr=0.02, batch_size=32,
                  weight_decay=5e-4, warmup_epochs=0.0, adv_eps=0.5, adv_steps=1, adv_step_size=0.5, per_class=2,
                  inv_steps=3, inv_step=0.5, eps=0.1, bim_steps=2, bim_step=None, n_eval=40, retrain_epochs=1,
                  gn_groups=2, seeds=1),
}


def resolve(preset, artifact):
    """The values that run for this preset and artifact (shown by --help, saved in config.json)."""
    v = dict(PRESETS[preset])
    if v["arch"] is None:
        v["arch"] = (["vgg16"] if preset == "paper" else ["vgg11"]) if artifact != "p2_t10" else \
            ARTIFACTS["p2_t10"]["runs"]["archs"]
    v["norm"] = ARTIFACTS.get(artifact or "p1_t3", ARTIFACTS["p1_t3"])["runs"]["norms"]
    return v


# ================================================================================================
# 2. Experiment
# ================================================================================================

def recipe(args, space, norm, training):
    """The training recipe, as exp_corruption.py (P1) and exp_table1.py (P2 Table 3) build it (common.RECIPES)."""
    r = paper_recipe("p1_cifar_vgg") if space == "pixels" else paper_recipe("p2_depth", norm)
    r = with_overrides(r, args, args.dataset)
    if training == "adversarial":
        r["adv"] = dict(kind="pgd", norm="l2", eps=args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size,
                        clip=(0.0, 1.0))
    return r


def get_model(args, data, space, arch, norm, training, seed, device, run_dir):
    """Train (or take from the cache / the run directory) one model. P1 models standardize inside (inputs in
    [0, 1]); P2 models take standardized inputs (returned input_fn). Returns (model, input_fn, status, reason)."""
    set_seed(seed)
    kw = model_kwargs(arch, norm, data, args.width, args.gn_groups)
    model, input_fn = model_in_space(arch, kw, space, data.mean, data.std, device)
    r = recipe(args, space, norm, training)
    key = model_key(args.dataset, args.size, arch, kw, r, seed, args.amp, space, data.mean, data.std, args.channels)
    ckpt = run_dir / "ckpt" / f"{arch}_{norm}_{training}_s{seed}.pt"
    res = train_model(model, data, r | dict(input_fn=input_fn), seed=seed, ckpt=cache_path(args.cache, key) or ckpt,
                      amp=args.amp, tag=f"[{arch} {norm} {training} s{seed}]", key=key, ddp_bn=args.ddp_bn)
    return model.eval(), input_fn, res["status"], res["reason"]


def extract(args, model, x, y, seed, tag, batch_size=250):
    """P1 Table 3's extraction (App. B.3): match the source's features of each pool image (the training set, by
    default) from a pool image of another label; uint8-rounded like a saved dataset. Logs images/s."""
    start = other_label_indices(y.cpu(), y.cpu(), torch.Generator().manual_seed(seed)).to(x.device)
    t0, out = time.time(), []
    for i in range(0, len(y), batch_size):
        out.append(invert_features(model, x[i:i + batch_size], x[start[i:i + batch_size]], args.inv_steps, args.inv_step))
    if x.is_cuda:
        torch.cuda.synchronize()  # (kernels run asynchronously: time them to their end)
    rate = len(y) / max(time.time() - t0, 1e-9)
    print(f"{tag} extracted {len(y)} images ({args.inv_steps} steps of {args.inv_step:g}) | {rate:.1f} images/s")
    return (torch.cat(out) * 255).round() / 255


def agree(model, x, y, input_fn=None, batch_size=500, k=(1, 5)):
    """Top-k accuracy (fractions) of `model` on (x, y), in eval mode."""
    hits = {j: 0 for j in k}
    with torch.no_grad(), eval_mode(model):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            top = model(input_fn(xb) if input_fn else xb).topk(max(k), 1).indices
            for j in k:
                hits[j] += int((top[:, :j] == yb[:, None]).any(1).sum())
    return {j: hits[j] / len(y) for j in k}


def planned_runs(args):
    """(name, record fields) of every run in a fixed order (the unit of --shard): P1 Table 3 by seed and training
    type (its five models, their extraction and scoring), P2 Table 10 by seed (its eight models and the attack)."""
    if args.artifact == "p1_t3":
        return [(f"p1_t3_{t}_s{s}", dict(seed=s, training=t)) for s in range(args.seeds) for t in ("standard", "adversarial")]
    seeds = 1 if getattr(args, "setting", None) == "imagenet" else args.seeds
    return [(f"p2_t10_s{s}", dict(seed=s)) for s in range(seeds)]


def run_p1_t3(args, data, device, run_dir, seed, training, records, save):
    """One seed and training type: the five sources' extracted sets, scored by (or retraining) the five targets.
    `records` holds what an interrupted run finished (kept); save(records) after every source."""
    # P1 App. B.3: "for each sample x from D", the training set (--extract-from test: the test set), or a fixed
    # class-balanced part of it (--per-class)
    xs, ys = (data.x_train, data.y_train) if args.extract_from == "train" else (data.x_test, data.y_test)
    pool = class_balanced_subset(ys, args.per_class) if args.per_class else torch.arange(len(ys), device=ys.device)
    x_pool, y_pool = xs[pool], ys[pool]
    done = {(r["source"], r["target"]) for r in records}
    models = {n: get_model(args, data, "pixels", args.arch[0], n, training, seed, device, run_dir) for n in args.norm}
    for src in args.norm:
        if all((src, t) in done for t in args.norm):
            continue
        model, _, status, reason = models[src]
        if status != "ok":
            records += [dict(artifact="p1_t3", training=training, source=src, target=t, seed=seed, mode=args.mode,
                             status="failed", reason=f"source: {reason}", diagonal=src == t) for t in args.norm]
            continue
        x_ext = extract(args, model, x_pool, y_pool, seed, f"[{training} {src} s{seed}]")
        for tgt in args.norm:
            tmodel, _, tstatus, treason = models[tgt]
            rec = dict(artifact="p1_t3", training=training, source=src, target=tgt, seed=seed, mode=args.mode,
                       status=tstatus, reason=treason, diagonal=src == tgt)
            if args.mode == "retrain":
                set_seed(seed)
                net = make_model(args.arch[0], norm=tgt, width=args.width, num_classes=data.num_classes,
                                 in_channels=data.shape[0], mean=data.mean, std=data.std,
                                 **(dict(gn_groups=args.gn_groups) if args.gn_groups else {})).to(device)
                train = Data("extracted", x_ext, y_pool, data.x_test, data.y_test, data.mean, data.std)
                r = dict(RETRAIN, epochs=args.retrain_epochs, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                         augment=args.dataset == "cifar10",
                         milestones=tuple(round(m * args.retrain_epochs / RETRAIN["epochs"]) or 1
                                          for m in RETRAIN["milestones"]))
                res = train_model(net, train, r, seed=seed, tag=f"[retrain {tgt} on {training} {src} s{seed}]",
                                  ckpt=run_dir / "ckpt" / f"retrain_{training}_{src}_to_{tgt}_s{seed}.pt",
                                  key=dict(retrain=tgt, source=src, training=training, seed=seed, recipe=r),
                                  ddp_bn=args.ddp_bn)
                rec |= dict(status=res["status"], reason=res["reason"],
                            score=accuracy(net, data.x_test, data.y_test) if res["status"] == "ok" else None)
            elif tstatus == "ok":
                rec["score"] = accuracy(tmodel, x_ext, y_pool)
            records.append(rec)
        save(records)
    return records


def imagenet_models(args, device):
    """torchvision's VGGs with their released ImageNet weights from --weights-dir, in this project's torchvision-
    compatible models (common.ImageNetVGG; no torchvision, no download at run time)."""
    models = {}
    for name in tv_names(args):
        arch, bn = name.split("_")[0], name.endswith("_bn")
        m = make_model(f"imagenet_{arch}", norm="bn" if bn else "none", num_classes=1000)
        models[name] = load_tv_weights(m, args.weights_dir, name).to(device).eval()
    return models


def imagenet_ready(args):
    """None when P2's own ImageNet setting runs (both --imagenet-root and --weights-dir given; then a missing folder or a
    missing, renamed or corrupt weight file is one DataError line, never a silent fallback), else the one-line reason
    the offline substitute runs instead."""
    if not args.imagenet_root and not args.weights_dir:
        return "no --imagenet-root and --weights-dir given"
    if not args.imagenet_root or not args.weights_dir:
        raise DataError("p2_t10 on ImageNet needs both --imagenet-root and --weights-dir")
    ImageNetFolder(args.imagenet_root, "val")  # (checks the layout: one DataError line)
    for name in tv_names(args):
        tv_weights_path(args.weights_dir, name)
    return None


def tv_names(args):
    """torchvision's names of the VGGs this run evaluates (--arch x --norm), e.g. vgg11, vgg11_bn."""
    return [f"{a}{'_bn' if n == 'bn' else ''}" for a in args.arch for n in args.norm]


def run_p2_t10(args, data, device, run_dir, seed, setting):
    """One seed: BIM-linf from VGG11 +-BN (standardized inputs), evaluated on every target; diagonal = white box."""
    names = tv_names(args)
    records = []
    if setting == "imagenet":
        nets = imagenet_models(args, device)
        std_fn = Standardize(IMAGENET_MEAN, IMAGENET_STD).to(device)
        models = {k: (m, std_fn, "ok", "") for k, m in nets.items() if k in names}
        x, y = data
        clip = (-2.0, 2.0)  # P2's white-box ImageNet setting (standardized units)
    else:
        models = {f"{a}{'_bn' if n == 'bn' else ''}": get_model(args, data, "standardized", a, n, "standard", seed, device,
                                                               run_dir) for a in args.arch for n in args.norm}
        idx = torch.arange(len(data.y_test))
        if args.n_eval and args.n_eval < len(idx):
            idx = class_balanced_subset(data.y_test, max(1, args.n_eval // data.num_classes))
        x, y = data.x_test[idx], data.y_test[idx]
        clip = (-2.0, 2.0)  # P2's CIFAR-10 clip (standardized units)
    eps = args.imagenet_eps if setting == "imagenet" else args.eps
    step = args.bim_step or (5e-3 if setting == "imagenet" else eps / 2)  # P2 App. A.4: 5e-3 on ImageNet
    for src in ("vgg11", "vgg11_bn"):
        smodel, sfn, sstatus, sreason = models[src]
        x_adv = None
        if sstatus == "ok":
            xs = sfn(x)
            x_adv = torch.cat([pgd(smodel, xb, yb, eps, args.bim_steps, step, norm="linf", clip=clip)
                               for xb, yb in zip(xs.split(250), y.split(250))])
        for tgt in names:
            tmodel, _, tstatus, treason = models[tgt]
            rec = dict(artifact="p2_t10", setting=setting, source=src, target=tgt, seed=seed, diagonal=src == tgt, eps=eps,
                       status="ok" if sstatus == tstatus == "ok" else "failed",
                       reason=sreason if sstatus != "ok" else treason)
            if rec["status"] == "ok":
                acc = agree(tmodel, x_adv, y)
                clean = agree(tmodel, sfn(x), y)
                rec |= dict(top1=acc[1], top5=acc[5], clean_top1=clean[1], clean_top5=clean[5])
            records.append(rec)
    return records


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_transfer.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        print(f"redrew {run_dir / 'table.md'}, claims.md and figure.png")
        return
    device = pick_device(args.device)
    setting = None
    if args.artifact == "p2_t10":
        why = imagenet_ready(args)
        setting = "imagenet" if why is None else "substitute"
        if why:
            print(f"p2_t10 on ImageNet skipped ({why}); running the offline substitute on {args.dataset}")
    if setting == "imagenet":
        x, y = imagenet_subset(ImageNetFolder(args.imagenet_root, "val"), args.n_eval or 2048, seed=0)
        data = (x.to(device), y.to(device))
    else:
        data = build_dataset(args.dataset, args.data_root, device, args.download, size=args.size, channels=args.channels,
                             n_train=1000 if args.dataset == "synthetic" else None)
        for a in args.arch:
            for n in args.norm:
                with torch.device("meta"):  # a wrong architecture or norm fails here, before anything is written
                    make_model(a, norm=n, width=args.width, in_channels=data.shape[0],
                               **(dict(gn_groups=args.gn_groups) if args.gn_groups else {}))
    run_dir = prepare_run_dir("exp_transfer", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    args.setting = setting  # (saved: it decides P2 Table 10's runs)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    print(f"run directory: {run_dir} | device: {device} | {ARTIFACTS[args.artifact]['title']}")
    sweep = Sweep(run_dir, planned_runs(args), args.shard, adopt_complete=lambda _, recs: len(recs) == (
        len(args.norm) ** 2 if args.artifact == "p1_t3" else 2 * len(args.arch) * len(args.norm)))
    t0 = time.time()
    for _, name, r in sweep.todo():
        if args.artifact == "p1_t3":
            save = lambda recs: sweep.save(name, recs, finished=False)  # every finished source is kept
            sweep.save(name, run_p1_t3(args, data, device, run_dir, r["seed"], r["training"], sweep.previous(name), save))
        else:
            sweep.save(name, run_p2_t10(args, data, device, run_dir, r["seed"], setting))
    records = sweep.records()
    write_outputs(run_dir, records, vars(args))
    show(run_dir / "table.md")
    show(run_dir / "claims.md")
    print(f"wrote {run_dir} in {time.time() - t0:.0f}s" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

claim_pp = functools.partial(claim, scale=100.0)  # accuracies: effects in percentage points
STD, ADV = dict(training="standard"), dict(training="adversarial")

P1T3_CLAIMS = [
    claim_pp("t3_robust_sources", "P1 Table 3", "Features from robust (adversarially trained) sources transfer better "
          "than from standard ones", "right block higher (numbers not given)", "transfer", ADV, STD, ">", per=("source",)),
    *[claim_pp(f"t3_none_best_{n}", "P1 Table 3", f"Among standard sources, no norm transfers better than {n.upper()}",
            "no-norm row best (bold)", "transfer", STD | dict(source="none"), STD | dict(source=n), ">")
      for n in ("bn", "in", "ln", "gn")],
    *[claim_pp(f"t3_in_worst_{n}", "P1 Table 3", f"Among standard sources, IN transfers worse than {n.upper()}",
            "IN worst", "transfer", STD | dict(source="in"), STD | dict(source=n), "<")
      for n in ("none", "bn", "ln", "gn")],
]


P2T10_CLAIMS = [
    *[claim_pp(f"t10_bn_src_weaker_{d}", "P2 Table 10", f"A BN source fools an unnormalized VGG{d} less than an "
            f"unnormalized source fools VGG{d}-BN", "top-1 10.5-16.4 points higher", "top1",
            dict(source="vgg11_bn", target=f"vgg{d}"), dict(source="vgg11", target=f"vgg{d}_bn"), ">", paper_effect=10.5)
      for d in (13, 16, 19)],
    *[claim_pp(f"t10_none_src_vs_none_{d}", "P2 Table 10", f"Against unnormalized VGG{d}, the unnormalized source is "
            f"the stronger attacker", "16.5-20.4 points lower top-1", "top1", dict(source="vgg11", target=f"vgg{d}"),
            dict(source="vgg11_bn", target=f"vgg{d}"), "<", paper_effect=-16.5) for d in (13, 16, 19)],
    *[claim_pp(f"t10_none_src_vs_bn_{d}", "P2 Table 10", f"Against VGG{d}-BN, the unnormalized source is still slightly "
            f"stronger", "2.1-4.9 points lower top-1", "top1", dict(source="vgg11", target=f"vgg{d}_bn"),
            dict(source="vgg11_bn", target=f"vgg{d}_bn"), "<", paper_effect=-2.1) for d in (13, 16, 19)],
]

CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "p1_t3": P1T3_CLAIMS,
    "p2_t10": P2T10_CLAIMS,
}


def claim_rows(records, artifact):
    """p1_t3: one row per (training, source, seed) with transfer = mean score over the other targets.
    p2_t10: the cells themselves (one per source, target and seed)."""
    ok = [r for r in records if r.get("status") == "ok"]
    if artifact == "p2_t10":
        return ok
    rows = {}
    for r in ok:
        if not r["diagonal"] and r.get("score") is not None:
            rows.setdefault((r["training"], r["source"], r["seed"]), []).append(r["score"])
    return [dict(training=t, source=s, seed=seed, transfer=sum(v) / len(v), status="ok")
            for (t, s, seed), v in rows.items()]


def cell(records, key, **where):
    vals = [r.get(key) for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in where.items())]
    return [v for v in vals if v is not None]


def make_table(records, cfg, header):
    lines = [header, ""]
    if cfg["artifact"] == "p1_t3":
        norms = list(dict.fromkeys(r["source"] for r in records))
        what = ("fraction of a source's extracted images that the target classifies as their label y" if
                cfg["mode"] == "evaluate" else "test accuracy of the target retrained on the source's extracted images")
        pool = (f"{cfg['per_class']} per class of the" if cfg.get("per_class") else "every image of the")
        lines += [f"{cfg['arch'][0]} sources (rows) and targets (columns); {what}, mean ± SEM over seeds (%); "
                  f"diagonal (*) = source = target, a sanity check. Extraction: {pool} "
                  f"{cfg.get('extract_from', 'test')} set, "
                  f"{cfg['inv_steps']} steps of {cfg['inv_step']:g}. transfer = mean over the other targets.", ""]
        for training in ("standard", "adversarial"):
            rows = [r for r in records if r["training"] == training]
            if not rows:
                continue
            lines += [f"**{training} training**", "", "| source \\ target | " + " | ".join(norms) + " | transfer |",
                      "|---|" + "---|" * (len(norms) + 1)]
            for s in norms:
                cells = []
                for t in norms:
                    v = cell(rows, "score", source=s, target=t)
                    cells.append((fmt_mean_sem(v) if v else "missing") + (" *" if s == t else ""))
                tr = [sum(o) / len(o) for seed in {r["seed"] for r in rows}
                      if (o := cell(rows, "score", source=s, seed=seed, diagonal=False))]
                lines.append(f"| {s} | " + " | ".join(cells) + f" | {fmt_mean_sem(tr) if tr else 'missing'} |")
            lines.append("")
    else:
        setting = records[0]["setting"] if records else "substitute"
        names = list(dict.fromkeys(r["target"] for r in records))
        label = ("ImageNet, torchvision weights (P2's setting)" if setting == "imagenet" else
                 f"SUBSTITUTE: {cfg['dataset']} with VGGs trained here, not P2's ImageNet models")
        eps = records[0].get("eps", cfg["eps"]) if records else cfg["eps"]
        lines += [f"{label}. Accuracy (%) under untargeted BIM-linf made on the source (rows), eps {eps:g} "
                  f"(standardized), {cfg['bim_steps']} steps; diagonal (*) = white box; mean ± SEM over seeds; "
                  "missing = a model that did not train.", ""]
        for k in ("top1", "top5"):
            lines += [f"**{k}**", "", "| source \\ target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for s in ("vgg11", "vgg11_bn"):
                cells = [(fmt_mean_sem(v) if (v := cell(records, k, source=s, target=t)) else "missing") +
                         (" *" if s == t else "") for t in names]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
        clean = [(t, cell(records, "clean_top1", source="vgg11", target=t)) for t in names]
        lines += ["clean top-1: " + ", ".join(f"{t} {fmt_mean_sem(v) if v else 'missing'}" for t, v in clean), ""]
    failed = sorted({(r.get("training", ""), r["source"], r["target"], r["seed"], r["reason"]) for r in records
                     if r["status"] != "ok"}, key=str)
    lines += [f"- missing: {t} {s} → {g} seed {seed}: {why}".replace("-  ", "- ") for t, s, g, seed, why in failed]
    return "\n".join(lines) + "\n"


def make_figure(records, cfg, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if cfg["artifact"] == "p1_t3":
        norms = list(dict.fromkeys(r["source"] for r in records))
        panels = [(t, "score", norms) for t in ("standard", "adversarial") if any(r["training"] == t for r in records)]
    else:
        names = list(dict.fromkeys(r["target"] for r in records))
        panels = [(k, k, names) for k in ("top1", "top5")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (name, key, targets) in zip(axes[0], panels):
        sources = targets if cfg["artifact"] == "p1_t3" else ["vgg11", "vgg11_bn"]
        where = dict(training=name) if cfg["artifact"] == "p1_t3" else {}
        m = [[(mean_sem(v)[0] * 100 if (v := cell(records, key, source=s, target=t, **where)) else float("nan"))
              for t in targets] for s in sources]
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, "missing" if v != v else f"{v:.0f}" + ("*" if sources[i] == targets[j] else ""),
                        ha="center", va="center", color="0.4" if v != v else "w" if v < 60 else "k", fontsize=8)
        ax.set_xticks(range(len(targets)), targets, rotation=30, fontsize=8)
        ax.set_yticks(range(len(sources)), sources, fontsize=8)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(name if cfg["artifact"] == "p1_t3" else f"{name} accuracy under transfer (%)")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write_outputs(run_dir, records, cfg):
    art = cfg["artifact"]
    setting = next((r["setting"] for r in records if "setting" in r), None)
    extra = ("" if art == "p1_t3" else ", ImageNet" if setting == "imagenet" else f", SUBSTITUTE on {cfg['dataset']}")
    header = f"# {ARTIFACTS[art]['title']} (preset {cfg['preset']}{', ' + cfg['dataset'] if art == 'p1_t3' else ''}{extra})"
    write_text_atomic(run_dir / "table.md", make_table(records, cfg, header))
    make_figure(records, cfg, run_dir / "figure.png", header[2:])
    write_claims(run_dir, CLAIMS[art], claim_rows(records, art), "# Claims: " + header[2:])


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "p1_t3", PRESETS)
    g.add_argument("--mode", default="evaluate", choices=["evaluate", "retrain"], help="p1_t3: score the trained "
                   "targets on the extracted images, or retrain each target on them and report its test accuracy")
    g.add_argument("--dataset", choices=["cifar10", "digits", "synthetic"], help="dataset (p2_t10: the substitute's)")
    g.add_argument("--arch", nargs="+", help="p1_t3: the VGG of sources and targets (vgg16); p2_t10: the targets")
    g.add_argument("--norm", nargs="+", choices=list(NORMS), help="norms of sources and targets")
    g.add_argument("--seeds", type=int, help="seeds (every model and extraction per seed)")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=float, help="channel multiplier (1 = the paper's models)")
    g.add_argument("--epochs", type=int, help="training epochs (unset: each recipe: P1 VGG 200, P2 Table 3 350)")
    g.add_argument("--lr", type=float, help="initial LR (unset: each recipe)")
    g.add_argument("--batch-size", type=int, help="SGD batch size")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up epochs")
    g.add_argument("--adv-eps", type=float, help="p1_t3 adversarial training: l2 PGD budget (0.5)")
    g.add_argument("--adv-steps", type=int, help="its PGD steps (7)")
    g.add_argument("--adv-step-size", type=float, help="its step size (0.1)")
    g.add_argument("--retrain-epochs", type=int, help="p1_t3 --mode retrain: epochs (P1 Table 6: 150)")
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (unset: min(32, channels))")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--extract-from", choices=["train", "test"], default="train",
                   help="p1_t3: extract features of the training set (P1 App. B.3: 'each sample x from D') or the test set")
    g.add_argument("--per-class", type=int, help="p1_t3: extract from a class-balanced part of it, this many images per "
                   "class (unset: every image)")
    g.add_argument("--inv-steps", type=int, help="p1_t3: feature-matching steps (P1 App. B.3: 1000)")
    g.add_argument("--inv-step", type=float, help="p1_t3: l2 length of each step (0.1)")
    g.add_argument("--eps", type=float, help="p2_t10 substitute: BIM-linf budget, standardized units (0.03)")
    g.add_argument("--imagenet-eps", type=float, default=0.01, help="p2_t10 on ImageNet: BIM-linf budget, standardized "
                   "units (not stated by P2; its white-box ImageNet eps, DECISIONS.md D30)")
    g.add_argument("--bim-steps", type=int, help="p2_t10: BIM steps (10)")
    g.add_argument("--bim-step", type=float, help="p2_t10: BIM step (unset: eps/2 on the substitute, P2's 5e-3 on "
                   "ImageNet)")
    g.add_argument("--n-eval", type=int, help="p2_t10: test images attacked (unset: all; ImageNet 2048)")
    g = add_run_flags(p, "exp_transfer", unit="runs", data="cifar-10-batches-py/",
                         download="fetch CIFAR-10 if missing (md5-checked)",
                         cache="shared checkpoint cache: reuse a model exp_corruption.py or exp_table1.py trained with "
                               "the same recipe", outputs="table.md, claims.md and the figure")
    g.add_argument("--imagenet-root", help="p2_t10: ImageNet folder (val/<wnid>/*.JPEG); with "
                   "--weights-dir it runs P2's own setting, otherwise the substitute runs")
    g.add_argument("--weights-dir", help="p2_t10: folder with torchvision's VGG weight files (" +
                   ", ".join(TV_WEIGHT_FILES[n] for n in TV_NAMES) + ")")
    g.add_argument("--size", type=int, help="resize images to size x size (unset: the dataset's own)")
    g.add_argument("--channels", type=int, help="repeat grey images to this many channels")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("seeds", "epochs", "batch_size", "adv_steps", "per_class", "bim_steps", "n_eval",
                                         "retrain_epochs", "size", "channels", "gn_groups"),
                  positive=("width", "lr", "adv_eps", "adv_step_size", "inv_step", "eps", "imagenet_eps", "bim_step"),
                  non_negative=("weight_decay", "warmup_epochs", "inv_steps"))
    bad = [a for a in args.arch if not (a.startswith("vgg") and a[3:] in ("8", "11", "13", "16", "19"))]
    if bad:
        p.error(f"--arch {bad[0]}: expected VGGs (vgg8, vgg11, vgg13, vgg16, vgg19)")
    if args.artifact == "p2_t10" and "vgg11" not in args.arch:
        p.error("--arch: p2_t10's source is VGG11, which must be among the targets")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
