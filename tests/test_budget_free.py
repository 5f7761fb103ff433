"""Budget-free robustness: per-sample budgets in pgd/apgd, the per-sample minimal budget by bisection (closed form on
a linear model, where it also predicts the measured accuracy at every budget), and the normalised area of a curve."""
import math

import pytest
import torch
import torch.nn as nn

import common
from common import apgd, curve_area, minimal_eps, pgd


def linear_two_class(seed=0, n=64, d=20):
    torch.manual_seed(seed)
    lin = nn.Linear(d, 2).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randint(0, 2, (n,))
    w, b = lin.weight.detach(), lin.bias.detach()
    v = w[y] - w[1 - y]
    margin = (x * v).sum(1) + b[y] - b[1 - y]  # > 0 where classified correctly
    return lin, x, y, v, margin


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_minimal_eps_is_the_distance_to_the_decision_boundary_of_a_linear_model(norm):
    """Two classes, no box: the smallest linf (l2) perturbation that flips a correct sample is margin / ||v||_1
    (margin / ||v||_2), v = w_y - w_other, and PGD finds it at every budget above it (the first sign step already
    reaches the corner; l2 steps go straight along v). The bisection returns it within hi / 2^iters, above it;
    misclassified samples get 0 and samples beyond hi get inf."""
    lin, x, y, v, margin = linear_two_class()
    true = margin / (v.abs().sum(1) if norm == "linf" else v.norm(dim=1))
    hi, iters = float(true.quantile(0.8)), 10

    def attack(xb, yb, eps):
        return pgd(lin, xb, yb, eps, steps=10, norm=norm, clip=None)

    got = minimal_eps(lin, x, y, attack, hi, iters=iters, batch_size=25)
    wrong, beyond = true <= 0, true >= hi
    assert (got[wrong] == 0).all() and torch.isinf(got[beyond & ~wrong]).all()
    inside = ~wrong & ~beyond
    assert inside.sum() >= 20
    assert ((got[inside] >= true[inside]) & (got[inside] <= true[inside] + hi / 2 ** iters + 1e-12)).all()
    # accuracy under PGD at a budget = the share of samples whose distance exceeds it
    for e in (0.0, hi / 4, hi / 2, hi):
        assert common.accuracy(lin, attack(x, y, e), y) == float((true > e).double().mean())


def test_median_minimal_eps_counts_unbroken_samples_at_the_range_end():
    lin, x, y, v, margin = linear_two_class()
    true = margin / v.norm(dim=1)
    x, y, true = x[true > 0], y[true > 0], true[true > 0]  # correctly classified samples only
    attack = lambda xb, yb, eps: pgd(lin, xb, yb, eps, steps=10, norm="l2", clip=None)
    for q in (0.3, 0.7):  # the range's end below and above the median distance
        hi = float(true.quantile(q))
        d = minimal_eps(lin, x, y, attack, hi, iters=10)
        med, censored = common.median_minimal_eps(lin, x, y, attack, hi, iters=10)
        assert censored == float(torch.isinf(d).double().mean()) == pytest.approx(float((true >= hi).double().mean()))
        assert med == float(torch.where(torch.isinf(d), hi, d).median())
        assert (med == hi) == (censored > 0.5)  # the median is the range's end exactly when over half are censored


@pytest.mark.parametrize("attack", ["pgd", "apgd"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_sample_budgets_equal_one_budget_per_call(attack, norm):
    model = common.make_model("vgg8", num_classes=10, norm="bn", width=1 / 16)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.03, 0.05, 0.1]) * (1 if norm == "linf" else 20)
    delta0 = 0.5 * common._apgd_start(x, 1.0, norm, g) * eps.view(-1, 1, 1, 1)  # (apgd: the same start)
    run = (lambda xb, yb, e, d: pgd(model, xb, yb, e, steps=5, norm=norm)) if attack == "pgd" else \
        (lambda xb, yb, e, d: apgd(model, xb, yb, e, steps=5, norm=norm, delta0=d))
    together = run(x, y, eps, delta0)
    alone = torch.cat([run(x[i:i + 1], y[i:i + 1], float(eps[i]), delta0[i:i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)
    size = (together - x).flatten(1).abs().amax(1) if norm == "linf" else (together - x).flatten(1).norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-7).all()


def test_budgets_are_checked():
    lin, x, y, _, _ = linear_two_class()
    with pytest.raises(ValueError, match="tensor of budgets"):
        pgd(lin, x, y, torch.full((3,), 0.1, dtype=torch.float64), steps=2, clip=None)
    with pytest.raises(ValueError, match="tensor of budgets"):
        pgd(lin, x, y, torch.full((len(x),), -0.1, dtype=torch.float64), steps=2, clip=None)
    with pytest.raises(ValueError, match="hi="):
        minimal_eps(lin, x, y, lambda a, b, e: a, hi=math.inf)


def test_curve_area_closed_forms():
    assert curve_area([0, 1, 2], [1, 1, 1]) == 1.0
    assert curve_area([0, 0.5, 1.0], [1.0, 0.5, 0.0]) == 0.5
    assert curve_area([0.0, 1.0, 3.0], [1.0, 0.0, 0.0]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="increasing"):
        curve_area([0, 0], [1, 1])


def test_the_worst_case_of_several_attacks_fools_a_sample_if_any_of_them_does():
    """run_attack kind 'worst' (--attacks strong): per sample the first adversarial input any attack finds, so its
    accuracy is the share of samples that every attack leaves correct, and never above any one attack's."""
    lin, x, y, _, margin = linear_two_class(seed=1)
    half = (torch.arange(len(x)) < len(x) // 2).double()  # per-sample budgets: each attack reaches one half only
    specs = [dict(kind="pgd", norm="linf", eps=0.1 * half, steps=5, clip=None),
             dict(kind="pgd", norm="l2", eps=0.5 * (1 - half), steps=5, clip=None)]
    wrong = lambda xa: lin(xa).argmax(1) != y
    each = [wrong(common.run_attack(lin, x, y, s)) for s in specs]
    worst = common.run_attack(lin, x, y, dict(kind="worst", attacks=specs))
    assert torch.equal(wrong(worst), each[0] | each[1]) and not torch.equal(each[0], each[1])
    fooled_first = each[0] & wrong(worst)
    assert torch.equal(worst[fooled_first], common.run_attack(lin, x, y, specs[0])[fooled_first])  # the first wins
