"""APGD-CE and APGD-DLR (Croce & Hein 2020): the DLR loss's closed form and invariances, the checkpoint schedule of
the paper, the ball and the box, the closed-form optimum on a linear model, the call guarantees of every attack, and
equality with torchattacks' independent implementation given the same start."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import apgd, dlr_loss, pgd


def test_dlr_loss_closed_form_and_invariances():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0], [3.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    # y = 0: -(3 - 1) / (3 - 0.5); y = 1: -(1 - 3) / (3 - 0.5); equal logits: 0 (the 1e-12 keeps it finite)
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-0.8, 0.8, 0.0]))
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(50, 10, generator=g, dtype=torch.float64), torch.randint(0, 10, (50,), generator=g)
    assert torch.allclose(dlr_loss(3.7 * z - 11.0, y), dlr_loss(z, y))  # shift and scale invariant
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_loss(z[:, :2], y % 2)


def test_apgd_checkpoints_follow_the_paper():
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): 100 iterations check after iterations
    22, 41, 57, 70, 80, 87, 93, 99 (1-based), each over the window since the last check."""
    windows = common._apgd_windows(100)
    assert [i + 1 for i, _ in windows] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert [k for _, k in windows] == [22, 19, 16, 13, 10, 7, 6, 6]
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert [i + 1 for i, _ in windows] == [math.ceil(round(v * 100, 6)) for v in p[1:]]
    assert common._apgd_windows(1) == [(0, 1)] and common._apgd_windows(10)[0] == (1, 2)


def small_cnn(seed=0, norm="bn"):
    torch.manual_seed(seed)
    return common.make_model("vgg8", num_classes=10, norm=norm, width=1 / 16)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_stays_in_the_ball_and_the_box(norm, loss):
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    eps = 8 / 255 if norm == "linf" else 0.5
    xa = apgd(model, x, y, eps, steps=10, norm=norm, loss=loss, generator=g)
    d = (xa - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all() and xa.min() >= 0 and xa.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_reaches_the_closed_form_optimum_on_a_linear_model(norm):
    """Two classes, f(x) = W x + b, no box: CE is monotone in the margin (w_y - w_o) . x, so the worst case in the
    ball is x - eps sign(w_y - w_o) (linf) or x - eps (w_y - w_o) / ||w_y - w_o||_2 (l2)."""
    torch.manual_seed(0)
    lin = nn.Linear(20, 2).double()
    x = torch.randn(64, 20, dtype=torch.float64)
    y = torch.randint(0, 2, (64,))
    w = lin.weight.detach()
    v = w[y] - w[1 - y]
    eps = 0.3
    best = x - eps * (v.sign() if norm == "linf" else v / v.norm(dim=1, keepdim=True))
    xa = apgd(lin, x, y, eps, steps=50, norm=norm, clip=None, generator=torch.Generator().manual_seed(0))
    ce = lambda t: F.cross_entropy(lin(t), y, reduction="none")
    tol = 1e-9 if norm == "linf" else 1e-4  # a sign step from the boundary lands on the corner; l2 converges
    assert torch.allclose(ce(xa), ce(best), rtol=tol, atol=tol), (ce(best) - ce(xa)).abs().max()


def test_apgd_keeps_the_attack_guarantees():
    """Eval mode restored (also when mixed), no parameter .grad, BN statistics untouched, x unchanged, works under
    torch.no_grad(), and the same generator state gives the same result."""
    model = small_cnn()
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    x_copy = x.clone()
    with torch.no_grad():
        a = apgd(model, x, y, 0.03, steps=5, loss="dlr", restarts=2, generator=torch.Generator().manual_seed(3))
    b = apgd(model, x, y, 0.03, steps=5, loss="dlr", restarts=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not a.requires_grad
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(x, x_copy)


def trained_digits_mlp():
    """An MLP trained on the UCI digits (real data bundled with the project), 10 classes for the DLR loss."""
    d = common.load_digits()
    x, y = d["x_train"].flatten(1), d["y_train"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = d["x_test"].flatten(1)[:120], d["y_test"][:120]
    keep = model(xt).argmax(1) == yt  # torchattacks attacks the correctly classified ones only
    return model, xt[keep], yt[keep]


def plain_arithmetic(monkeypatch):
    """Swap in the authors' (and torchattacks') arithmetic: CE gradients by autograd, l2 directions g / (||g|| + 1e-12)."""
    def objective_and_grad(model, xa, y, loss):
        xa = xa.detach().requires_grad_(True)
        logits = model(xa)
        obj = F.cross_entropy(logits, y, reduction="none") if loss == "ce" else dlr_loss(logits, y)
        g, = torch.autograd.grad(obj.sum(), xa)
        return logits.detach(), obj.detach(), g
    monkeypatch.setattr(common, "_objective_and_grad", objective_and_grad)
    monkeypatch.setattr(common, "_unit_l2", lambda g: g / common._bview(common._l2(g) + 1e-12, g))


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_equals_torchattacks_given_the_same_start(norm, eps, loss, monkeypatch):
    """torchattacks' APGD (an independent port of the authors' code) from the same random start, 30 steps, on an MLP
    trained on the digits: the same robust accuracy (within one sample), and the same adversarial inputs -- exactly
    (1e-5) for >= 95 % of the broken samples when the gradient arithmetic is theirs too, which checks every rule of
    the algorithm (momentum, checkpoints, halving, resets, the first window's comparison with 0); and within 1e-3 for
    >= 90 % with ours, whose CE gradient avoids softmax cancellation and whose l2 direction avoids underflow (last-bit
    differences that l2 steps carry forward)."""
    import torchattacks
    model, x, y = trained_digits_mlp()
    x4, n = x.view(-1, 1, 8, 8), len(x)
    wrapped = nn.Sequential(nn.Flatten(), model).eval()
    theirs = torchattacks.APGD(wrapped, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, steps=30, loss=loss,
                               seed=0)(x4, y)
    torch.manual_seed(0)  # their start, drawn as they draw it
    t = 2 * torch.rand(x4.shape) - 1 if norm == "linf" else torch.randn(x4.shape)
    size = t.flatten(1).abs().amax(1) if norm == "linf" else (t ** 2).sum((1, 2, 3)).sqrt() + 1e-12
    start = eps * t / size.view(-1, 1, 1, 1)
    acc = lambda a: float((wrapped(a).argmax(1) == y).float().mean())
    fooled = wrapped(theirs).argmax(1) != y  # (they return x itself where the attack failed)
    gap = lambda a: (a - theirs).flatten(1).abs().amax(1)[fooled]
    ours = apgd(wrapped, x4, y, eps, steps=30, norm=norm, loss=loss, delta0=start)
    assert abs(acc(ours) - acc(theirs)) <= 1 / n + 1e-9, (acc(ours), acc(theirs))
    assert (gap(ours) < 1e-3).float().mean() >= 0.9
    assert acc(ours) < acc(x4) - 0.3  # the attack does something at these budgets
    plain_arithmetic(monkeypatch)
    same = apgd(wrapped, x4, y, eps, steps=30, norm=norm, loss=loss, delta0=start)
    assert (gap(same) < 1e-5).float().mean() >= 0.95 and acc(same) == acc(theirs)


def test_apgd_is_at_least_as_strong_as_pgd_and_restarts_only_add():
    model, x, y = trained_digits_mlp()
    acc = lambda a: float((model(a).argmax(1) == y).float().mean())
    eps = 0.08
    a_pgd = acc(pgd(model, x, y, eps, steps=20, norm="linf", clip=(0, 1)))
    one = apgd(model, x, y, eps, steps=20, generator=torch.Generator().manual_seed(0))
    three = apgd(model, x, y, eps, steps=20, restarts=3, generator=torch.Generator().manual_seed(0))
    assert acc(one) <= a_pgd + 1 / len(y) and acc(three) <= acc(one)
    assert torch.equal((model(three).argmax(1) != y) | (model(one).argmax(1) == y), torch.ones(len(y), dtype=torch.bool))
