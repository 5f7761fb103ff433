"""The quick presets follow the rules of DECISIONS.md D35, computed here from the committed pilot runs
(results/pilots/: unnormalized models, pilot seeds 100-102 only); the LIGS trend from the first useful epoch and the
dimension-matched sigma."""
import json
import math
import pathlib
import statistics

import pytest
import torch

import exp_ligs_trend
import exp_table1
from common import epoch_metrics, ligs, ligs_sigma_matched, make_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
PILOTS = ROOT / "results" / "pilots" / "exp_table1"


def pilot(arch, lr, epochs=10):
    """The pilot records of one (arch, LR, epochs): every seed, trained or not."""
    res = json.loads((PILOTS / f"{arch}_lr{lr}_e{epochs}" / "results.json").read_text())
    cfg = json.loads((PILOTS / f"{arch}_lr{lr}_e{epochs}" / "config.json").read_text())["args"]
    assert cfg["norm"] == ["none"] and cfg["first_seed"] == 100  # pilots: unnormalized, never the reported seeds
    return res["records"]


def test_exp_table1_quick_preset_is_what_the_rules_give_on_the_pilots():
    args = exp_table1.get_args(["--preset", "quick"])
    chosen, budgets = {}, {}
    for arch in ("vgg11", "resnet18"):
        losses = {}
        for lr in ("0.005", "0.01", "0.02"):
            recs = pilot(arch, lr)
            if len(recs) == 3 and all(r["status"] == "ok" for r in recs):  # all three pilots train
                losses[lr] = statistics.median(r["loss_train_eval"] for r in recs)
        chosen[arch] = float(min(losses, key=losses.get))  # rule 1: the lowest median eval-mode training loss
        recs = pilot(arch, min(losses, key=losses.get))
        budgets[arch] = {k: statistics.median(r[f"min_eps_{k}"] for r in recs) for k in ("l2", "linf")}
    assert args.arch_lr == chosen == {"vgg11": 0.005, "resnet18": 0.02}
    for arch in chosen:
        assert exp_table1.recipe(args, "digits", arch, "bn")["lr"] == chosen[arch]  # every norm of the architecture
    # rule 2: one budget, the geometric mean over the architectures of the pilots' median minimal budget, rounded
    gm = {k: math.sqrt(budgets["vgg11"][k] * budgets["resnet18"][k]) for k in ("l2", "linf")}
    assert args.eps_l2 == pytest.approx(gm["l2"], abs=0.05)
    assert args.eps_linf * 255 == pytest.approx(gm["linf"] * 255, abs=0.5) and args.eps_fgsm == args.eps_linf
    assert (args.attacks, args.min_eps_range, args.min_eps_iters) == ("strong", 4.0, 6)
    paper = exp_table1.get_args(["--preset", "paper"])  # the paper presets do not change
    assert (paper.arch_lr, paper.attacks, paper.first_seed) == ({}, "standard", 0)


def test_quick_presets_have_at_least_three_seeds():
    import exp_depth_batch
    import exp_landscape
    assert exp_landscape.get_args(["--preset", "quick"]).seeds >= 3
    assert exp_depth_batch.get_args(["--preset", "quick"]).seeds >= 3
    for art in exp_ligs_trend.ARTIFACTS:
        assert exp_ligs_trend.get_args(["--preset", "quick", "--artifact", art]).seeds >= 3


def test_dimension_matched_sigma_keeps_the_noise_norm():
    assert ligs_sigma_matched(0.01, (3, 32, 32)) == pytest.approx(0.01)
    s = ligs_sigma_matched(0.01, (1, 16, 16))
    assert s == pytest.approx(0.01 * math.sqrt(12))
    g = torch.Generator().manual_seed(0)
    cifar, digit = 0.01 * torch.randn(2000, 3072, generator=g), s * torch.randn(2000, 256, generator=g)
    assert float(digit.norm(dim=1).mean()) == pytest.approx(float(cifar.norm(dim=1).mean()), rel=0.01)


def test_epoch_metrics_measures_ligs_at_the_second_sigma():
    torch.manual_seed(0)
    model = make_model("mlp", norm="none", in_dim=16, hidden=[8], num_classes=3).eval()
    x, y = torch.rand(30, 1, 4, 4), torch.randint(0, 3, (30,))
    out = epoch_metrics(model, x, y, x, y, eps=0.1, steps=2, sigma=0.01, seed=5, sigma_dm=0.05)
    ref, _ = ligs(model, x, y, sigma=0.05, generator=torch.Generator().manual_seed(5))
    assert out["ligs_dm"] == pytest.approx(ref) and out["ligs_dm"] != pytest.approx(out["ligs"])
    assert "ligs_dm" not in epoch_metrics(model, x, y, x, y, eps=0.1, steps=2, sigma=0.01, seed=5)


def test_ligs_trend_from_the_first_useful_epoch():
    def run(variant, seed, accs, ligs_values, dm):
        return [dict(variant=variant, seed=seed, epoch=e, clean_acc=a, ligs=v, ligs_dm=d)
                for e, (a, v, d) in enumerate(zip(accs, ligs_values, dm))]
    recs = (run("standard none", 0, [0.1, 0.5, 0.92, 0.95, 0.97], [0.2, 0.6, 0.8, 0.78, 0.75], [0.1, 0.3, 0.5, 0.5, 0.4])
            + run("standard bn", 0, [0.1, 0.3, 0.5, 0.6, 0.7], [0.3, 0.4, 0.5, 0.5, 0.6], [0.2] * 5))
    rows = {r["variant"]: r for r in exp_ligs_trend.claim_rows(recs)}
    none, bn = rows["standard none"], rows["standard bn"]
    assert none["ligs_change"] == pytest.approx(0.75 - 0.2)  # from epoch 0: a rise
    assert none["ligs_change_useful"] == pytest.approx(0.75 - 0.8) and none["useful_epoch"] == 2  # from epoch 2: a fall
    assert none["ligs_dm_change_useful"] == pytest.approx(0.4 - 0.5)
    assert bn["ligs_change_useful"] is None and bn["useful_epoch"] is None  # never useful: not counted
    assert exp_ligs_trend.claim_rows(recs, useful_acc=0.6)[1]["useful_epoch"] == 3
