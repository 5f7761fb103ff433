"""Robust and non-robust feature datasets, and what BN learns from them (P1 Sec. 4.2, App. B.3, App. E).

Builds Ilyas et al.'s (2019) datasets from a standard and an l2-adversarially trained source model
(P1 App. E: ResNet50): D_R (robust features: the robust source's representation of x, inverted from a
random image of another class), D_NR (the same with the standard source), D_rand and D_det (targeted l2
PGD on the standard source, labelled with the target) and P1's D_conflict (D_R images attacked towards
the next class). Then trains ResNet18 with and without BN on each (P1 Table 6) and measures on the real
test set with true labels, every epoch: clean and robust accuracy, LIGS, and for D_det and D_conflict the
accuracies aligned with the robust and with the non-robust features. Reproduces P1 Figs 6, 12, 7, 13.

Quick results (update_readme.py writes this from results/quick/):
    python exp_feature_datasets.py --preset quick --artifact build --cache cache
        0 held / 0 reversed / 0 inconclusive / 0 underpowered
    python exp_feature_datasets.py --preset quick --artifact fig12 --cache cache
        3 held / 0 reversed / 1 inconclusive / 0 underpowered
        P1 Fig 12: LIGS on D_NR is above LIGS on D_rand: +0.018 [+0.013, +0.023] (held)
    python exp_feature_datasets.py --preset quick --artifact fig13 --cache cache
        2 held / 1 reversed / 1 inconclusive / 0 underpowered
        P1 Fig 13: Without BN, RF-aligned accuracy stays above NRF-aligned accuracy: -73.6 [-95.6, -51.6] (held)
    python exp_feature_datasets.py --preset quick --artifact fig6 --cache cache
        7 held / 1 reversed / 4 inconclusive / 0 underpowered
        P1 Fig 6: LIGS of a model trained on D_R is above 0.9: +0.095 [+0.094, +0.096] (held)
    python exp_feature_datasets.py --preset quick --artifact fig7 --cache cache
        1 held / 0 reversed / 3 inconclusive / 0 underpowered
        P1 Fig 7: Without BN, RF-aligned accuracy stays above NRF-aligned accuracy: -69.1 [-123.0, -15.2] (held)

Run it:
    python exp_feature_datasets.py --artifact build --cache cache      # the five datasets (CIFAR-10; GPU hours)
    python exp_feature_datasets.py --artifact fig6 --cache cache       # D_R and D_rand, reusing what build made
    python exp_feature_datasets.py --artifact fig6 --datasets-from released   # Ilyas et al.'s released sets
    python exp_feature_datasets.py --preset quick --artifact fig7      # bundled digits, CPU, minutes
    python exp_feature_datasets.py --plot-only runs/exp_feature_datasets/<run>

Datasets are built in chunks under --datasets-dir (default: CACHE/feature_datasets with --cache, else
inside the run directory), named by a hash of everything that determines them; a killed build resumes
at its first missing chunk and ends with the same dataset. Every example is kept (P1 does not say
whether failed targeted attacks were filtered); the success rate and feature distances are logged.
"""
import hashlib
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

from common import (Data, DataError, Sweep, accuracy, add_run_flags, build_dataset, cache_path, check_numbers, claim,
                    class_balanced_subset, ddp_rank, epoch_metrics, eval_mode, feature_distance, fmt_mean_sem, invert_features,
                    load_tensors, log_to, make_model, make_parser, mean_sem, median_minimal_eps, merge_runs, model_key,
                    other_label_indices, parse_with_presets, pgd, pick_device, prepare_run_dir, print_config,
                    read_ilyas_dataset, run_script, save_atomic, save_figure, set_seed, show, train_model, write_claims,
                    write_config, write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

KINDS = ("d_r", "d_nr", "d_rand", "d_det", "d_conflict")

TABLE6 = {  # P1 Table 6: initial LR and data augmentation per dataset (SGD 0.9, WD 5e-4, batch 128, 150 epochs).
    # augment=True is the robustness library's default (crop+flip, ColorJitter(.25, .25, .25), RandomRotation(2)) with
    # which the authors train; --augment crop-flip drops the last two
    "d_r": dict(lr=0.01, augment=True), "d_nr": dict(lr=0.01, augment=True), "d_rand": dict(lr=0.01, augment=True),
    "d_det": dict(lr=0.1, augment=False), "d_conflict": dict(lr=0.1, augment=False)}


ALIGNED = ("d_det", "d_conflict")  # robust features point to the original class, non-robust ones to the label

ARTIFACTS = {
    "build": dict(title="P1 App. E: the feature datasets D_R, D_NR, D_rand, D_det, D_conflict",
                  runs=dict(datasets=list(KINDS))),
    "fig6": dict(title="P1 Fig 6: ResNet18 with and without BN on D_R and D_rand",
                 runs=dict(datasets=["d_r", "d_rand"])),
    "fig12": dict(title="P1 Fig 12: LIGS on D_R, D_NR and D_rand", runs=dict(datasets=["d_r", "d_nr", "d_rand"])),
    "fig7": dict(title="P1 Fig 7: D_conflict, RF- and NRF-aligned accuracy", runs=dict(datasets=["d_conflict"])),
    "fig13": dict(title="P1 Fig 13: D_det, RF- and NRF-aligned accuracy", runs=dict(datasets=["d_det"])),
}


PRESETS = {
    # Sources (P1 App. E): ResNet50 with P1's ResNet recipe (App. B.1: 350 epochs, LR 0.1, /10 at 150 and 250),
    # the robust one l2-adversarially trained at eps 0.5, 7 steps of 0.1 (the robustness library's CIFAR model
    # that Ilyas et al. used). Building: P1 App. B.3 (1000 steps of 0.1) and Ilyas et al. (eps 0.5, 100 steps of
    # 0.1). Targets: P1 Table 6; evaluation P1 Sec. 4 (l2 eps 0.25, 10 steps, 1000 test images).
    "paper": dict(dataset="cifar10", size=None, channels=None, source_arch="resnet50", source_width=1.0,
                  source_epochs=350, source_lr=0.1, source_milestones=[150, 250], adv_eps=0.5, adv_steps=7,
                  adv_step_size=0.1, n_build=None, chunk=1000, build_batch=500, inv_steps=1000, inv_step=0.1,
                  attack_eps=0.5, attack_step=0.1, attack_steps=100, arch="resnet18", width=1.0, epochs=150,
                  milestones=[50, 100], batch_size=128, weight_decay=5e-4, warmup_epochs=0.0, per_class=100,
                  eps=0.25, eval_steps=10, seeds=1, rand_seeds=3, gn_groups=None,
                  lrs={k: v["lr"] for k, v in TABLE6.items()}),
    # The bundled digits at 16x16 (DECISIONS.md D29): small ResNet18s as sources and targets, the quick recipe
    # of the other scripts for the sources (LR 0.02, warm-up), budgets 4x P1's as in exp_ligs_trend's quick
    # preset, 10x fewer inversion steps of 4x the length, 3 seeds of every target. Target LRs keep Table 6's
    # order but 0.01 is raised to 0.05: with 0.01, 15 epochs left the unnormalized ResNet18 on its initial
    # plateau on D_R in 2 of 3 seeds (measured).
    "quick": dict(dataset="digits", size=16, channels=None, source_arch="resnet18", source_width=0.125,
                  source_epochs=8, source_lr=0.02, source_milestones=[4, 6], adv_eps=2.0, adv_steps=3,
                  adv_step_size=2.5 * 2.0 / 3, n_build=None, chunk=250, build_batch=250, inv_steps=100, inv_step=0.4,
                  attack_eps=2.0, attack_step=0.4, attack_steps=20, arch="resnet18", width=0.125, epochs=15,
                  milestones=[5, 10], batch_size=32, weight_decay=5e-4, warmup_epochs=1.0, per_class=20, eps=1.0,
                  eval_steps=10, seeds=3, rand_seeds=3, gn_groups=2,
                  lrs=dict(d_r=0.05, d_nr=0.05, d_rand=0.05, d_det=0.1, d_conflict=0.1)),
    "smoke": dict(dataset="synthetic", size=16, channels=None, source_arch="resnet18", source_width=1 / 16,
                  source_epochs=1, source_lr=0.05, source_milestones=[], adv_eps=0.5, adv_steps=1, adv_step_size=0.5,
                  n_build=48, chunk=16, build_batch=16, inv_steps=3, inv_step=0.5, attack_eps=0.5, attack_step=0.2,
                  attack_steps=2, arch="resnet18", width=1 / 16, epochs=2, milestones=[1], batch_size=16,
                  weight_decay=5e-4, warmup_epochs=0.0, per_class=3, eps=0.25, eval_steps=2, seeds=1, rand_seeds=1,
                  gn_groups=2, lrs={k: v["lr"] for k, v in TABLE6.items()}, min_eps_iters=2),
}


def resolve(preset, artifact):
    """The values that run for this preset and artifact (shown by --help, saved in config.json)."""
    return dict(PRESETS[preset], norm=["none", "bn"], lr=None)


# ================================================================================================
# 2. Experiment
# ================================================================================================

def state_hash(model):
    """sha256 of a model's state (names and tensor bytes): identifies a source in the datasets' metadata."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


SOURCE_SHARD = dict(standard=0, robust=1)  # a sharded build: shard 0 (mod N) trains the standard source, 1 the robust


def finished(ckpt):
    """A training checkpoint that holds a finished model (train_model's state)."""
    if not pathlib.Path(ckpt).exists():
        return False
    return load_tensors(ckpt)["state"]["status"] != "running"


SHARD_NEEDS_BUILD = ("--shard: {what} is not there yet ({where}); training shards only read built datasets: build them "
                     "first with --artifact build (itself shardable) and the same --cache or --datasets-dir, then start "
                     "the training shards")


def key_hash(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def get_source(args, data, robust, device, run_dir):
    """The standard or robust source model (P1 App. E): loaded from --source-std/--source-rob, or trained
    here (adversarially: l2 PGD on adversarial examples only) and kept in the cache or the run directory."""
    role = "robust" if robust else "standard"
    kw = dict(gn_groups=args.gn_groups) if args.gn_groups else {}
    set_seed(0)  # the initial weights too: a process starts with a random torch seed
    model = make_model(args.source_arch, norm="bn", width=args.source_width, num_classes=data.num_classes,
                       in_channels=data.shape[0], mean=data.mean, std=data.std, **kw).to(device)
    path = args.source_rob if robust else args.source_std
    if path is not None:
        flag = f"--source-{'rob' if robust else 'std'} {path}"
        expected = f"a state_dict of make_model({args.source_arch!r}, norm='bn', width={args.source_width:g})"
        try:
            saved = load_tensors(path, flag)
            # the input standardization (input_norm.*) is the dataset's: a checkpoint without it keeps ours
            res = model.load_state_dict(saved.get("model", saved) if isinstance(saved, dict) else saved, strict=False)
        except Exception as e:
            detail = " ".join(str(e).split())[:200]
            raise DataError(f"{flag}: not {expected} ({e.__class__.__name__}: {detail})") from None
        bad = [k for k in res.missing_keys if not k.startswith("input_norm.")] + res.unexpected_keys
        if bad:
            raise DataError(f"{flag}: not {expected}: {len(bad)} parameter names differ, e.g. {', '.join(bad[:3])}")
        return model.eval(), dict(origin=str(path), hash=state_hash(model))
    adv = dict(kind="pgd", norm="l2", eps=args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size,
               clip=(0.0, 1.0)) if robust else None
    recipe = dict(epochs=args.source_epochs, lr=args.source_lr, milestones=tuple(args.source_milestones),
                  augment=args.dataset == "cifar10", batch_size=args.batch_size, weight_decay=args.weight_decay,
                  warmup_epochs=args.warmup_epochs) | (dict(adv=adv) if adv else {})
    model_kw = dict(norm="bn", width=args.source_width, num_classes=data.num_classes, in_channels=data.shape[0]) | kw
    # exp_table1.py's / exp_corruption.py's cache key: a ResNet50 trained there with this recipe is reused
    key = model_key(args.dataset, args.size, args.source_arch, model_kw, recipe, 0, args.amp, "pixels", data.mean, data.std,
                    args.channels)
    ckpt = cache_path(args.cache, key) or run_dir / "ckpt" / f"source_{role}.pt"
    if args.shard and not finished(ckpt):
        if args.artifact != "build":
            raise DataError(SHARD_NEEDS_BUILD.format(what=f"the {role} source model", where=ckpt))
        if args.shard[0] != SOURCE_SHARD[role] % args.shard[1]:
            return None  # another shard trains it (training one model twice at once would race)
    res = train_model(model, data, recipe, seed=0, amp=args.amp, tag=f"[source {role}]", key=key, ckpt=ckpt,
                      ddp_bn=args.ddp_bn)
    if res["status"] != "ok":
        raise DataError(f"the {role} source model failed to train ({res['reason']}); change its recipe "
                        f"(--source-lr, --source-epochs) or pass --source-{'rob' if robust else 'std'}")
    final = res["history"][-1]
    return model.eval(), dict(origin="trained here", hash=state_hash(model), train_acc=final["train_acc"])


def chunk_generator(args, kind, c):
    """The random numbers of chunk c come from their own seed, so a resumed build draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(args.build_seed * 1_000_003 + KINDS.index(kind) * 10_007 + c)


def to_u8(x):
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def make_chunk(args, kind, c, idx, data, sources, d_r):
    """One chunk of dataset `kind` for the training images idx (CPU tensors returned; work on the device).
    D_R/D_NR: invert the source's features of x from a random image of another class, label y.
    D_rand/D_det: targeted l2 PGD on the standard source from x, towards t uniform over all classes
    (Ilyas et al.'s code: t may equal y) or t = y + 1; label t. D_conflict: the same from the D_R image
    with label t_R, towards t_R + 1 (P1 Sec. 4.2). Success and feature distance are measured on the
    saved uint8 images, which are what a model trains on."""
    g = chunk_generator(args, kind, c)
    dev = data.x_train.device
    k = data.num_classes
    if kind == "d_conflict":
        x, y = d_r["x"][idx].to(dev).float() / 255, d_r["y"][idx].to(dev)
    else:
        x, y = data.x_train[idx], data.y_train[idx]
    out = dict(x=[], y=[], start=None, success=[], dist=[])
    if kind in ("d_r", "d_nr"):
        src = sources["robust" if kind == "d_r" else "standard"]
        start = other_label_indices(y.cpu(), data.y_train.cpu(), g)
        out["start"] = start
        for i in range(0, len(idx), args.build_batch):
            xb, x0 = x[i:i + args.build_batch], data.x_train[start[i:i + args.build_batch].to(dev)]
            u8 = to_u8(invert_features(src, xb, x0, args.inv_steps, args.inv_step, fake_relu=args.inv_relu == "fake"))
            out["x"].append(u8.cpu())
            out["dist"].append(feature_distance(src, u8.float() / 255, xb).cpu())
        out["y"] = y.cpu()
        out["success"] = None
    else:
        src = sources["standard"]
        t = torch.randint(0, k, (len(idx),), generator=g).to(dev) if kind == "d_rand" else (y + 1) % k
        for i in range(0, len(idx), args.build_batch):
            xb, tb = x[i:i + args.build_batch], t[i:i + args.build_batch]
            xa = pgd(src, xb, tb, args.attack_eps, args.attack_steps, args.attack_step, norm="l2", targeted=True)
            u8 = to_u8(xa)
            with torch.no_grad(), eval_mode(src):
                out["success"].append((src(u8.float() / 255).argmax(1) == tb).cpu())
            out["x"].append(u8.cpu())
        out["y"] = t.cpu()
        out["success"] = torch.cat(out["success"])
        out["dist"] = None
    out["x"] = torch.cat(out["x"])
    out["dist"] = torch.cat(out["dist"]) if out["dist"] else None
    out["index"] = torch.as_tensor(idx)
    return out


def floor_ratio(args, kind, src, x, y, k):
    """Throughput of the construction relative to its floor, measured side by side on one batch: the floor
    is `steps` x (one forward and one input-gradient backward of the source), the construction the same
    number of steps of invert_features or targeted PGD. Best of three interleaved timings each."""
    steps = min(20, args.inv_steps if kind in ("d_r", "d_nr") else args.attack_steps) or 1

    def floor():
        with eval_mode(src), torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            for _ in range(steps):
                out = (src.features(xr).pow(2).sum() if kind in ("d_r", "d_nr") else
                       F.cross_entropy(src(xr), y, reduction="sum"))
                torch.autograd.grad(out, xr)

    def method():
        if kind in ("d_r", "d_nr"):
            invert_features(src, x, x.flip(0), steps, args.inv_step, fake_relu=args.inv_relu == "fake")
        else:
            pgd(src, x, (y + 1) % k, args.attack_eps, steps, args.attack_step, norm="l2", targeted=True)

    def timed(fn):
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    method()  # warm-up
    pairs = [(timed(floor), timed(method)) for _ in range(3)]  # interleaved: slow drifts of the machine hit both
    return min(f for f, _ in pairs) / min(m for _, m in pairs)


def build_kind(args, kind, data, sources, source_info, root, d_r=None, d_r_hash=None):
    """Build (or load, or resume) dataset `kind` under `root`; returns dict(x uint8, y, meta)."""
    n = min(args.n_build or len(data.y_train), len(data.y_train))
    src_role = "robust" if kind == "d_r" else "standard"
    params = (dict(steps=args.inv_steps, step=args.inv_step) | ({} if args.inv_relu == "real" else dict(relu="fake"))
              if kind in ("d_r", "d_nr") else
              dict(eps=args.attack_eps, step=args.attack_step, steps=args.attack_steps))
    key = dict(kind=kind, dataset=args.dataset, size=args.size, channels=args.channels, n=n, seed=args.build_seed,
               source=source_info[src_role]["hash"], params=params, from_d_r=d_r_hash, chunk=args.chunk)
    folder = pathlib.Path(root) / f"{kind}-{key_hash(key)}"
    final = folder / "data.pt"
    if args.shard and not final.exists() and args.artifact != "build":
        raise DataError(SHARD_NEEDS_BUILD.format(what=NAMES[kind], where=final))
    if ddp_rank() != 0:  # under torchrun the build (inference, not data-parallel) is rank 0's; the others read its result
        while not final.exists():  # (polled, not a barrier: a build outlasts a collective's timeout)
            time.sleep(1.0)
    if final.exists():
        saved = load_tensors(final, "dataset")
        print(f"[{NAMES[kind]}] loaded {final} ({len(saved['y'])} images)")
        return saved
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(key, indent=1, default=str))
    chunks = range(math.ceil(n / args.chunk))
    x0 = (d_r["x"][:args.build_batch].to(data.x_train.device).float() / 255 if kind == "d_conflict"
          else data.x_train[:args.build_batch])
    y0 = d_r["y"][:args.build_batch].to(x0.device) if kind == "d_conflict" else data.y_train[:args.build_batch]
    k, n_shards = args.shard or (0, 1)
    offset = 2 + KINDS.index(kind) * len(chunks)  # unit index of chunk 0: after the two sources and earlier kinds
    mine = [c for c in chunks if (offset + c) % n_shards == k and not (folder / f"chunk_{c:05d}.pt").exists()]
    ratio = floor_ratio(args, kind, sources[src_role], x0, y0, data.num_classes) if mine or not args.shard else None
    if ratio is not None:
        print(f"[{NAMES[kind]}] building {n} images in {len(chunks)} chunks of {args.chunk} into {folder} | throughput "
              f"{ratio:.2f} of the floor (forward + input-gradient backward), measured side by side")
    t0, done_now = time.time(), 0
    for c in mine:  # (a sharded build: chunk c is unit offset + c)
        path = folder / f"chunk_{c:05d}.pt"
        idx = list(range(c * args.chunk, min(n, (c + 1) * args.chunk)))
        save_atomic(make_chunk(args, kind, c, idx, data, sources, d_r), path)
        done_now += len(idx)
        left = sum(len(range(cc * args.chunk, min(n, (cc + 1) * args.chunk))) for cc in mine if cc > c)
        rate = done_now / (time.time() - t0)
        print(f"[{NAMES[kind]}] chunk {c + 1}/{len(chunks)} | {rate:.1f} images/s | ETA {left / rate:.0f}s")
    if not all((folder / f"chunk_{c:05d}.pt").exists() for c in chunks):
        return None  # other shards' chunks are not there yet
    parts = [load_tensors(folder / f"chunk_{c:05d}.pt", "dataset chunk") for c in chunks]
    cat = lambda k: None if parts[0][k] is None else torch.cat([p[k] for p in parts])
    success, dist = cat("success"), cat("dist")
    meta = dict(kind=kind, name=NAMES[kind], n=n, source=source_info[src_role] | dict(role=src_role), params=params,
                build_seed=args.build_seed, dataset=args.dataset, from_d_r=d_r_hash, key_hash=key_hash(key),
                floor_ratio=ratio, success_rate=None if success is None else float(success.float().mean()),
                feature_dist_mean=None if dist is None else float(dist.mean()),
                feature_dist_median=None if dist is None else float(dist.median()),
                target_equals_y=float((cat("y") == data.y_train[:n].cpu()).float().mean()) if kind == "d_rand" else None)
    saved = dict(x=cat("x"), y=cat("y"), index=cat("index"), start=cat("start"), success=success, dist=dist, meta=meta)
    save_atomic(saved, final)
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=1, default=str))
    for c in chunks if not args.shard else []:  # (shards may still be reading them)
        (folder / f"chunk_{c:05d}.pt").unlink()
    print(f"[{NAMES[kind]}] done: {final}" + (f" | targeted success {meta['success_rate']:.1%}" if success is not None else
                                              f" | feature distance median {meta['feature_dist_median']:.3g}"))
    return saved


def planned_runs(args):
    """(name, record fields) of every training run in a fixed order (the unit of --shard). A sharded build
    (--artifact build) shares out the two sources and the chunks instead (see build_kind; DECISIONS.md D31)."""
    if args.artifact == "build":
        return []
    kinds = ARTIFACTS[args.artifact]["runs"]["datasets"]
    return [(f"{k}_{n}_s{s}", dict(kind=k, norm=n, seed=s)) for k in kinds for n in args.norm
            for s in range(args.rand_seeds if k == "d_rand" else args.seeds)]


def run_one(args, kind, ds, ds_hash, data, subset, norm, seed, device, ckpt):
    """ResNet18 with `norm` trained on dataset `kind` (P1 Table 6), measured every epoch on the real test set."""
    set_seed(seed)
    kw = dict(gn_groups=args.gn_groups) if args.gn_groups else {}
    model = make_model(args.arch, norm=norm, width=args.width, num_classes=data.num_classes, in_channels=data.shape[0],
                       mean=data.mean, std=data.std, **kw).to(device)
    train = Data(kind, ds["x"].to(device).float() / 255, ds["y"].to(device), data.x_test, data.y_test, data.mean, data.std)
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr or args.lrs[kind],
                  milestones=args.milestones, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                  augment=TABLE6[kind]["augment"] and args.dataset == "cifar10")  # crop+flip is for CIFAR, not digits
    if recipe["augment"] and args.augment == "robustness":
        recipe["jitter"] = True  # (a key only when set: the cache keys of crop+flip-only models are unchanged)
    x_sub, y_sub = data.x_test[subset], data.y_test[subset]

    def on_epoch(e, m):
        out = epoch_metrics(m, data.x_test, data.y_test, x_sub, y_sub, args.eps, args.eval_steps, args.sigma, seed)
        if kind in ALIGNED:
            # RF-aligned: P(pred = y + 1), the label the robust features of class y were given; NRF: P(pred = y)
            out |= dict(rf_acc=accuracy(m, data.x_test, (data.y_test + 1) % data.num_classes), nrf_acc=out["clean_acc"])
        return out

    key = dict(trained_on=ds_hash, arch=args.arch, norm=norm, width=args.width, model=kw, recipe=recipe, seed=seed,
               amp=args.amp, measure=dict(eps=args.eps, steps=args.eval_steps, per_class=args.per_class, sigma=args.sigma,
                                          aligned=kind in ALIGNED))
    res = train_model(model, train, recipe, seed=seed, ckpt=cache_path(args.cache, key) or ckpt, amp=args.amp,
                      on_epoch=on_epoch, tag=f"[{NAMES[kind]} {norm} s{seed}]", key=key, ddp_bn=args.ddp_bn)
    # Not learning a dataset (D_rand without BN, P1 Fig 6) is a result here, not a failed run: only divergence is.
    status = "failed" if res["status"] == "failed" and res["reason"].startswith("diverged") else "ok"
    base = dict(artifact=args.artifact, dataset=args.dataset, kind=kind, name=NAMES[kind], norm=norm, seed=seed,
                status=status, reason=res["reason"])
    rows = [base | h for h in res["history"]]
    if args.min_eps_iters and status == "ok":  # budget-free robustness of the final model (DECISIONS.md D34)
        attack = lambda xb, yb, e: pgd(model, xb, yb, e, args.eval_steps, norm="l2")
        rows[-1]["min_eps_l2"], rows[-1]["min_eps_l2_censored"] = median_minimal_eps(
            model, x_sub, y_sub, attack, args.min_eps_range * args.eps, iters=args.min_eps_iters)
    return rows


# ================================================================================================
# 3. Main
# ================================================================================================

def main(args):
    if args.plot_only:
        run_dir, cfg, records, _ = merge_runs(args.plot_only, "exp_feature_datasets.py", planned_runs)
        write_outputs(run_dir, records, cfg)
        print(f"redrew {run_dir / 'table.md'}, claims.md and figure.png")
        return
    device = pick_device(args.device)
    data = build_dataset(args.dataset, args.data_root, device, args.download, size=args.size, channels=args.channels,
                         n_train=1000 if args.dataset == "synthetic" else None)
    for norm in args.norm:  # a wrong architecture or norm fails here, before anything is written
        with torch.device("meta"):
            make_model(args.arch, norm=norm, width=args.width, in_channels=data.shape[0],
                       **(dict(gn_groups=args.gn_groups) if args.gn_groups else {}))
    run_dir = prepare_run_dir("exp_feature_datasets", args.out, args.resume, args.shard)
    log_to(run_dir, args.shard)
    print_config(args)
    write_config(run_dir, args, __file__, device)
    kinds = ARTIFACTS[args.artifact]["runs"]["datasets"]
    print(f"run directory: {run_dir} | device: {device} | {ARTIFACTS[args.artifact]['title']} | {args.dataset}: train "
          f"{tuple(data.x_train.shape)}, test {tuple(data.x_test.shape)}")
    datasets = {}
    if args.datasets_from == "released":
        for kind in kinds:
            x, y = read_ilyas_dataset(args.data_root, kind)
            datasets[kind] = dict(x=to_u8(x), y=y, meta=dict(kind=kind, name=NAMES[kind], n=len(y), origin="released",
                                                          key_hash=hashlib.sha256(x.numpy().tobytes()).hexdigest()[:12]))
    else:
        root = pathlib.Path(args.datasets_dir or (pathlib.Path(args.cache) / "feature_datasets" if args.cache
                                                  else run_dir / "datasets"))
        needs = set(kinds) | ({"d_r"} if "d_conflict" in kinds else set())
        sources, info, waiting = {}, {}, []
        for role in ("standard", "robust"):
            if role == "robust" and "d_r" not in needs or role == "standard" and not needs - {"d_r"}:
                continue
            got = get_source(args, data, role == "robust", device, run_dir)
            if got is None:
                waiting.append(f"the {role} source model (trained by shard {SOURCE_SHARD[role] % args.shard[1]})")
                continue
            sources[role], info[role] = got
        for kind in [k for k in KINDS if k in needs]:
            d_r = datasets.get("d_r")
            role = "robust" if kind == "d_r" else "standard"
            if role not in sources or kind == "d_conflict" and d_r is None:
                waiting.append(f"{NAMES[kind]} (needs {'D_R' if role in sources else f'the {role} source'})")
                continue
            built = build_kind(args, kind, data, sources, info, root, d_r,
                               d_r["meta"]["key_hash"] if kind == "d_conflict" else None)
            if built is None:
                waiting.append(f"{NAMES[kind]} (chunks of other shards)")
                continue
            datasets[kind] = built
            datasets[kind]["meta"]["path"] = str(root / f"{kind}-{datasets[kind]['meta']['key_hash']}" / "data.pt")
        if waiting:  # only a sharded build gets here
            print(f"this shard has done its part; still to come from other shards: {'; '.join(waiting)}. Run the "
                  f"same command with --resume once they have finished (each pass gets further: sources, then chunks, "
                  f"then D_conflict's chunks).")
    sweep = Sweep(run_dir, planned_runs(args), args.shard)
    sweep.save("datasets", [dict(datasets[k]["meta"], record="dataset") for k in KINDS if k in datasets])  # re-read above
    subset = class_balanced_subset(data.y_test, args.per_class)
    todo, t0 = sweep.todo(), time.time()
    for i, (_, name, r) in enumerate(todo):
        kind = r["kind"]
        ckpt = run_dir / "ckpt" / f"{name}.pt"
        sweep.save(name, run_one(args, kind, datasets[kind], datasets[kind]["meta"]["key_hash"], data, subset, r["norm"],
                                  r["seed"], device, ckpt))  # every finished model is kept
        print(f"model {i + 1} of {len(todo)} done here ({len(sweep.runs)} in the run) | {time.time() - t0:.0f}s | ETA "
              f"{(time.time() - t0) / (i + 1) * (len(todo) - i - 1):.0f}s")
    write_outputs(run_dir, sweep.records(), vars(args), datasets)
    show(run_dir / "table.md")
    if args.artifact != "build":
        show(run_dir / "claims.md")
    print(f"wrote {run_dir}/results.json, table.md, claims.md, figure.png" + sweep.report())


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

NAMES = dict(d_r="D_R", d_nr="D_NR", d_rand="D_rand", d_det="D_det", d_conflict="D_conflict")


def aligned_claims(fig, kind):
    """P1 Fig 7 (D_conflict) and Fig 13 (D_det, 'resembles D_conflict'). rf = P(pred = y+1) on clean test
    images: the robust features of class y were labelled y+1; nrf = P(pred = y): the non-robust ones."""
    BN, NONE = dict(kind=kind, norm="bn"), dict(kind=kind, norm="none")
    return [
        claim(f"{fig}_bn_rf_falls", f"P1 {fig.replace('fig', 'Fig ')}", "With BN, RF-aligned accuracy peaks early and "
              "then falls", "rises to about 80 %, then falls sharply (figure only)", "rf_drop", BN, None, ">", scale=100.0),
        claim(f"{fig}_bn_nrf_overtakes", f"P1 {fig.replace('fig', 'Fig ')}", "With BN, NRF-aligned accuracy ends above "
              "RF-aligned accuracy", "eventually overtakes (figure only)", "nrf_minus_rf", BN, None, ">", scale=100.0),
        claim(f"{fig}_none_rf", f"P1 {fig.replace('fig', 'Fig ')}", "Without BN, RF-aligned accuracy stays above "
              "NRF-aligned accuracy", "RF high, NRF low throughout (figure only)", "nrf_minus_rf", NONE, None, "<",
              scale=100.0),
        claim(f"{fig}_bn_vs_none", f"P1 {fig.replace('fig', 'Fig ')}", "BN leans more on non-robust features than no "
              "norm (NRF minus RF accuracy)", "BN: NRF wins; none: RF wins (figure only)", "nrf_minus_rf",
              BN, NONE, ">", scale=100.0),
    ]


FIG6_CLAIMS = [
    claim("fig6_robust", "P1 Fig 6", "Training on D_R gives higher robust accuracy than on D_rand", "D_R fairly high, "
          "D_rand about 0 (Ilyas et al.: 48 % vs 0 %)", "robust_acc", dict(kind="d_r"), dict(kind="d_rand"), ">",
          per=("norm",), scale=100.0, paper_effect=48.0),
    claim("fig6_robust_mineps", "P1 Fig 6", "Training on D_R gives a larger median minimal PGD-ℓ2 budget than on D_rand "
          "(final model)", "— (budget-free)", "min_eps_l2", dict(kind="d_r"), dict(kind="d_rand"), ">", per=("norm",)),
    claim("fig6_dr_ligs", "P1 Fig 6", "LIGS of a model trained on D_R is above 0.9", "above 0.9 (figure only)", "ligs",
          dict(kind="d_r"), None, ">", per=("norm",), ref=0.9),
    claim("fig6_drand_ligs", "P1 Fig 6", "LIGS on D_rand ends below LIGS on D_R", "very low (figure only)", "ligs",
          dict(kind="d_rand"), dict(kind="d_r"), "<", per=("norm",)),
    claim("fig6_none_chance", "P1 Fig 6", "Without BN the model does not learn D_rand: test accuracy below 15 %",
          "stays at 10 % (figure only)", "clean_acc", dict(kind="d_rand", norm="none"), None, "<", ref=0.15, scale=100.0),
    claim("fig6_bn_learns", "P1 Fig 6", "With BN the model learns D_rand: higher test accuracy than without",
          "above 10 % after about 25 epochs (figure only)", "clean_acc", dict(kind="d_rand", norm="bn"),
          dict(kind="d_rand", norm="none"), ">", scale=100.0),
    claim("fig6_ligs_rise", "P1 Fig 6", "With BN on D_rand, LIGS rises above its initial value", "rises before "
          "convergence starts (figure only)", "ligs_rise", dict(kind="d_rand", norm="bn"), None, ">"),
    claim("fig6_ligs_drop", "P1 Fig 6", "With BN on D_rand, LIGS falls from its peak by the end", "drops sharply once "
          "it converges (figure only)", "ligs_drop", dict(kind="d_rand", norm="bn"), None, ">"),
]

FIG12_CLAIMS = [
    claim("fig12_r_above_nr", "P1 Fig 12", "LIGS on D_R is above LIGS on D_NR", "D_R highest (figure only)", "ligs",
          dict(kind="d_r"), dict(kind="d_nr"), ">", per=("norm",)),
    claim("fig12_nr_above_rand", "P1 Fig 12", "LIGS on D_NR is above LIGS on D_rand", "D_NR in between (figure only)",
          "ligs", dict(kind="d_nr"), dict(kind="d_rand"), ">", per=("norm",)),
]


CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "build": [],
    "fig6": FIG6_CLAIMS,
    "fig12": FIG12_CLAIMS,
    "fig7": aligned_claims("fig7", "d_conflict"),
    "fig13": aligned_claims("fig13", "d_det"),
}


def runs_of(records):
    out = {}
    for r in records:
        if "epoch" in r:
            out.setdefault((r["kind"], r["norm"], r["seed"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["epoch"]) for k, v in out.items()}


def claim_rows(records):
    """One row per trained model: its final epoch plus curve summaries (P1 Figs 6, 7: rises, peaks and drops)."""
    rows = []
    for (kind, norm, seed), hist in runs_of(records).items():
        hist = [h for h in hist if h.get("clean_acc") is not None]
        if not hist:
            continue
        last, ligs = hist[-1], [h["ligs"] for h in hist if h.get("ligs") is not None]
        row = dict(last)
        if ligs:
            row |= dict(ligs_peak=max(ligs), ligs_rise=max(ligs) - ligs[0], ligs_drop=max(ligs) - ligs[-1])
        if kind in ALIGNED:
            rf = [h["rf_acc"] for h in hist]
            row |= dict(rf_peak=max(rf), rf_drop=max(rf) - rf[-1], nrf_minus_rf=last["nrf_acc"] - last["rf_acc"])
        chance = 1.0 / 10 + 0.05
        row["learned_epoch"] = next((h["epoch"] for h in hist if h["epoch"] > 0 and h["clean_acc"] > chance), None)
        rows.append(row)
    return rows


def build_table(metas):
    lines = ["## Datasets", "", "| dataset | images | source | construction | targeted success | feature distance "
             "(median) | throughput / floor |", "|---|---|---|---|---|---|---|"]
    for m in metas:
        p = m.get("params") or {}
        how = ("released (Ilyas et al. 2019)" if m.get("origin") == "released" else
               f"inversion, {p.get('steps')} steps of {p.get('step')}" if m["kind"] in ("d_r", "d_nr") else
               f"targeted l2 PGD eps {p.get('eps')}, {p.get('steps')} steps of {p.get('step')}")
        src = m.get("source") or {}
        fmt = lambda v, f: "-" if v is None else f(v)
        lines.append(f"| {m['name']} | {m['n']} | {src.get('role', '-')} ({src.get('origin', '-')}, "
                     f"{src.get('hash', '-')[:8]}) | {how} | {fmt(m.get('success_rate'), lambda v: f'{100 * v:.1f} %')} | "
                     f"{fmt(m.get('feature_dist_median'), lambda v: f'{v:.3g}')} | "
                     f"{fmt(m.get('floor_ratio'), lambda v: f'{v:.2f}')} |")
    return lines


def make_table(records, metas, cfg, header):
    lines = [header, ""] + build_table(metas)
    rows = claim_rows(records)
    if rows:
        lr = cfg.get("lr")
        lines += ["", "## Models trained on them", "", f"{cfg['arch']} (width {cfg['width']:g}), {cfg['epochs']} epochs, "
                  f"LR /10 at {cfg['milestones']}, batch {cfg['batch_size']}, WD {cfg['weight_decay']:g}, LR "
                  + (f"{lr:g}" if lr else "per dataset: " + ", ".join(f"{NAMES[k]} {v:g}" for k, v in cfg["lrs"].items()))
                  + f". Final epoch, mean ± SEM over seeds, on the real test set with true labels; robust accuracy: l2 "
                  f"PGD eps {cfg['eps']:g}, {cfg['eval_steps']} steps, {10 * cfg['per_class']} images. RF / NRF = "
                  "P(pred = y+1) / P(pred = y). 'learned at' = first epoch above 15 % test accuracy.", "",
                  "| dataset | norm | n | clean acc | robust acc | LIGS | LIGS peak | RF acc | NRF acc | RF peak | "
                  "learned at (epochs) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for r in rows:
            groups.setdefault((r["kind"], r["norm"]), []).append(r)
        for (kind, norm), rs in sorted(groups.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
            f = lambda k, s=100.0, d=1: fmt_mean_sem([r.get(k) for r in rs], scale=s, digits=d)
            learned = [r["learned_epoch"] for r in rs]
            lines.append(f"| {NAMES[kind]} | {norm} | {len(rs)} | {f('clean_acc')} | {f('robust_acc')} | "
                         f"{f('ligs', 1.0, 3)} | {f('ligs_peak', 1.0, 3)} | {f('rf_acc')} | {f('nrf_acc')} | {f('rf_peak')} | "
                         f"{', '.join('never' if e is None else str(e) for e in learned)} |")
    failed = {(r["kind"], r["norm"], r["seed"]): r["reason"] for r in records if r.get("status") == "failed"}
    lines += [""] + [f"- failed: {NAMES[k]} {n} seed {s}: {why}" for (k, n, s), why in failed.items()]
    return "\n".join(lines) + "\n"


def make_figures(records, datasets, run_dir, artifact, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = dict(none="0.25", bn="C0", ln="C2", gn="C3", **{"in": "C1"})
    R = runs_of(records)

    def curve(kind, norm, key):
        hist = [h for (k, n, _), hs in R.items() if k == kind and n == norm for h in hs if h.get(key) is not None]
        epochs = sorted({h["epoch"] for h in hist})
        stats = [mean_sem([h[key] for h in hist if h["epoch"] == e]) for e in epochs]
        return epochs, [s[0] for s in stats], [s[1] if s[2] > 1 else 0.0 for s in stats]

    def panel(ax, kind, norm, key, scale, label, color, style="-"):
        e, m, s = curve(kind, norm, key)
        if e:
            ax.errorbar(e, [scale * v for v in m], yerr=[scale * v for v in s], fmt=style, marker="o", ms=3, capsize=2,
                        label=label, color=color)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)

    norms = list(dict.fromkeys(r["norm"] for r in records if "epoch" in r))
    kinds = [k for k in ARTIFACTS[artifact]["runs"]["datasets"] if any(key[0] == k for key in R)]
    if artifact in ("fig6", "fig12") and kinds:
        metrics = [("clean_acc", "clean accuracy (%)", 100.0), ("robust_acc", "robust accuracy (%)", 100.0),
                   ("ligs", "LIGS", 1.0)]
        if artifact == "fig12":  # LIGS of the three datasets, one panel per norm
            fig, axes = plt.subplots(1, len(norms), figsize=(5 * len(norms), 4), squeeze=False)
            for ax, norm in zip(axes[0], norms):
                for i, kind in enumerate(kinds):
                    panel(ax, kind, norm, "ligs", 1.0, NAMES[kind], f"C{i}")
                ax.set_title(f"ResNet18, norm {norm}")
                ax.set_ylabel("LIGS")
                ax.legend(fontsize=8)
        else:
            fig, axes = plt.subplots(3, len(kinds), figsize=(5 * len(kinds), 9), squeeze=False)
            for j, kind in enumerate(kinds):
                for i, (key, ylabel, scale) in enumerate(metrics):
                    for norm in norms:
                        panel(axes[i][j], kind, norm, key, scale, norm, colors.get(norm))
                    axes[i][j].set_ylabel(ylabel)
                axes[0][j].set_title(f"trained on {NAMES[kind]}")
                axes[0][j].legend(fontsize=8)
    elif artifact in ("fig7", "fig13") and kinds:
        kind = kinds[0]
        fig, axes = plt.subplots(2, len(norms), figsize=(5 * len(norms), 7), squeeze=False)
        for j, norm in enumerate(norms):
            panel(axes[0][j], kind, norm, "rf_acc", 100.0, "RF-aligned: P(pred = y+1)", "C3")
            panel(axes[0][j], kind, norm, "nrf_acc", 100.0, "NRF-aligned: P(pred = y)", "C0", "--")
            panel(axes[1][j], kind, norm, "ligs", 1.0, "LIGS", colors.get(norm))
            axes[0][j].set_title(f"trained on {NAMES[kind]}, norm {norm}")
            axes[0][j].set_ylabel("accuracy (%)")
            axes[1][j].set_ylabel("LIGS")
            axes[0][j].legend(fontsize=8)
    else:  # build: a few images of every dataset with their labels
        shown = [(k, d) for k, d in datasets.items() if d is not None]
        if not shown:
            return
        n = 8
        fig, axes = plt.subplots(len(shown), n, figsize=(1.3 * n, 1.5 * len(shown)), squeeze=False)
        for i, (kind, d) in enumerate(shown):
            for j in range(n):
                img = d["x"][j].float().div(255).permute(1, 2, 0).squeeze(-1).numpy()
                axes[i][j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
                axes[i][j].set_xticks([])
                axes[i][j].set_yticks([])
                axes[i][j].set_title(f"label {int(d['y'][j])}", fontsize=7)
            axes[i][0].set_ylabel(NAMES[kind], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, run_dir / "figure.png")


def write_outputs(run_dir, records, cfg, datasets=None):
    artifact, preset = cfg["artifact"], cfg["preset"]
    metas = [r for r in records if r.get("record") == "dataset"]
    epochs = [r for r in records if r.get("record") != "dataset"]
    header = f"# {ARTIFACTS[artifact]['title']} (preset {preset}, {cfg['dataset']}, datasets {cfg['datasets_from']})"
    write_text_atomic(run_dir / "table.md", make_table(epochs, metas, cfg, header))
    if datasets is None and artifact == "build":  # --plot-only: the examples come from the saved datasets
        datasets = {}
        for m in metas:
            path = m.get("path")
            datasets[m["kind"]] = load_tensors(path, "dataset") if path and pathlib.Path(path).exists() else None
    make_figures(epochs, datasets or {}, run_dir, artifact, header[2:])
    write_claims(run_dir, CLAIMS[artifact], claim_rows(epochs), "# Claims: " + header[2:], None)


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "fig6", PRESETS)
    g.add_argument("--dataset", choices=["cifar10", "digits", "synthetic"], help="the dataset D the features come from")
    g.add_argument("--datasets-from", default="built", choices=["built", "released"], help="train on datasets built "
                   "here, or on Ilyas et al.'s released D_R/D_NR/D_rand/D_det (DATA_ROOT/release_datasets/, CIFAR-10)")
    g.add_argument("--arch", help="architecture trained on the datasets (P1: resnet18)")
    g.add_argument("--norm", nargs="+", choices=["none", "bn", "in", "ln", "gn"], help="norms of the trained models")
    g.add_argument("--seeds", type=int, help="seeds per trained model")
    g.add_argument("--rand-seeds", type=int, help="seeds per model on D_rand (P1: its warm-up repeats across seeds)")
    g = p.add_argument_group("training")
    g.add_argument("--source-std", help="standard source checkpoint to use instead of training one: a "
                   "state_dict of common.make_model(SOURCE_ARCH, norm='bn', width=SOURCE_WIDTH), or this project's "
                   "checkpoint (a dict with 'model')")
    g.add_argument("--source-rob", help="robust source checkpoint, same format")
    g.add_argument("--source-arch", help="source architecture (P1 App. E: resnet50)")
    g.add_argument("--source-width", type=float, help="source channel multiplier")
    g.add_argument("--source-epochs", type=int, help="source training epochs")
    g.add_argument("--source-lr", type=float, help="source initial LR")
    g.add_argument("--source-milestones", type=int, nargs="*", help="source LR /10 epochs")
    g.add_argument("--adv-eps", type=float, help="robust source: l2 adversarial training budget (0.5)")
    g.add_argument("--adv-steps", type=int, help="robust source: PGD steps (7)")
    g.add_argument("--adv-step-size", type=float, help="robust source: PGD step size (0.1)")
    g.add_argument("--width", type=float, help="its channel multiplier")
    g.add_argument("--epochs", type=int, help="training epochs (P1 Table 6: 150)")
    g.add_argument("--milestones", type=int, nargs="*", help="epochs where the LR is divided by 10 (50, 100)")
    g.add_argument("--lr", type=float, help="initial LR for every dataset (unset: the preset's per dataset; paper: "
                   "P1 Table 6, 0.01, or 0.1 for D_det and D_conflict)")
    g.add_argument("--batch-size", type=int, help="SGD batch size (128)")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (5e-4)")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up epochs")
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (unset: min(32, channels))")
    g.add_argument("--augment", choices=["robustness", "crop-flip"], default="robustness",
                   help="training augmentation on D_R, D_NR, D_rand (CIFAR-10): the robustness library's default with "
                        "which the authors train (crop+flip, ColorJitter(.25, .25, .25), RandomRotation(2)) or crop+flip")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--inv-steps", type=int, help="D_R/D_NR: representation-inversion steps (P1 App. B.3: 1000)")
    g.add_argument("--inv-step", type=float, help="D_R/D_NR: l2 length of each step (0.1)")
    g.add_argument("--inv-relu", choices=["fake", "real"], default="fake",
                   help="D_R/D_NR: invert through the last ReLU as through the identity (fake: Ilyas et al.'s and the "
                        "P1 authors' code) or through the real ReLU (earlier versions of this project)")
    g.add_argument("--attack-eps", type=float, help="D_rand/D_det/D_conflict: targeted l2 PGD budget (0.5)")
    g.add_argument("--attack-step", type=float, help="its step size (0.1)")
    g.add_argument("--attack-steps", type=int, help="its steps (100)")
    g.add_argument("--per-class", type=int, help="robust accuracy and LIGS subset per class (P1: 100)")
    g.add_argument("--eps", type=float, help="l2 budget of the per-epoch robust accuracy (P1: 0.25)")
    g.add_argument("--eval-steps", type=int, help="its PGD steps, of 2.5*eps/steps each (P1: 10)")
    g.add_argument("--sigma", type=float, default=0.01, help="LIGS perturbation scale (P1 App. B.4)")
    g.add_argument("--min-eps-iters", type=int, default=6, help="bisection halvings of each subset sample's minimal "
                   "PGD-ℓ2 budget, final model (0: not measured; DECISIONS.md D34)")
    g.add_argument("--min-eps-range", type=float, default=4.0, help="the bisection searches [0, RANGE x --eps]")
    g = add_run_flags(p, "exp_feature_datasets", unit="runs", data="cifar-10-batches-py/ and release_datasets/",
                         download="fetch CIFAR-10 if missing (md5-checked)",
                         cache="shared cache: trained sources and targets, and built datasets, reused when everything "
                               "that determines them matches")
    g.add_argument("--size", type=int, help="resize images to size x size (unset: the dataset's own)")
    g.add_argument("--channels", type=int, help="repeat grey images to this many channels (unset: the dataset's own)")
    g.add_argument("--datasets-dir", help="where built datasets live (default: CACHE/feature_datasets "
                   "with --cache, else RUN_DIR/datasets)")
    g.add_argument("--n-build", type=int, help="training images turned into each dataset (unset: all)")
    g.add_argument("--chunk", type=int, help="images per saved chunk (the unit a killed build resumes from)")
    g.add_argument("--build-batch", type=int, help="images optimised at once on the device")
    g.add_argument("--build-seed", type=int, default=0, help="seed of the start images and random targets")
    args = parse_with_presets(p, resolve, argv)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("source_epochs", "adv_steps", "n_build", "chunk", "build_batch", "attack_steps",
                                         "epochs", "batch_size", "seeds", "rand_seeds", "per_class", "eval_steps", "size",
                                         "channels", "gn_groups", "milestones", "source_milestones"),
                  positive=("source_width", "source_lr", "adv_eps", "adv_step_size", "inv_step", "attack_eps",
                            "attack_step", "width", "lr", "eps", "sigma", "min_eps_range"),
                  non_negative=("inv_steps", "weight_decay", "warmup_epochs", "build_seed", "min_eps_iters"))
    if args.datasets_from == "released":
        if args.dataset != "cifar10":
            p.error(f"--datasets-from released: Ilyas et al.'s sets are CIFAR-10, not --dataset {args.dataset}")
        if "d_conflict" in ARTIFACTS[args.artifact]["runs"]["datasets"] or args.artifact == "build":
            p.error(f"--datasets-from released: {args.artifact} needs D_conflict (P1's own), which was never released; "
                    f"build it instead")
    for flag in ("source_std", "source_rob"):
        path = getattr(args, flag)
        if path is not None and not pathlib.Path(path).is_file():
            p.error(f"--{flag.replace('_', '-')} {path}: no such file")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
