"""Corruption robustness with and without normalization, and BN-statistics adaptation (CIFAR-10-C).

Reproduces P1 Fig 1 (VGG16 x five norms, standard and adversarial training: accuracy per corruption),
P1 Table 7 (BN models before and after re-estimating the BN statistics on each corrupted set, App. F)
and P2 Table 4 with its Sec. 3 prose (VGG8, VGG13, WRN-28-10 Fixup vs BN: noise corruptions per
severity, mCE, per-corruption gaps). Corrupted images are the released CIFAR-10-C files when they are
under --data-root (or fetched with --download), otherwise made by `corrupt` (section 2), a batched port of
Hendrycks & Dietterich's generator (motion blur and snow approximated; frost needs --frost-dir).

Quick results (update_readme.py writes this from results/quick/):
    python exp_corruption.py --preset quick --artifact fig1
        11 held / 25 reversed / 47 inconclusive / 0 underpowered
        P1 Fig 1: IN is unusually robust to contrast: above BN (standard training): +53.4 [+43.9, +62.9] (held)
    python exp_corruption.py --preset quick --artifact p2_t4
        0 held / 0 reversed / 20 inconclusive / 6 underpowered
        P2 Sec. 3: BN has higher error than none on every noise corruption at every severity: +7.3 [-26.6, +41.1]
          (inconclusive)
    python exp_corruption.py --preset quick --artifact t7
        2 held / 0 reversed / 0 inconclusive / 0 underpowered
        P1 Table 7: Re-estimating the BN statistics on each corrupted set raises accuracy: +5.9 [+3.2, +8.5] (held)

Run it:
    python exp_corruption.py --preset quick --artifact fig1   # bundled digits, CPU, ~5 min per artifact
    python exp_corruption.py --artifact t7 --device cuda      # P1 Table 7 (CIFAR-10 and CIFAR-10-C under data/)
    python exp_corruption.py --compare-released               # generator vs the released files, per severity
    python exp_corruption.py --plot-only runs/exp_corruption/<run>

Corruptions are applied in [0, 1] pixel space; P2's models standardize afterwards (P2 Sec. 3), P1's
inside the model. Models are trained with exp_table1.py's recipes, so --cache shares them (DECISIONS.md D28).
"""
import copy
import functools
import io
import math
import pathlib
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from common import (CORRUPTIONS, CORRUPTION_NAMES, DataError, NORMS, P2_INPUT, Sweep, adapt_bn, add_run_flags,
                    arch_seeds_arg, build_dataset, cache_path, check_choice, check_numbers, claim,
                    class_balanced_subset, evaluate, fmt_mean_sem, log_to, make_model, make_parser, mean_sem,
                    merge_runs, model_in_space, model_key, model_kwargs, paper_recipe, parse_with_presets, pick_device,
                    prepare_run_dir, print_config, read_cifar10, read_cifar10c, run_script, save_figure, set_seed, show,
                    train_model, with_overrides, write_claims, write_config, write_text_atomic)


# ================================================================================================
# 1. Paper settings
# ================================================================================================

NOISE3 = ["gaussian_noise", "shot_noise", "speckle_noise"]  # the noises P1 Sec. 1 names

CATEGORY = {n: cat for cat, names in CORRUPTIONS.items() for n in names}


ARTIFACTS = {  # space: input space (DECISIONS.md D2); models {dataset: [archs]}; norms; trainings; adapt BN?
    "fig1": dict(title="P1 Fig 1", runs=dict(space="pixels", models={"cifar10": ["vgg16"]}, norms=list(NORMS),
                                             trainings=["standard", "adversarial"], seeds=1, adapt=False)),
    "t7": dict(title="P1 Table 7", runs=dict(space="pixels", models={"cifar10": ["vgg16", "resnet18"]}, norms=["bn"],
                                             trainings=["standard"], seeds=1, adapt=True)),
    "p2_t4": dict(title="P2 Table 4", runs=dict(space="standardized", models={"cifar10": ["vgg8", "vgg13", "wrn28_10"]},
                                                norms=["none", "bn", "fixup"], trainings=["standard"], seeds=3,
                                                arch_seeds={"wrn28_10": 5}, select="best_test", adapt=False)),
    # P2 Sec. 3: VGG 3 seeds, WRN 5; Table 2's VGG8 and WRN models, selected by test accuracy as there
}

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


def resolve(preset, artifact):
    """The values that run for this preset and artifact (shown by --help, saved in config.json)."""
    art = ARTIFACTS.get(artifact, ARTIFACTS["fig1"])["runs"]
    v = dict(seeds=art["seeds"], arch_seeds=art.get("arch_seeds", {}), select=art.get("select", "final"),
             severities=[1, 2, 3, 4, 5], epochs=None, lr=None) | PRESETS[preset]
    if preset == "quick":
        v |= QUICK.get(artifact, QUICK["fig1"])
    return v


# ================================================================================================
# 2. Experiment
# ================================================================================================

def planned_runs(args):
    """(name, record fields) of every model and seed in a fixed order (the unit of --shard)."""
    return [(f"{a}_{n}_{t}_s{s}", dict(dataset=d, arch=a, norm=n, training=t, seed=s)) for d, a, n, t in plan(args)
            for s in range(args.arch_seeds.get(a, args.seeds))]


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
    """exp_table1.py's recipe for this model (common.RECIPES: the same dict, so the checkpoint-cache key matches;
    P1's ResNet recipe for every ResNet, P2 Table 3's depth protocol for VGG13), plus l2 PGD adversarial training
    (exp_ligs_trend.py's, DECISIONS.md D15) for fig1's right panel."""
    if ARTIFACTS[args.artifact]["runs"]["space"] == "pixels":
        r = paper_recipe("p1_resnet" if arch.startswith("resnet") else "p1_cifar_vgg")
    else:
        r = paper_recipe("p2_depth" if arch == "vgg13" else "p2_cifar", norm)
    r = with_overrides(r, args, dataset)
    if args.select == "best_test" and arch != "vgg13":  # Table 2's models (VGG8, WRN); VGG13 is Table 3's
        r["select"] = "best_test"
    if training == "adversarial":
        r["adv"] = dict(kind="pgd", norm="l2", eps=args.adv_eps, steps=args.adv_steps, step_size=args.adv_step_size,
                        clip=(0.0, 1.0))
    return r


def eval_subset(args, data):
    idx = torch.arange(len(data.y_test))
    if args.n_eval and args.n_eval < len(idx):
        idx = class_balanced_subset(data.y_test.cpu(), max(1, args.n_eval // data.num_classes))
    return idx


class CorruptedSets:
    """The corrupted test images, (name, severity) -> uint8 (N, C, H, W) on the CPU: slices of the released
    CIFAR-10-C files (memory-mapped) or generated once by `corrupt` on `device` and kept."""

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
        self.kind = "released CIFAR-10-C" if self.released is not None else "generated (exp_corruption.corrupt)"

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
    adapt_bn on that set (DECISIONS.md D28): --adapt-on batch (default, the authors' batch_norm_adaptation code)
    sets the BN statistics to those of one random batch of --adapt-batch images of the corrupted set; --adapt-on
    all to the whole set's (transductive). --adapt-split draws the adaptation images from one half and evaluates
    both columns on the other half."""
    out = {}
    dev = y.device
    half = torch.arange(len(y)) % 2 == 0  # adaptation half (--adapt-split)
    for name in sets.names:
        for s in args.severities:
            x = input_fn(sets.get(name, s).to(dev).float() / 255)
            xe, ye = (x[~half], y[~half.to(dev)]) if adapt and args.adapt_split else (x, y)
            out[f"acc_{name}_s{s}"] = evaluate(model, xe, ye, dict(c=dict(kind="clean")))["c"]
            if adapt:
                pool = x[half.to(dev)] if args.adapt_split else x
                if args.adapt_on == "batch":  # one shuffled batch, as the authors' code (no augmentation)
                    g = torch.Generator().manual_seed(args.corruption_seed * 1000 + CORRUPTION_NAMES.index(name) * 5 + s)
                    pool = pool[torch.randperm(len(pool), generator=g)[:args.adapt_batch].to(dev)]
                m = adapt_bn(copy.deepcopy(model), pool, batch_size=len(pool) if args.adapt_on == "batch" else
                             args.batch_size)
                out[f"ada_{name}_s{s}"] = evaluate(m, xe, ye, dict(c=dict(kind="clean")))["c"]
        log(f"  {name}: " + " ".join(f"{100 * out[f'acc_{name}_s{s}']:.1f}" for s in args.severities) +
            (" | adapted " + " ".join(f"{100 * out[f'ada_{name}_s{s}']:.1f}" for s in args.severities) if adapt else ""))
    return out


def run_one(args, data, sets, dataset, arch, norm, training, seed, device, ckpt, log):
    space = ARTIFACTS[args.artifact]["runs"]["space"]
    set_seed(seed)
    kw = model_kwargs(arch, norm, data, args.width, args.gn_groups)
    mean, std = (data.mean, data.std) if space == "pixels" else P2_INPUT.get(dataset, (data.mean, data.std))
    model, input_fn = model_in_space(arch, kw, space, mean, std, device)
    r = recipe(args, dataset, arch, norm, training)
    key = model_key(dataset, args.size, arch, kw, r, seed, args.amp, space, mean, std, args.channels)  # exp_table1.py's
    tag = f"[{dataset} {arch} {norm} {training} s{seed}]"
    t0 = time.time()
    res = train_model(model, data, r | dict(input_fn=input_fn), seed=seed, ckpt=cache_path(args.cache, key) or ckpt,
                      log=log, amp=args.amp, tag=tag, key=key, ddp_bn=args.ddp_bn)
    rec = dict(artifact=args.artifact, dataset=dataset, arch=arch, norm=norm, training=training, seed=seed,
               status=res["status"], reason=res["reason"], epochs=r["epochs"], lr=r["lr"])
    if res["status"] != "ok":
        return rec
    if res["best"] is not None:  # P2 Table 4 evaluates Table 2's models, "the best model in terms of test accuracy"
        model.load_state_dict(res["best"]["model"])
        rec |= dict(evaluated=f"selected epoch {res['best']['epoch']} (best clean test accuracy)")
    to_input = input_fn or (lambda t: t)
    y = data.y_test[sets.idx.to(device)]
    rec["acc_clean"] = evaluate(model, to_input(sets.x.to(device)), y, dict(c=dict(kind="clean")))["c"]
    adapt = ARTIFACTS[args.artifact]["runs"]["adapt"] and norm == "bn"
    rec |= evaluate_corruptions(args, model, to_input, sets, y, adapt, log)
    if adapt:
        rec |= dict(adapt_on=args.adapt_on, adapt_batch=args.adapt_batch if args.adapt_on == "batch" else None)
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


# --- The CIFAR-10-C generator: a batched port of Hendrycks & Dietterich's (2019) per-image generator ---------------
# (P1 Fig 1, P2 Table 4; DECISIONS.md D26-D27). Only this script uses it, so it lives here rather than in common.py.
# tests/test_corruptions.py checks it against tests/cifar_c_reference.py, written from the original's formulas.

# The severity constants (1..5) of Hendrycks & Dietterich's CIFAR generator. Pixels are in [0, 1]; every result
# is clipped, multiplied by 255 and truncated to uint8, as in the released files.
APPROXIMATE = ("motion_blur", "snow")  # ImageMagick's motion blur, re-implemented (DECISIONS.md D27)
SEVERITY = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias blur
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, max shift, passes
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zoom factors 1, 1.01, ... below this bound
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, plasma-fractal wibble decay
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),  # last: 0 water, 1 mud
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # the generator draws 1 of 5


def _pad_index(n, r, mode, device):
    """Source index of every position of a length-n axis padded by r on both sides, for the border
    rules of the reference libraries: 'nearest' (edge), 'mirror' (d c b | a b c d: OpenCV's default
    BORDER_REFLECT_101, scipy 'mirror') and 'reflect' (c b a | a b c: scipy/skimage 'reflect')."""
    i = torch.arange(-r, n + r, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    period = 2 * n - 2 if mode == "mirror" else 2 * n
    i = i.remainder(max(period, 1))
    return torch.where(i < n, i, period - i - (0 if mode == "mirror" else 1))


def _filter_matrix(n, k, mode, device):
    """1-D correlation with kernel k over a length-n axis, borders by the rule of `_pad_index`, as an
    (n, n) matrix: filtering a 32-pixel axis is then one small matrix product (on a CPU much faster
    than a float64 convolution, and the same on every device)."""
    r = len(k) // 2
    src = _pad_index(n, r, mode, "cpu")
    m = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    for t in range(len(k)):
        m.index_put_((rows, src[t:t + n]), k[t].double().expand(n), accumulate=True)
    return m.to(device)


def _filter2d(x, kh, kw=None, mode="nearest"):
    """Separable correlation of (B, C, H, W) with the 1-D kernels kh (rows) and kw (columns, default kh)
    under a border rule of `_pad_index` -- scipy.ndimage / skimage / cv2 filtering, batched."""
    kw = kh if kw is None else kw
    H, W = x.shape[-2:]
    mh, mw = _filter_matrix(H, kh, mode, x.device).to(x.dtype), _filter_matrix(W, kw, mode, x.device).to(x.dtype)
    return _sandwich(mh, x, mw)


def _sandwich(mh, x, mw):
    """mh @ x @ mw.T over the last two axes of x (einsum: a broadcast mh @ x runs one tiny product per
    image on a CPU)."""
    return torch.einsum("hk,...kw->...hw", mh, x @ mw.T)


def _gauss1d(sigma, truncate=4.0):
    """scipy.ndimage's Gaussian kernel, with its operations in its order: radius int(truncate * sigma + 0.5),
    exp(-0.5 / sigma^2 * x^2), normalized to sum 1."""
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / (sigma * sigma) * t ** 2) if sigma > 0 else (t == 0).double()
    return k / k.sum()


def _gaussian(x, sigma, mode="nearest", truncate=4.0):
    """skimage.filters.gaussian per channel: scipy's gaussian_filter along H, then W, each pass summed in scipy's
    order for a symmetric kernel (centre tap, then each pair of taps from the outermost in), so that values on flat
    regions -- exact multiples of 1/255 times a kernel summing to 1 up to rounding -- round as in the generator."""
    if not sigma > 0:
        return x
    if x.device.type == "cpu" and x.dim() == 4 and len(x) > 32:  # blocks of 32 images stay in the CPU's cache (2x)
        return torch.cat([_gaussian(b, sigma, mode, truncate) for b in x.split(32)])
    k = _gauss1d(sigma, truncate).tolist()
    r = len(k) // 2
    for dim in (-2, -1):
        n = x.shape[dim]
        p = x.index_select(dim, _pad_index(n, r, mode, x.device))
        out = p.narrow(dim, r, n) * k[r]
        for j in range(r, 0, -1):
            out.add_(torch.add(p.narrow(dim, r - j, n), p.narrow(dim, r + j, n)).mul_(k[r - j]))
        x = out
    return x


def _zoom_matrix(n_in, n_out, device):
    """scipy.ndimage.zoom(order=1) along one axis as an (n_out, n_in) matrix: output i samples the input
    at i * (n_in - 1) / (n_out - 1), linearly interpolated."""
    pos = torch.arange(n_out, dtype=torch.float64) * ((n_in - 1) / max(n_out - 1, 1))
    lo = pos.floor().long().clamp(0, n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    w = pos - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - w
    m[torch.arange(n_out), hi] += w
    return m.to(device)


def _clipped_zoom_matrix(n, z, device):
    """The generator's clipped_zoom along one axis: crop the centre ceil(n / z) pixels, zoom them by z
    (output length round(ceil(n / z) * z), scipy's rule), trim the centre n."""
    ch = int(math.ceil(n / z))
    top = (n - ch) // 2
    n_out = int(round(ch * z))
    trim = (n_out - n) // 2
    m = torch.zeros(n, n, dtype=torch.float64, device=device)
    m[:, top:top + ch] = _zoom_matrix(ch, n_out, device)[trim:trim + n]
    return m


def _trunc_u8(x):
    """[0, 1] floats -> uint8 the way the released files were made: clip, times 255, truncate."""
    return x.clamp(0, 1).mul_(255).nan_to_num_(0.0).to(torch.uint8)  # (in place: a batch is large)


_LINEAR_MAPS = {}


def _linear_map(x, key, fn):
    """fn(x) for a linear map fn of (B, C, H, W) float64 images that acts on each (H, W) plane alike.
    For small images fn is turned once into a sparse (HW, HW) matrix (its response to every basis
    image), cached under `key`: one sparse product then replaces fn's many small steps (zoom blur sums
    up to 26 zooms). Exact up to the order of floating-point additions."""
    B, C, H, W = x.shape
    if H * W > 64 * 64:
        return fn(x)
    k = (key, H, W, str(x.device))
    if k not in _LINEAR_MAPS:
        basis = torch.eye(H * W, dtype=torch.float64, device=x.device).view(H * W, 1, H, W)
        with warnings.catch_warnings():  # torch calls its sparse CSR tensors a beta feature
            warnings.simplefilter("ignore")
            _LINEAR_MAPS[k] = fn(basis).reshape(H * W, H * W).T.to_sparse_csr()
    return (_LINEAR_MAPS[k] @ x.reshape(B * C, H * W).T).T.reshape(B, C, H, W)


def rgb_to_hsv(x):
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1], skimage.color.rgb2hsv's conventions (grey: hue 0,
    saturation 0; ties in the maximum resolved blue over green over red)."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    grey = delta == 0
    s = torch.where(grey, 0.0, delta / torch.where(v == 0, 1.0, v))
    top_b, top_g = b == v, g == v
    num = torch.where(top_b, r - g, torch.where(top_g, b - r, g - b))
    h = torch.where(top_b, 4.0, torch.where(top_g, 2.0, 0.0)) + num / torch.where(grey, 1.0, delta)
    h = torch.where(grey, 0.0, (h / 6.0).remainder(1.0))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(x):
    """Inverse of `rgb_to_hsv` (skimage.color.hsv2rgb): the sector floor(6h) mod 6 picks, per channel,
    one of v, p = v(1 - s), q = v(1 - fs), t = v(1 - (1 - f)s)."""
    h, s, v = x.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    cand = torch.stack([v, v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)])  # v, p, q, t
    pick = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=x.device)
    idx = pick[hi.long().remainder(6)].movedim(-1, 1)  # (B, 3, H, W): which candidate each channel takes
    return cand.movedim(0, 1).gather(1, idx)


def plasma_fractal(n, size, decay, generator=None, device="cpu"):
    """n plasma fractals (diamond-square, Fournier et al. 1982) of side `size` (a power of two), each in
    [0, 1]: the generator's fog texture, with its amplitudes (wibble 100, divided by `decay` per level)."""
    m = torch.zeros(n, size, size, dtype=torch.float64, device=device)
    step, wibble = size, 100.0

    def noisy_mean(a):  # a / 4 + wibble * U(-wibble, wibble)
        return a / 4 + wibble * (2 * _rand(a.shape, generator, device) - 1) * wibble

    while step >= 2:
        h = step // 2
        corners = m[:, 0::step, 0::step]
        sq = corners + corners.roll(-1, 1)
        m[:, h::step, h::step] = noisy_mean(sq + sq.roll(-1, 2))
        centres, corners = m[:, h::step, h::step], m[:, 0::step, 0::step]
        m[:, 0::step, h::step] = noisy_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, h::step, 0::step] = noisy_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = h, wibble / decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def _gen_device(generator):
    return generator.device if generator is not None else "cpu"


def _rand(shape, generator, device, kind="rand", low=0, high=None, dtype=torch.float64):
    """Random numbers from `generator` (drawn on its own device, so a CPU generator gives the same
    stream for every device of x), moved to `device`: kind rand (U[0, 1)), randn, or randint [low, high)."""
    gd = _gen_device(generator)
    if kind == "randint":
        return torch.randint(low, high, shape, generator=generator, device=gd).to(device)
    fn = torch.rand if kind == "rand" else torch.randn
    # drawn in float32 (torch's float64 normal sampler is ~5x slower on a CPU), used in float64
    return fn(shape, generator=generator, device=gd).to(device, dtype)


def _below(u, c):
    """u < c for float32 numbers u and a Python float c, exactly as in float64, without a float64 copy of u."""
    t = np.float32(c)
    if float(t) == c:
        return u < float(t)
    return u <= float(t if float(t) < c else np.nextafter(t, np.float32(-np.inf)))  # the largest float32 below c


def motion_blur_kernel(radius, sigma):
    """ImageMagick's motion-blur weights: width 2*ceil(radius)+1 taps of a one-sided Gaussian,
    normalized (MagickCore MotionBlurImage)."""
    i = torch.arange(2 * math.ceil(radius) + 1, dtype=torch.float64)
    k = torch.exp(-i ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _motion_blur(x, radius, sigma, angle_deg):
    """ImageMagick-style motion blur of (B, C, H, W), one angle per image (degrees): pixel (r, c) is the
    weighted sum of the pixels (r + round(i sin a), c + round(i cos a)), i = 0..width-1, with edge
    pixels repeated beyond the border. An approximation of the generator's Wand call: ImageMagick
    works at 16-bit depth and its rounding cannot be matched bit for bit (DECISIONS.md D27)."""
    B, C, H, W = x.shape
    k = motion_blur_kernel(radius, sigma).to(x)
    a = torch.deg2rad(angle_deg.to(x))
    out = torch.zeros_like(x)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    b = torch.arange(B, device=x.device)[:, None, None]
    for i in range(len(k)):
        dx = torch.ceil(i * torch.cos(a) - 0.5).long()  # MagickCore: ceil(i*cos - 0.5), ceil(i*sin - 0.5)
        dy = torch.ceil(i * torch.sin(a) - 0.5).long()
        r = (rows[None, :] + dy[:, None]).clamp(0, H - 1)[:, :, None]
        c = (cols[None, :] + dx[:, None]).clamp(0, W - 1)[:, None, :]
        out += k[i] * x.permute(0, 2, 3, 1)[b, r, c].permute(0, 3, 1, 2)
    return out


def _pil_box_matrix(n_in, n_out):
    """Pillow's Image.resize(BOX) along one axis as an (n_out, n_in) matrix (ImagingResample's
    precompute_coeffs with the box filter: input pixels whose centre falls in the output pixel's
    support, equally weighted)."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - centre + 0.5) / fscale
            m[o, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
        m[o] /= m[o].sum()
    return m


def _pil_resize_box(u8, size):
    """Pillow's 8-bit BOX resize of 8-bit values (B, C, H, W), any dtype: horizontal pass, rounded to 8 bits, then the
    vertical pass, rounded (Pillow's two-pass fixed-point resampling; ties may differ by one level)."""
    B, C, H, W = u8.shape
    mw = _pil_box_matrix(W, size).to(u8.device)
    mh = _pil_box_matrix(H, size).to(u8.device)
    # A box of one or two pixels has weights 1 or 1/2: on 8-bit values float32 is then exact, and a CPU's float32
    # matrix product is ~50x faster than its float64 one (CIFAR-10-C's pixelate boxes are all of one or two pixels)
    # (Weights sum to 1: the values stay in [0, 255] without clamping.)
    dt = torch.float32 if max((mw > 0).sum(1).max(), (mh > 0).sum(1).max()) <= 2 else torch.float64
    mw, mh = mw.to(dt), mh.to(dt)
    t = (u8.to(dt).reshape(-1, W) @ mw.T).add_(0.5).floor_().view(B, C, H, size)  # rows, one product
    return torch.einsum("hk,bckw->bchw", mh, t).add_(0.5).floor_()  # then columns


def _jpeg(u8, quality):
    """JPEG re-encoding with Pillow (libjpeg), one image at a time on the CPU: a codec, not batchable. (Decoded by
    Image.frombytes with the JPEG decoder: the same libjpeg decode as Image.open, without sniffing the format.)"""
    from PIL import Image
    out = np.empty((u8.shape[0], u8.shape[2], u8.shape[3], 3), dtype=np.uint8)
    for i, img in enumerate(u8.permute(0, 2, 3, 1).contiguous().cpu().numpy()):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.frombytes("RGB", img.shape[1::-1], buf.getvalue(), "jpeg", "RGB", ""))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(u8.device)


def _glass_swaps(u8, shifts, delta):
    """The generator's local pixel "shuffle" on uint8 (B, C, H, W): for h, then w, running down from
    n - delta to delta + 1, pixel (h, w) takes the value of (h + dy, w + dx); shifts (passes, positions, 2, B)
    hold (dx, dy) in {-delta, ..., delta - 1} (numpy's randint excludes its upper bound). The generator means a
    swap, but its `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views copies (h', w') into (h, w) and then
    writes (h', w') back onto itself: a copy, which is what made the released CIFAR-10-C, so a copy it is here.
    The copies are sequential in the positions, as in the generator: they are followed on a map of pixel
    indices in numpy (one cheap host step per position, batched over images), then applied at once."""
    B, C, H, W = u8.shape
    hw = np.array([(h, w) for h in range(H - delta, delta, -1) for w in range(W - delta, delta, -1)])
    s = shifts.cpu().numpy()
    base = np.arange(B) * H * W
    p = base + (hw[:, 0] * W + hw[:, 1])[:, None]  # (positions, B) in the flattened (B * H * W) pixels
    perm = np.arange(B * H * W)
    for it in range(s.shape[0]):
        q = base + (hw[:, 0, None] + s[it, :, 1]) * W + hw[:, 1, None] + s[it, :, 0]
        for pj, qj in zip(p, q):
            perm[pj] = perm[qj]
    perm = torch.from_numpy(perm % (H * W)).to(u8.device).view(B, 1, H * W).expand(B, C, H * W)
    return u8.reshape(B, C, H * W).gather(2, perm).view(B, C, H, W)


def _sobel_canny(u8, low=50, high=150):
    """OpenCV's Canny edge detector (3x3 Sobel with replicated borders, L1 gradient magnitude,
    non-maximum suppression with OpenCV's fixed-point tan(22.5 deg) test and its tie rules, then
    8-connected hysteresis) on uint8 (B, H, W) -> bool edges."""
    B, H, W = u8.shape
    p = u8.to(torch.int16)  # (the derivatives of 8-bit values fit in 16 bits, the fixed-point tests below in 32)
    p = torch.cat([p[:, :1], p, p[:, -1:]], 1)
    p = torch.cat([p[:, :, :1], p, p[:, :, -1:]], 2)  # replicated borders
    v, h = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:], p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]
    dx, dy = v[:, :, 2:] - v[:, :, :-2], h[:, 2:] - h[:, :-2]  # the 3x3 Sobel derivatives
    ax, ay = dx.abs(), dy.abs()
    mag = ax + ay
    mp = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image are 0

    def at(di, dj):  # the magnitude of the neighbour (row + di, col + dj)
        return mp[:, 1 + di:1 + di + H, 1 + dj:1 + dj + W]

    ax, ay = ax.int(), ay.int() << 15
    tg22 = ax * 13573  # round(tan(22.5 deg) * 2^15)
    tg67 = tg22 + (ax << 16)
    diag = torch.where((dx ^ dy) < 0, (mag > at(-1, 1)) & (mag > at(1, -1)), (mag > at(-1, -1)) & (mag > at(1, 1)))
    local_max = torch.where(ay < tg22, (mag > at(0, -1)) & (mag >= at(0, 1)),
                            torch.where(ay > tg67, (mag > at(-1, 0)) & (mag >= at(1, 0)), diag))
    cand = local_max & (mag > low)
    strong, weak = cand & (mag > high), cand & (mag <= high)

    def dilate(m):  # 3x3 binary dilation
        p = F.pad(m, (1, 1, 1, 1))
        m = p[:, :, :-2] | p[:, :, 1:-1] | p[:, :, 2:]
        return m[:, :-2] | m[:, 1:-1] | m[:, 2:]

    while True:  # hysteresis: grow the strong edges through 8-connected weak pixels
        grown = strong | (weak & dilate(strong))
        if torch.equal(grown, strong):
            return strong
        strong = grown


def _chamfer_distance(zero, cap=20.0):
    """OpenCV's distanceTransform(DIST_L2, mask 5): the 5x5 chamfer distance (steps 1, 1.4 and 2.1969,
    summed in float32 as OpenCV 5 does) to the nearest True pixel of `zero` (B, H, W), capped at `cap`
    (all the generator keeps). Every distance is the least float32 path sum, the unique fixed point of
    d = min(d, d(neighbour) + step) whatever order the relaxations run in (float addition is monotone). So
    relax row by row down through the steps that go down, then up, then along each row right and left -- one
    pass carries a distance across the whole image, as OpenCV's two raster scans do -- and repeat until nothing
    changes (two or three rounds; relaxing every pixel at once would need a round per pixel of distance). The
    minimum over a step's neighbours is taken before the step is added: the same float32 sum, fewer operations."""
    one, diag, knight = (torch.tensor(v, dtype=torch.float32, device=zero.device) for v in (1.0, 1.4, 2.1969))
    big = float(cap + 10.0)
    H, W = zero.shape[1:]
    # (H + 4, W + 4, B): the images last, so that a row or a column of every image is one contiguous block
    d = F.pad(torch.where(zero, 0.0, big).float(), (2, 2, 2, 2), value=big).permute(1, 2, 0).contiguous()

    def sweep(order):  # relax row r from the rows p1, p2 before it in this pass, through the steps between them
        for r, p1, p2 in order:
            q, qq, row = d[p1], d[p2], d[r, 2:-2]
            best = torch.minimum(q[2:-2] + one, torch.minimum(q[1:-3], q[3:-1]) + diag)
            knights = torch.minimum(torch.minimum(q[:-4], q[4:]), torch.minimum(qq[1:-3], qq[3:-1]))
            torch.minimum(row, torch.minimum(best, knights + knight), out=row)

    while True:
        before = d.clone()
        sweep([(r, r - 1, r - 2) for r in range(2, H + 2)])  # down
        sweep([(r, r + 1, r + 2) for r in range(H + 1, 1, -1)])  # up
        for c, p in [(c, c - 1) for c in range(3, W + 2)] + [(c, c + 1) for c in range(W, 1, -1)]:  # right, left
            col = d[2:-2, c]  # (the only steps within a row are +-1 column)
            torch.minimum(col, d[2:-2, p] + one, out=col)
        if torch.equal(d, before):
            return d[2:-2, 2:-2].permute(2, 0, 1).clamp(max=cap)


def _equalize_hist(u8):
    """OpenCV's equalizeHist on uint8 (B, H, W): the lookup table round(255 * cdf excluding the first
    occupied level / (N - its count)); a constant image stays constant."""
    B = u8.shape[0]
    flat = u8.reshape(B, -1).long()
    hist = torch.zeros(B, 256, dtype=torch.long, device=u8.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).long().argmax(1, keepdim=True)
    n_first = hist.gather(1, first)
    total = flat.shape[1]
    cum = hist.cumsum(1) - n_first  # counts above the first occupied level
    scale = 255.0 / (total - n_first).clamp(min=1).double()
    lut = torch.round(cum.double() * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=u8.device) <= first, 0.0, lut)
    lut = torch.where(n_first == total, first.double().expand(-1, 256), lut)
    return lut.gather(1, flat).view(u8.shape)


def _spatter(x, c, generator):
    """The generator's spatter: a thresholded, blurred Gaussian 'liquid' layer drawn as water (severities
    1-3: edge-shaded pale turquoise, via OpenCV's Canny, distance transform and histogram equalization,
    re-implemented above) or mud (4-5: brown blots)."""
    B, _, H, W = x.shape
    liquid = _gaussian((c[0] + c[1] * _rand((B, 1, H, W), generator, x.device, "randn")), c[2])[:, 0]
    liquid = torch.where(liquid < c[3], 0.0, liquid)
    if c[5] == 0:
        lu8 = (liquid * 255).floor().remainder(256)  # numpy's astype(uint8): a liquid value above 1 wraps around
        dist = _chamfer_distance(_sobel_canny(lu8.to(torch.uint8))).float().double()[:, None]
        box = torch.ones(3, dtype=torch.float64)
        dist = (_filter2d(dist, box, mode="mirror") / 9).float().floor()  # cv2.blur -> astype(uint8)
        dist = _equalize_hist(dist[:, 0].to(torch.uint8)).double()[:, None]
        ker = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
        dist = _linear_map(dist, ("emboss",), lambda e: _filter2d_2d(e, ker, "mirror"))
        dist = torch.round(dist).clamp(0, 255)  # filter2D to uint8 (saturating)
        dist = torch.round(_filter2d(dist, box, mode="mirror") / 9)  # cv2.blur on uint8 rounds
        m = (lu8[:, None] * dist).float()  # the generator's water is mixed in float32
        m = m / m.amax((2, 3), keepdim=True) * c[4]  # 0/0 -> NaN -> a black image, as in the generator
        colour = torch.tensor([175, 238, 238], dtype=torch.float32, device=x.device).view(1, 3, 1, 1) / 255
        return x + m * colour
    m = _gaussian(torch.where(liquid > c[3], 1.0, 0.0)[:, None], c[4])
    m = torch.where(m < 0.8, 0.0, m)
    colour = torch.tensor([63, 42, 20], dtype=torch.float64, device=x.device).view(1, 3, 1, 1) / 255
    return x.double() * (1 - m) + colour * m


def _warp_affine(x, M):
    """cv2.warpAffine(x, M) with bilinear interpolation and BORDER_REFLECT_101 on float (B, C, H, W), one
    2x3 matrix per image (B, 2, 3) mapping source to destination: each output pixel samples the input at
    M^-1 (x, y). (OpenCV 5 samples float images at these exact positions; OpenCV 3, which made the
    released files, rounded them to 1/32 pixel: a difference of at most 1/64 pixel.)"""
    B, C, H, W = x.shape
    a, b, c0, d, e, f0 = M.double().reshape(B, 6).unbind(1)
    det = a * e - b * d
    inv = torch.where(det != 0, 1 / det, torch.zeros_like(det))
    A11, A12, A21, A22 = e * inv, -b * inv, -d * inv, a * inv
    B1, B2 = -A11 * c0 - A12 * f0, -A21 * c0 - A22 * f0
    ys = torch.arange(H, dtype=torch.float64, device=x.device).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float64, device=x.device).view(1, 1, W)
    v = lambda t: t.view(B, 1, 1)
    return _bilinear(x, v(A21) * xs + v(A22) * ys + v(B2), v(A11) * xs + v(A12) * ys + v(B1), "mirror")


def _bilinear(x, rows, cols, mode):
    """Sample (B, C, H, W) at fractional (rows, cols) (B, H, W), bilinearly, neighbours beyond the border
    taken by the rule of `_pad_index`: grid_sample's reflection about the border pixels' centres
    (align_corners=True) is 'mirror', about their outer edges (align_corners=False) is 'reflect'."""
    H, W = x.shape[-2:]
    if mode == "mirror":
        grid = torch.stack([cols * (2 / (W - 1)) - 1, rows * (2 / (H - 1)) - 1], -1)
    else:
        grid = torch.stack([(2 * cols + 1) / W - 1, (2 * rows + 1) / H - 1], -1)
    return F.grid_sample(x, grid.to(x.dtype), "bilinear", "reflection", align_corners=mode == "mirror")


def _elastic(x, c, generator):
    """The generator's elastic transform: a random affine warp of three control points (cv2), then a
    displacement field of Gaussian-smoothed uniform noise applied with linear interpolation (scipy
    map_coordinates, 'reflect' borders). Constants are fractions of the image size."""
    B, C, H, W = x.shape
    alpha, sigma, shift = (v * H for v in c)
    cy, cx, sq = H // 2, W // 2, min(H, W) // 3
    src = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64)  # (x, y)
    dst = src + shift * (2 * _rand((B, 3, 2), generator, "cpu").float().double() - 1)
    dst = dst.float().double()  # float32 points, as in the generator
    P = torch.cat([src, torch.ones(3, 1, dtype=torch.float64)], 1)  # solve M @ [x, y, 1] = dst for each image
    M = torch.linalg.solve(P, dst).transpose(1, 2).to(x.device)
    x = _warp_affine(x.float().double(), M).float().double()
    fields = [(_gaussian(2 * _rand((B, 1, H, W), generator, x.device) - 1, sigma, "reflect", 3.0) * alpha).float()
              for _ in range(2)]
    dx, dy = (f.double()[:, 0] for f in fields)
    rows = torch.arange(H, dtype=torch.float64, device=x.device).view(1, H, 1) + dy
    cols = torch.arange(W, dtype=torch.float64, device=x.device).view(1, 1, W) + dx
    return _bilinear(x, rows, cols, "reflect").float().double()


def _magick_q16_to_u8(v):
    """A float result v in [0, 255] as ImageMagick Q16 returns it through an 8-bit PNG: rounded to its 16-bit
    quantum (257 v), then scaled down by truncation, floor(round(257 v) / 257) -- one level below round(v) for about
    half of all values (measured against Wand/ImageMagick 6 Q16 when the port was audited)."""
    return torch.floor(torch.round(257 * v.clamp(0, 255)) / 257)


_FROST_CACHE = {}


def _cv2_resize_linear(a, f):
    """cv2.resize(img, (0, 0), fx=f, fy=f) with INTER_LINEAR on a uint8-valued (C, h, w) tensor: the output size
    is round(h f) x round(w f), and the source coordinate of output pixel i is (i + 0.5) / f - 0.5 with the scale
    1/f exactly (5 for the generator's 0.2, not h / round(h f)), clamped to the border pixels; rounded to 8 bits.
    OpenCV interpolates in 11-bit fixed point, so a value can differ by one level (tests/test_corruptions.py)."""
    def axis(n_in):
        n_out = int(np.floor(n_in * f + 0.5))
        src = (torch.arange(n_out, dtype=torch.float64) + 0.5) / f - 0.5
        i0 = src.floor().clamp(0, n_in - 1)
        w1 = torch.where((src < 0) | (i0 >= n_in - 1), 0.0, src - i0)  # OpenCV: no blend beyond the edge pixels
        return i0.long(), (i0.long() + 1).clamp(max=n_in - 1), w1
    r0, r1, wr = axis(a.shape[1])
    c0, c1, wc = axis(a.shape[2])
    rows = a[:, r0] * (1 - wr)[:, None] + a[:, r1] * wr[:, None]
    out = rows[:, :, c0] * (1 - wc) + rows[:, :, c1] * wc
    return torch.floor(out + 0.5).clamp(0, 255)


def _frost_images(frost_dir, device):
    """Hendrycks's frost pictures from `frost_dir`, scaled by 0.2 as cv2.resize does (`_cv2_resize_linear`) -> uint8-valued
    float tensors (3, h, w). A missing file is a DataError naming it."""
    key = (str(frost_dir), str(device))
    if key not in _FROST_CACHE:
        from PIL import Image
        imgs = []
        for name in FROST_FILES:
            path = pathlib.Path(frost_dir) / name
            if not path.exists():
                raise DataError(f"frost image {path} not found: --frost-dir must hold {', '.join(FROST_FILES)} "
                                f"(from Hendrycks's robustness repository, ImageNet-C/create_c)")
            a = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).double()
            imgs.append(_cv2_resize_linear(a, 0.2).to(device))
        _FROST_CACHE[key] = imgs
    return _FROST_CACHE[key]


# Elementwise and small-filter corruptions run ~1.2-1.5x faster on a CPU in blocks of 64 images that stay in its
# cache. Each draws at most one tensor of random numbers, and torch's CPU generator gives the same numbers drawn
# block by block as drawn at once (tests/test_corruptions.py), so the images do not depend on the blocking.
CPU_BLOCK = 64
CPU_BLOCKED = ("gaussian_noise", "shot_noise", "speckle_noise", "defocus_blur", "zoom_blur", "gaussian_blur",
               "brightness", "contrast", "saturate")


def corrupt(x, name, severity, generator=None, frost_dir=None):
    """One CIFAR-10-C corruption (Hendrycks & Dietterich 2019) at `severity` 1..5 of a batch x
    (B, 3, H, W) of 8-bit values k / 255 (any float dtype), on x's device, computed in float64 as the reference
    generator does, and
    returned as uint8 (B, 3, H, W) truncated like the released files. Random numbers come from
    `generator` (a torch.Generator on any device; the same generator state gives the same images on
    every device of x). Severity constants are CIFAR-10-C's (32x32 images; DECISIONS.md D26).
    Exact ports (same uint8 output up to floating-point ties, tested against numpy/scipy/skimage/
    Pillow/OpenCV): every corruption but motion_blur and snow, whose ImageMagick motion blur is
    re-implemented approximately (DECISIONS.md D27), and frost, whose pictures come from `frost_dir`."""
    check_choice("corruption", name, CORRUPTION_NAMES)
    if not (isinstance(severity, int) and 1 <= severity <= 5):
        raise ValueError(f"severity {severity!r}: expected an integer in 1..5")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"corrupt expects RGB images (B, 3, H, W), got {tuple(x.shape)}")
    on_cpu = x.device.type == "cpu" and torch.device(_gen_device(generator)).type == "cpu"
    if on_cpu and name in CPU_BLOCKED and len(x) > CPU_BLOCK:
        return torch.cat([corrupt(b, name, severity, generator) for b in x.split(CPU_BLOCK)])
    c = SEVERITY[name][severity - 1]
    g, dev = generator, x.device
    B, _, H, W = x.shape
    if name == "pixelate":  # on the 8-bit values alone (float32 is exact here; no float64 copy of the batch)
        return _pil_resize_box(_pil_resize_box(torch.round(x.float() * 255), int(H * c)), H).to(torch.uint8)
    if name == "jpeg_compression":
        return _jpeg(torch.round(x.float() * 255).to(torch.uint8), c)
    if name == "impulse_noise":  # skimage random_noise('s&p'): each element flipped w.p. c, to 1 or 0 w.p. 1/2
        flip = _below(_rand(x.shape, g, dev, dtype=torch.float32), c)
        salt = _below(_rand(x.shape, g, dev, dtype=torch.float32), 0.5)
        # an element not flipped is k / 255, which the generator's truncation turns back into k (for every k)
        return torch.where(flip, salt.to(torch.uint8) * 255, torch.round(x.float() * 255).to(torch.uint8))
    if name == "spatter":  # the generator's spatter starts from np.float32(x) / 255
        return _trunc_u8(_spatter(torch.round(x.float() * 255) / 255, c, g))
    v8 = (x.double() * 255).round_()  # the generator corrupts 8-bit images: k / 255 exactly, also from float32
    x = v8 / 255
    if name == "gaussian_noise":
        out = _rand(x.shape, g, dev, "randn").mul_(c).add_(x)
    elif name == "shot_noise":
        rate = (x * c).to(_gen_device(g))
        out = torch.poisson(rate, generator=g).to(dev) / c
    elif name == "speckle_noise":
        out = _rand(x.shape, g, dev, "randn").mul_(x * c).add_(x)
    elif name == "gaussian_blur":
        out = _gaussian(x, c)
    elif name == "defocus_blur":
        k = _defocus_kernel(*c)
        out = _linear_map(x, ("defocus", c), lambda e: _filter2d_2d(e, k, "mirror"))
    elif name == "glass_blur":
        sigma, delta, passes = c
        u = _trunc_u8(_gaussian(x, sigma))
        n = (H - 2 * delta) * (W - 2 * delta)
        shifts = _rand((passes, n, 2, B), g, dev, "randint", -delta, delta)
        out = _gaussian(_glass_swaps(u, shifts, delta).double() / 255, sigma)
    elif name == "motion_blur":  # to 8 bits as ImageMagick Q16 writes its PNG, not truncated by the generator
        angle = _rand((B,), g, dev) * 90 - 45
        return _magick_q16_to_u8(_motion_blur(x * 255, c[0], c[1], angle)).to(torch.uint8)
    elif name == "zoom_blur":  # the mean of x and its zooms by 1, 1.01, ... (float32 x, as in the generator)
        zooms = np.arange(1, c, 0.01)

        def zoom_mean(e):
            return (e + sum(_clipped_zoom_matrix(H, z, dev) @ e @ _clipped_zoom_matrix(W, z, dev).T for z in zooms)
                    ) / (len(zooms) + 1)

        out = _linear_map(x.float().double(), ("zoom", c), zoom_mean)
    elif name == "snow":
        xf = x.float().double()
        layer = c[0] + c[1] * _rand((B, 1, H, W), g, dev, "randn")
        layer = _sandwich(_clipped_zoom_matrix(H, c[2], dev), layer, _clipped_zoom_matrix(W, c[2], dev))
        layer = torch.where(layer < c[3], 0.0, layer)
        layer = (layer.clamp(0, 1) * 255).floor()  # an 8-bit greyscale image before ImageMagick
        angle = _rand((B,), g, dev) * 90 - 135
        layer = _magick_q16_to_u8(_motion_blur(layer, c[4], c[5], angle)) / 255
        grey = (0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2])[:, None].float().double()
        xf = c[6] * xf + (1 - c[6]) * torch.maximum(xf, grey * 1.5 + 0.5)
        out = xf + layer + layer.flip(2, 3)
    elif name == "frost":
        if frost_dir is None:
            raise ValueError("frost needs Hendrycks's frost images: pass their folder as frost_dir (--frost-dir)")
        imgs = _frost_images(frost_dir, dev)
        pick = _rand((B,), g, "cpu", "randint", 0, len(imgs)).tolist()
        u = _rand((B, 2), g, "cpu")
        crops = []
        for i, k in enumerate(pick):
            h, w = imgs[k].shape[1:]
            r0, c0 = int(u[i, 0] * (h - H)), int(u[i, 1] * (w - W))
            crops.append(imgs[k][:, r0:r0 + H, c0:c0 + W])
        return (c[0] * v8 + c[1] * torch.stack(crops)).clamp(0, 255).to(torch.uint8)
    elif name == "fog":
        size = 1 << max(0, (max(H, W) - 1).bit_length())
        plasma = plasma_fractal(B, size, c[1], g, dev)[:, None, :H, :W]
        top = x.amax((1, 2, 3), keepdim=True)
        out = (x + c[0] * plasma) * top / (top + c[0])
    elif name in ("brightness", "saturate"):
        hsv = rgb_to_hsv(x)
        if name == "brightness":
            hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
        else:
            hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
        out = hsv_to_rgb(hsv)
    elif name == "contrast":
        m = x.mean((2, 3), keepdim=True)
        out = (x - m) * c + m
    elif name == "elastic_transform":
        out = _elastic(x, c, g)
    return _trunc_u8(out)


def _defocus_kernel(radius, alias_blur):
    """The generator's defocus kernel: an aliased disk of `radius` on a 17x17 grid, normalized, then
    smoothed by cv2.GaussianBlur(3x3, sigma=alias_blur) in float32 -- bit for bit as OpenCV does it: its float32
    1-D Gaussian (each exp rounded to float32, normalized by the double sum of those), then a row and a column pass
    in float32 with mirrored borders. (A kernel made in float64 sums to 0.99999985 instead of OpenCV's 1.0, which
    moves a flat region's truncated value down one level.)"""
    t = torch.arange(-8, 9, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).float()
    disk = disk / disk.sum()
    e = [float(np.float32(math.exp(-0.5 / alias_blur ** 2 * v * v))) for v in (-1.0, 0.0, 1.0)]
    g = torch.tensor([v / sum(e) for v in e], dtype=torch.float32)

    def rows(a):  # one float32 pass along the last axis, reflect-101 borders, OpenCV's order of operations
        p = a[:, _pad_index(a.shape[1], 1, "mirror", "cpu")]
        return p[:, :-2] * g[0] + p[:, 1:-1] * g[1] + p[:, 2:] * g[2]
    k = rows(rows(disk).T).T
    r = int((k != 0).any(0).nonzero().max()) - 8  # drop the all-zero border (the disk is small at CIFAR's radii)
    return k[8 - r:9 + r, 8 - r:9 + r]


def _filter2d_2d(x, k, mode):
    """Correlation of (B, C, H, W) with a 2-D kernel (cv2.filter2D per channel)."""
    B, C, H, W = x.shape
    r = k.shape[0] // 2
    p = x[:, :, _pad_index(H, r, mode, x.device)][:, :, :, _pad_index(W, r, mode, x.device)]
    return F.conv2d(p.reshape(B * C, 1, H + 2 * r, W + 2 * r), k.to(x)[None, None]).view(B, C, H, W)


# ================================================================================================
# 3. Main
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
            make_model(arch, **model_kwargs(arch, norm, data, args.width, args.gn_groups))
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


# ================================================================================================
# 4. Claims, tables and figures
# ================================================================================================

claim_pp = functools.partial(claim, scale=100.0)  # accuracies: effects in percentage points
STD, ADV = dict(training="standard"), dict(training="adversarial")
MEAN = dict(severity="mean", stats="source")  # accuracy averaged over the five severities, statistics not adapted
FIG1_CLAIMS = [
    claim_pp("fig1_adv_noise", "P1 Fig 1", "Adversarial training raises accuracy under noise", "higher for every norm "
             "(figure only; Ford et al. 2019)", "acc_c", ADV, STD, ">", per=("norm", "corruption"),
             where=MEAN | dict(corruption=NOISE3)),
    claim_pp("fig1_adv_fog_contrast", "P1 Fig 1", "Adversarial training lowers accuracy under fog and contrast", "lower "
          "(figure only)", "acc_c", ADV, STD, per=("norm", "corruption"), where=MEAN | dict(corruption=["fog", "contrast"])),
    *[claim_pp(f"fig1_{n}_noise", "P1 Fig 1", f"{n.upper()} is less accurate than none under noise (standard training)",
            "none best on noise (figure only)", "acc_c", dict(norm=n), dict(norm="none"), per=("corruption",),
            where=MEAN | STD | dict(corruption=NOISE3)) for n in ("bn", "in", "ln", "gn")],
    *[claim_pp(f"fig1_{n}_fog_contrast", "P1 Fig 1", f"{n.upper()} is more accurate than none under fog and contrast "
            "(standard training)", "normalized better (figure only)", "acc_c", dict(norm=n), dict(norm="none"), ">",
            per=("corruption",), where=MEAN | STD | dict(corruption=["fog", "contrast"])) for n in ("bn", "in", "ln", "gn")],
    *[claim_pp(f"fig1_in_contrast_{n}", "P1 Fig 1", f"IN is unusually robust to contrast: above {n.upper()} (standard "
            "training)", "IN highest on contrast (figure only)", "acc_c", {"norm": "in"}, dict(norm=n), ">",
            where=MEAN | STD | dict(corruption="contrast")) for n in ("none", "bn", "ln", "gn")],
    *[claim_pp(f"fig1_bn_below_{n}", "P1 Sec. 5", f"BN is more vulnerable than {n.upper()} to every corruption (standard "
            "training)", "all corruptions (figure only)", "acc_c", dict(norm="bn"), dict(norm=n), per=("corruption",),
            where=MEAN | STD) for n in ("in", "ln", "gn")],
]
T7_CLAIMS = [claim_pp("t7_adapt", "P1 Table 7", "Re-estimating the BN statistics on each corrupted set raises accuracy",
                      "VGG16 71.9 → 79.4, ResNet18 73.9 → 82.3", "acc_mean", dict(stats="adapted"), dict(stats="source"),
                      ">", per=("arch",), where=dict(severity="all"), paper_effect=7.5)]
BN, NONE, FIXUP = dict(norm="bn"), dict(norm="none"), dict(norm="fixup")
P2_T4_CLAIMS = [
    *[claim_pp(f"p2t4_noise_cells_{ref}", "P2 Sec. 3", f"BN has higher error than {ref} on every noise corruption at every "
            "severity", "every cell (VGG13 Gaussian gap 26-28 at severities 3-5)", "acc_c", BN, b,
            per=("arch", "corruption", "severity"), where=dict(category="noise", severity=[1, 2, 3, 4, 5], stats="source"))
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
    *[claim_pp(f"p2t4_noise_{ref}", "P2 Table 4", f"BN is less accurate than {ref} under noise (mean over severities)",
            "VGG8 −9.2/−7.5/−5.6/−4.5, VGG13 −20.9/−13.6/−14.1/−11.1, WRN −12.1/−10.7/−8.7/−6.9 (Gaussian/impulse/shot/"
            "speckle)", "acc_c", BN, b, per=("arch", "corruption"), where=MEAN | dict(category="noise"), paper_effect=-4.5)
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
    *[claim_pp(f"p2t4_mce_{ref}", "P2 Sec. 3", f"BN increases mCE over all corruptions (vs {ref})", "VGG8 +1.9 ± 0.9, VGG13 "
            "+2.0 ± 0.3, WRN +1.6 ± 0.4", "mce", BN, b, ">", per=("arch",), where=dict(severity="all", stats="source"),
            paper_effect=1.6)
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
    *[claim_pp(f"p2t4_clean_{ref}", "P2 Table 4", f"BN raises clean accuracy (vs {ref})", "VGG8 +0.8, VGG13 +1.3, WRN +1.3",
            "acc_clean", BN, b, ">", per=("arch",), where=dict(severity="all", stats="source"), paper_effect=0.8)
      for ref, b in (("none", NONE), ("Fixup", FIXUP))],
]

CLAIMS = {  # the papers' claims each artifact tests (common.claim; verdicts by common.evaluate_claims)
    "fig1": FIG1_CLAIMS,
    "t7": T7_CLAIMS,
    "p2_t4": P2_T4_CLAIMS,
}


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


def claim_rows(records):
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
    write_claims(run_dir, CLAIMS[art], claim_rows(records),
                 "# Claims: " + header[2:])


# ================================================================================================
# 5. Command line
# ================================================================================================

def get_args(argv=None):
    p, g = make_parser(__doc__, ARTIFACTS, "fig1", PRESETS)
    g.add_argument("--dataset", choices=["cifar10", "digits", "synthetic"], help="override the dataset")
    g.add_argument("--arch", nargs="+", help="override the architectures (e.g. vgg16 resnet18)")
    g.add_argument("--norm", nargs="+", choices=list(NORMS) + ["fixup"], help="override the norms")
    g.add_argument("--seeds", type=int, help="seeds per model (P1: 1; P2 Table 4: 3)")
    g.add_argument("--select", choices=["final", "best_test"], help="evaluate the final epoch or the epoch of best "
                   "clean test accuracy (P2 Table 4: best_test for Table 2's VGG8/WRN; said in each record)")
    g.add_argument("--arch-seeds", nargs="*", metavar="ARCH=N", type=arch_seeds_arg,
                   help="seeds for particular architectures (P2 Table 4: wrn28_10=5); an empty list: --seeds for all")
    g.add_argument("--corruptions", nargs="+", default=list(CORRUPTION_NAMES), choices=list(CORRUPTION_NAMES),
                   help="corruptions to evaluate")
    g.add_argument("--severities", nargs="+", type=int, help="severities to evaluate (1..5)")
    g.add_argument("--compare-released", action="store_true", help="only compare the generator with the released "
                   "CIFAR-10-C files: mean absolute difference per corruption and severity")
    g = p.add_argument_group("training")
    g.add_argument("--width", type=float, help="channel multiplier (1 = the paper's models)")
    g.add_argument("--epochs", type=int, help="training epochs (unset: each model's recipe: P1 VGG 200, ResNet 350; "
                   "P2 150, VGG13 350)")
    g.add_argument("--lr", type=float, help="initial learning rate (unset: each model's recipe)")
    g.add_argument("--batch-size", type=int, help="SGD batch size")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (DECISIONS.md D1)")
    g.add_argument("--warmup-epochs", type=float, help="linear LR warm-up")
    g.add_argument("--adv-eps", type=float, help="adversarial training (fig1): l2 PGD budget in pixels (DECISIONS.md D15)")
    g.add_argument("--adv-steps", type=int, help="adversarial training: PGD steps")
    g.add_argument("--adv-step-size", type=float, help="adversarial training: PGD step size")
    g.add_argument("--gn-groups", type=int, help="GroupNorm groups (unset: min(32, channels))")
    g.add_argument("--source", default="auto", choices=["auto", "released", "generated"], help="corrupted images: the "
                   "released CIFAR-10-C files (auto: when present under --data-root) or the batched generator in this script")
    g = p.add_argument_group("attack budgets and measurements")
    g.add_argument("--n-eval", type=int, help="test images evaluated, class-balanced (unset: the whole test set)")
    g = add_run_flags(p, "exp_corruption", unit="runs", data="cifar-10-batches-py/ and CIFAR-10-C/",
                         download="fetch missing CIFAR-10 / CIFAR-10-C (md5-checked; 2.9 GB)",
                         cache="shared checkpoint cache: reuse a model trained by any script with the same dataset, "
                               "architecture, norm, width, recipe and seed", outputs="table.md, claims.md and the figure")
    g.add_argument("--size", type=int, help="resize images to size x size (unset: the dataset's own)")
    g.add_argument("--channels", type=int, help="repeat grey images to this many channels (unset: the dataset's own)")
    g.add_argument("--frost-dir", help="folder with Hendrycks's frost1.png..frost5.jpg (generated frost; "
                   "without it frost is skipped and said so)")
    g.add_argument("--corruption-seed", type=int, default=0, help="seed of the generated corruptions")
    g.add_argument("--adapt-on", choices=["batch", "all"], default="batch",
                   help="t7: re-estimate the BN statistics on one random batch of --adapt-batch images of each corrupted "
                        "set (the authors' batch_norm_adaptation code) or on all of it (transductive, AdaBN)")
    g.add_argument("--adapt-batch", type=int, default=32, help="t7: images in the adaptation batch (authors' code: 32)")
    g.add_argument("--adapt-split", action="store_true", help="t7: draw the adaptation images from one half of each "
                   "corrupted set and evaluate both columns on the other (default: the whole set)")
    args = parse_with_presets(p, resolve, argv)
    args.arch_seeds = dict(args.arch_seeds or {})  # (ARCH=N pairs from the command line, a dict from a preset)
    if args.plot_only:
        return args
    check_numbers(p, args, at_least_one=("seeds", "epochs", "batch_size", "adv_steps", "n_eval", "size", "channels",
                                         "gn_groups", "adapt_batch"),
                  positive=("width", "lr"), non_negative=("weight_decay", "warmup_epochs", "adv_eps", "adv_step_size",
                                                          "corruption_seed"))
    bad = [s for s in args.severities if not 1 <= s <= 5]
    if bad:
        p.error(f"--severities {bad[0]}: expected integers in 1..5")
    if args.frost_dir is not None and not pathlib.Path(args.frost_dir).is_dir():
        p.error(f"--frost-dir {args.frost_dir}: not a folder")
    return args


if __name__ == "__main__":
    run_script(main, get_args)
