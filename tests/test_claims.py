"""Claims as data (DECISIONS.md D25): the t quantile and Welch interval against scipy, verdicts, per-group
claims; the attack sanity checks (D7); the shared checkpoint cache; recipe-key checks; shared gradients."""
import math

import pytest
import torch
import torch.nn as nn

from common import (Z_POWER, build_dataset, cache_path, check_attack, claims_markdown, epoch_metrics, evaluate_claims,
                    ligs, make_model, pgd, seeds_needed, t_quantile, train_model, welch_interval)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1.0, 1.7, 2.0, 4.3, 9.0, 60.0])
def test_t_quantile_matches_scipy(df):
    for p in (0.975, 0.95, 0.6, 0.025):
        assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-6, abs=1e-7)


def test_welch_interval_matches_the_textbook_formula():
    a, b = [0.41, 0.52, 0.38, 0.47, 0.60], [0.30, 0.22, 0.35]
    effect, lo, hi, na, nb = welch_interval(a, b)
    va, vb = scipy_stats.tvar(a) / len(a), scipy_stats.tvar(b) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    d = sum(a) / 5 - sum(b) / 3
    assert (na, nb) == (5, 3) and effect == pytest.approx(d)
    assert (lo, hi) == (pytest.approx(d - half), pytest.approx(d + half))
    # the interval excludes 0 exactly when Welch's two-sided test rejects at 5 %
    p = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
    assert (lo > 0) == (p < 0.05)
    # one-sample interval, and the degenerate cases
    e1, l1, h1, _, _ = welch_interval([1.0, 2.0, 3.0])
    assert e1 == 2.0 and h1 - e1 == pytest.approx(scipy_stats.t.ppf(0.975, 2) * 1 / math.sqrt(3))
    assert math.isnan(welch_interval([0.5], [0.1, 0.2])[1])  # n = 1: no interval
    assert welch_interval([1.0, 1.0], [0.0, 0.0])[1:3] == (1.0, 1.0)  # no spread: the interval is the point


def rows(a_vals, b_vals, **extra):
    return ([dict(norm="bn", seed=i, status="ok", acc=v, **extra) for i, v in enumerate(a_vals)] +
            [dict(norm="none", seed=i, status="ok", acc=v, **extra) for i, v in enumerate(b_vals)])


CLAIM = dict(id="c", paper="P1 Table 1", claim="BN lowers accuracy", paper_value="−20", metric="acc",
             a=dict(norm="bn"), b=dict(norm="none"), expect="<", scale=100.0)


def verdict(r):
    return evaluate_claims([CLAIM], r)[0]["verdict"]


def test_verdicts():
    assert verdict(rows([0.1, 0.12, 0.11], [0.5, 0.52, 0.49])) == "held"
    assert verdict(rows([0.5, 0.52, 0.49], [0.1, 0.12, 0.11])) == "reversed"
    assert verdict(rows([0.1, 0.5, 0.3], [0.2, 0.4, 0.35])) == "inconclusive"  # interval contains 0
    assert verdict(rows([0.1], [0.9])) == "inconclusive"  # one seed never decides
    assert verdict(rows([], [0.9, 0.8])) == "not run"
    failed = rows([0.1, 0.12, 0.11], [0.5, 0.52, 0.49])
    failed[0] |= dict(status="failed", acc=0.9)  # failed runs are left out, not counted
    assert evaluate_claims([CLAIM], failed)[0]["n_a"] == 2


def test_underpowered_when_the_seeds_cannot_decide_the_papers_effect():
    assert Z_POWER == pytest.approx(scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8), abs=1e-6)
    sized = CLAIM | dict(paper_effect=-20.0)  # the paper's effect: -20 points
    wide = rows([0.1, 0.5, 0.3], [0.2, 0.4, 0.35])  # sd 20 and 10 points: (2.80 * 22.4 / 20)^2 -> 10 seeds
    res = evaluate_claims([sized], wide)[0]
    assert res["verdict"] == "underpowered" and res["seeds_needed"] == seeds_needed(0.2, 0.1, 0.2) == 10
    assert "**underpowered** (~10 seeds)" in claims_markdown([res], "# c")
    narrow = rows([0.30, 0.31, 0.29, 0.30], [0.30, 0.29, 0.31, 0.305])  # enough seeds, no paper-sized effect
    res = evaluate_claims([sized], narrow)[0]
    assert res["verdict"] == "inconclusive" and res["seeds_needed"] == 2
    assert evaluate_claims([CLAIM], wide)[0]["verdict"] == "inconclusive"  # no number from the paper: no power verdict
    assert evaluate_claims([sized], rows([0.1, 0.12, 0.11], [0.5, 0.52, 0.49]))[0]["verdict"] == "held"
    # the seeds it asks for do find the paper's effect about 80 % of the time (a little less: Welch's t, not z)
    g = torch.Generator().manual_seed(0)
    n = seeds_needed(0.15, 0.15, 0.2)
    found = sum(evaluate_claims([sized], rows((0.3 + 0.15 * torch.randn(n, generator=g)).tolist(),
                                              (0.5 + 0.15 * torch.randn(n, generator=g)).tolist()))[0]["verdict"] == "held"
                for _ in range(150)) / 150
    assert n == 9 and 0.65 < found < 0.9


def test_per_group_claims_and_one_sample_claims():
    r = rows([0.1, 0.12, 0.11], [0.5, 0.52, 0.49], arch="vgg") + rows([0.6, 0.62, 0.61], [0.5, 0.52, 0.49], arch="resnet")
    out = evaluate_claims([CLAIM | dict(per=("arch",))], r)
    assert [(c["where"]["arch"], c["verdict"]) for c in out] == [("vgg", "held"), ("resnet", "reversed")]
    one = dict(CLAIM, b=None, ref=0.3, expect=">")
    res = evaluate_claims([one], rows([0.5, 0.6, 0.55], []))[0]
    assert res["verdict"] == "held" and res["effect"] == pytest.approx(0.25) and res["method"] == "one-sample t"
    checks = [("vgg bn s0 pgd_l2", ""), ("vgg none s0 pgd_l2", "50% zero input gradients")]
    md = claims_markdown(out, "# claims", checks=checks)
    assert "**held**" in md and "**reversed**" in md and "1 flagged" in md and "50% zero input gradients" in md


class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_check_attack_passes_a_sound_attack_and_flags_zero_gradients():
    torch.manual_seed(0)
    x, y = torch.rand(60, 8), torch.randint(0, 3, (60,))
    good = Linear(torch.randn(8, 3))
    spec = dict(kind="pgd", norm="linf", eps=0.05, steps=10, clip=None)
    c = check_attack(good, x, y, spec, n=60, large=100.0)
    assert c["zero_grad"] == 0.0 and c["flags"] == "", c
    assert c["acc_x0.5"] >= c["acc_x1"] >= c["acc_x2"] >= c["acc_large"] and c["acc_x1"] <= c["acc_onestep"]
    dead = Linear(torch.zeros(8, 3))  # constant logits: zero input gradients, so the attack cannot move
    d = check_attack(dead, x, y, spec, n=60, large=100.0)
    assert d["zero_grad"] == 1.0 and "zero input gradients" in d["flags"] and "leaves" in d["flags"]


def test_cache_key_and_reuse(tmp_path):
    key = dict(dataset="synthetic", arch="mlp", norm="bn", width=1.0, recipe=dict(epochs=2, lr=0.1), seed=0)
    assert cache_path(tmp_path, key) == cache_path(tmp_path, dict(reversed(list(key.items()))))  # order-free
    for change in (dict(norm="none"), dict(width=0.5), dict(seed=1), dict(recipe=dict(epochs=2, lr=0.2))):
        assert cache_path(tmp_path, key | change) != cache_path(tmp_path, key)
    assert cache_path(None, key) is None
    data = build_dataset("synthetic", size=8, n_train=64, n_test=16)
    recipe = dict(epochs=2, batch_size=32, lr=0.1)
    torch.manual_seed(0)
    model = make_model("mlp", norm="bn", in_dim=3 * 64, hidden=[16])
    ckpt = cache_path(tmp_path, key)
    first = train_model(model, data, recipe, ckpt=ckpt, key=key, log=lambda s: None)
    steps = []
    torch.manual_seed(1)  # a different init: everything must come from the cache
    again = make_model("mlp", norm="bn", in_dim=3 * 64, hidden=[16])
    second = train_model(again, data, recipe, ckpt=ckpt, key=key, log=lambda s: None, on_step=lambda *a: steps.append(1))
    assert steps == [] and second["history"] == first["history"]  # reused, not retrained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="another configuration"):  # the same file with another key is refused
        train_model(again, data, recipe, ckpt=ckpt, key=key | dict(seed=5), log=lambda s: None)


def test_misspelt_recipe_key_is_an_error():
    data = build_dataset("synthetic", size=8, n_train=32, n_test=8)
    model = make_model("mlp", norm="none", in_dim=3 * 64, hidden=[8])
    with pytest.raises(ValueError, match="unknown key.*weight_dacay"):
        train_model(model, data, dict(epochs=1, batch_size=16, lr=0.1, weight_dacay=5e-4), log=lambda s: None)
    with pytest.raises(ValueError, match="missing.*lr"):
        train_model(model, data, dict(epochs=1, batch_size=16), log=lambda s: None)


def test_shared_clean_gradient_is_bit_identical():
    torch.manual_seed(0)
    model = make_model("vgg8", norm="bn", width=1 / 8, in_channels=3)
    x, y = torch.rand(20, 3, 32, 32), torch.randint(0, 10, (20,))
    from common import ce_input_grad, eval_mode
    with eval_mode(model):
        g0 = ce_input_grad(model, x, y)
    assert torch.equal(pgd(model, x, y, 0.5, 3, norm="l2", grad0=g0), pgd(model, x, y, 0.5, 3, norm="l2"))
    for p in ("gaussian", "fgsm", "pgd"):
        g = lambda: torch.Generator().manual_seed(3)
        assert ligs(model, x, y, p, generator=g(), g0=g0) == ligs(model, x, y, p, generator=g())
    m = epoch_metrics(model, x, y, x, y, 0.5, 3, perturbations=("gaussian", "pgd"))
    assert m["ligs_pgd"] == ligs(model, x, y, "pgd", generator=torch.Generator().manual_seed(0))[0]


@pytest.mark.parametrize("kw, match", [(dict(step_size=-0.04), "step_size"), (dict(step_size=0.0), "step_size"),
                                       (dict(eps=float("nan")), "eps"), (dict(eps=float("inf")), "eps"),
                                       (dict(kappa=-1.0, loss="cw"), "kappa")])
def test_attacks_reject_nonsense_budgets(kw, match):
    model = make_model("mlp", norm="none", in_dim=4, hidden=[])
    args = dict(eps=0.1, steps=2) | kw
    with pytest.raises(ValueError, match=match):
        pgd(model, torch.rand(3, 4), torch.zeros(3, dtype=torch.long), **args)


@pytest.mark.parametrize("arch, size", [("vgg11", 32), ("resnet18", 16)])
def test_channels_last_agrees_to_float_tolerance(arch, size):
    # the scripts run convnets in channels_last on every device (faster on CPU too); the numbers must not move
    torch.manual_seed(0)
    model = make_model(arch, norm="bn", width=1 / 8, in_channels=1, mean=(0.5,), std=(0.3,)).eval()
    x, y = torch.rand(16, 1, size, size), torch.randint(0, 10, (16,))
    ref = pgd(model, x, y, 1.0, 3, norm="l2")
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(pgd(cl, x, y, 1.0, 3, norm="l2"), ref, atol=1e-4, rtol=0)
