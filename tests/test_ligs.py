"""LIGS (P1 Eq. 1, App. B.4) and its regularizer: closed forms, invariants, an independent reference."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import PERTURBATIONS, ce_input_grad, ligs, ligs_penalty, ligs_per_sample, make_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


def bn_cnn(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = make_model("resnet18", norm="bn", width=1 / 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        for _ in range(3):
            model(torch.rand(16, 3, 16, 16, generator=gen(9), dtype=dtype))
    return model


def reference_ligs(model, x, y, nu):
    """Slow, independent LIGS: float64 copy of the model, one sample at a time, the standard
    autograd cross-entropy gradient and an explicit cosine."""
    model = copy.deepcopy(model).double().eval()
    out = []
    for xi, yi, ni in zip(x.double(), y, nu.double()):
        grads = []
        for inp in (xi, xi + ni):
            inp = inp[None].clone().requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(inp), yi[None]), inp)
            grads.append(g.flatten())
        out.append(torch.dot(grads[0], grads[1]) / (grads[0].norm() * grads[1].norm()))
    return torch.stack(out)


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_two_class_linear_softmax_gives_exactly_one(perturbation):
    # grad_x CE = (p_y - 1) (w_y - w_other): a fixed direction for every x, so every cosine is 1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.rand(20, 3, 2, 2, generator=gen(1)), torch.arange(20) % 2
    value, skipped = ligs(model, x, y, perturbation=perturbation, sigma=0.05, generator=gen(2))
    assert skipped == 0 and abs(value - 1.0) < 1e-6


def test_values_in_range_and_match_a_slow_float64_reference():
    model = bn_cnn()
    x, y = torch.rand(12, 3, 16, 16, generator=gen(1)), torch.arange(12) % 10
    sigma = 0.05
    cos = ligs_per_sample(model, x, y, sigma=sigma, generator=gen(3))
    assert cos.shape == (1, 12) and torch.isfinite(cos).all() and (cos.abs() <= 1).all()
    nu = sigma * torch.randn(x.shape, generator=gen(3))  # the same draw as ligs_per_sample's
    ref = reference_ligs(model, x, y, nu)
    torch.testing.assert_close(cos[0], ref, atol=2e-4, rtol=0)
    assert cos.std() > 1e-3  # a non-trivial check: the samples differ


def test_seeded_noise_is_reproducible_and_draws_average():
    model = bn_cnn()
    x, y = torch.rand(8, 3, 16, 16, generator=gen(1)), torch.arange(8)
    a = ligs(model, x, y, sigma=0.05, generator=gen(5))
    b = ligs(model, x, y, sigma=0.05, generator=gen(5))
    c = ligs(model, x, y, sigma=0.05, generator=gen(6))
    assert a == b and a != c
    per = ligs_per_sample(model, x, y, sigma=0.05, draws=3, generator=gen(5))
    assert per.shape == (3, 8)
    torch.testing.assert_close(per[0], ligs_per_sample(model, x, y, sigma=0.05, generator=gen(5))[0])
    value, skipped = ligs(model, x, y, sigma=0.05, draws=3, generator=gen(5))
    assert skipped == 0 and abs(value - per.mean().item()) < 1e-12


def test_eval_mode_value_does_not_depend_on_batch_composition():
    model = bn_cnn().train()  # ligs must switch to eval mode itself, and restore train mode
    x, y = torch.rand(10, 3, 16, 16, generator=gen(1)), torch.arange(10)
    big = ligs_per_sample(model, x, y, sigma=0.05, generator=gen(4), batch_size=10)
    small = ligs_per_sample(model, x, y, sigma=0.05, generator=gen(4), batch_size=3)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)
    assert model.training
    for p in ("fgsm", "pgd"):  # deterministic perturbations: one sample alone vs inside the batch
        alone = ligs_per_sample(model, x[4:5], y[4:5], perturbation=p, sigma=0.05)
        inside = ligs_per_sample(model, x, y, perturbation=p, sigma=0.05)
        torch.testing.assert_close(alone[0, 0], inside[0, 4], atol=1e-5, rtol=0)


def test_ligs_leaves_bn_statistics_and_grads_untouched():
    model = bn_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(6, 3, 16, 16, generator=gen(1)), torch.arange(6)
    for p in PERTURBATIONS:
        ligs(model, x, y, perturbation=p, generator=gen(0))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_zero_gradients_are_skipped_and_counted():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    nn.init.zeros_(model[1].weight)  # constant logits: every input gradient is exactly zero
    x, y = torch.rand(5, 3, 2, 2), torch.arange(5) % 3
    value, skipped = ligs(model, x, y, generator=gen(0))
    assert skipped == 5 and value != value  # NaN when nothing is left to average
    penalty, logits = ligs_penalty(model, x, y, generator=gen(0))
    assert torch.isfinite(penalty) and logits.shape == (5, 3)


def test_saturated_softmax_gradient_keeps_its_direction():
    # Margins of ~20-30 make p_y round to 1 in float32 (but not in float64), so the usual autograd
    # CE gradient loses its -sum_{j!=y} p_j * grad z_y term; the residual -sum p_j keeps it.
    lin = nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 8, generator=gen(0)))
        lin.bias.copy_(torch.tensor([25.0, 0.0, 0.0]))
    x = 0.3 * torch.randn(6, 8, generator=gen(1))
    y = torch.zeros(6, dtype=torch.long)
    assert (lin(x).softmax(1)[:, 0] == 1).all()  # the float32 softmax saturates for every sample
    lin64 = copy.deepcopy(lin).double()
    x64 = x.double().requires_grad_(True)
    g64, = torch.autograd.grad(F.cross_entropy(lin64(x64), y, reduction="sum"), x64)
    cos = lambda a: F.cosine_similarity(a.double(), g64, dim=1, eps=0)
    g = ce_input_grad(lin, x, y)
    assert (cos(g) > 1 - 1e-6).all()
    assert ((g.double() - g64).norm(dim=1) / g64.norm(dim=1) < 1e-3).all()  # float32 logits near 25
    x32 = x.clone().requires_grad_(True)
    naive, = torch.autograd.grad(F.cross_entropy(lin(x32), y, reduction="sum"), x32)
    assert (cos(naive) < 0.99).all()  # the failure mode this avoids: a wrong direction, silently


def test_penalty_survives_tiny_float32_gradients():
    # gradients ~1e-23: their float32 squared norms underflow; the penalty must still see them
    lin = nn.Linear(8, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 8, generator=gen(0)))
        lin.bias.copy_(torch.tensor([55.0, 0.0, 0.0]))
    x, y = 0.3 * torch.randn(6, 8, generator=gen(1)), torch.zeros(6, dtype=torch.long)
    assert (ce_input_grad(lin, x, y).norm(dim=1) == 0).all() and (ce_input_grad(lin, x, y) != 0).any()
    penalty, _ = ligs_penalty(lin, x, y, sigma=0.01, generator=gen(2))
    value, skipped = ligs(lin, x, y, sigma=0.01, generator=gen(2))
    assert skipped == 0 and abs(penalty.item() - (1 - value)) < 1e-5


def test_penalty_matches_standard_double_backprop_formulation():
    torch.manual_seed(0)
    model = make_model("mlp", norm="none", in_dim=10, hidden=[16, 16], num_classes=4).double()
    x, y = torch.rand(7, 10, generator=gen(1), dtype=torch.float64), torch.arange(7) % 4
    penalty, logits = ligs_penalty(model, x, y, sigma=0.1, generator=gen(2))
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    # reference: plain autograd of the summed CE with create_graph, and the same noise draw
    nu = 0.1 * torch.randn(x.shape, generator=gen(2), dtype=torch.float64)
    gs = []
    for inp in (x, x + nu):
        inp = inp.clone().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(inp), y, reduction="sum"), inp, create_graph=True)
        gs.append(g)
    ref = (1 - F.cosine_similarity(gs[0], gs[1], dim=1)).mean()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(penalty, ref)
    torch.testing.assert_close(logits, model(x))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    assert sum(a.abs().sum() for a in grads) > 0


def test_minimizing_the_penalty_raises_ligs():
    torch.manual_seed(0)
    model = make_model("mlp", norm="bn", in_dim=10, hidden=[32, 32], num_classes=4)
    x, y = torch.randn(64, 10, generator=gen(1)), torch.arange(64) % 4
    before, _ = ligs(model, x, y, sigma=0.5, generator=gen(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(30):
        opt.zero_grad()
        penalty, _ = ligs_penalty(model, x, y, sigma=0.5, generator=gen(100 + step))
        penalty.backward()
        opt.step()
    after, _ = ligs(model, x, y, sigma=0.5, generator=gen(3))
    assert after > before + 0.05


def test_bad_arguments():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.rand(2, 4), torch.arange(2)
    with pytest.raises(ValueError, match="perturbation='laplace'"):
        ligs(model, x, y, perturbation="laplace")
    with pytest.raises(ValueError, match="sigma=0"):
        ligs(model, x, y, sigma=0)
