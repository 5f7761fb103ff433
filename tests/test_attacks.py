"""Attacks (P1 App. B.2, P2 Sec. 3): closed forms on linear models, ball/box invariants, and side-effect freedom."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import accuracy, attack_objective, bim, cw_loss, cw_margin, fgsm, make_model, pgd, pgd_random_starts

INF_BOX = (-1e9, 1e9)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def binary_linear(d, seed=0, dtype=torch.float64):
    """Two logits z = W x on flattened inputs: the margin z_y - z_o is linear with w = W_y - W_o."""
    lin = nn.Linear(d, 2, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, d, generator=gen(seed), dtype=dtype))
    return nn.Sequential(nn.Flatten(), lin)


def margin_and_w(model, x, y):
    W = model[1].weight
    z = model(x)
    other = 1 - y
    m = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, other[:, None]).squeeze(1)
    return m, W[y] - W[other]


def small_cnn(norm="bn", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = make_model("vgg8", norm=norm, width=1 / 16, gn_groups=2).to(dtype)
    with torch.no_grad():  # make BN running statistics non-trivial so that eval vs train mode differs
        model.train()
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32, generator=gen(1), dtype=dtype))
    return model


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained to ~100% train accuracy on a 20-d 4-class Gaussian-mixture problem."""
    g = gen(0)
    centers = torch.randn(4, 20, generator=g) * 1.5
    y = torch.arange(600) % 4
    x = centers[y] + torch.randn(600, 20, generator=g)
    torch.manual_seed(0)
    model = make_model("mlp", norm="bn", in_dim=20, hidden=[64, 64], num_classes=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert accuracy(model, x, y) > 0.9
    return model, x[:300], y[:300]


# ---------------------------------------------------------------- closed forms (linear model)

@pytest.mark.parametrize("shape", [(16,), (3, 4, 4)])
def test_fgsm_lowers_linear_margin_by_eps_times_l1_norm(shape):
    d = torch.Size(shape).numel()
    model = binary_linear(d)
    x = torch.randn(8, *shape, generator=gen(1), dtype=torch.float64)
    y = torch.arange(8) % 2
    eps = 0.03
    m0, w = margin_and_w(model, x, y)
    m1, _ = margin_and_w(model, fgsm(model, x, y, eps, clip=INF_BOX), y)
    torch.testing.assert_close(m0 - m1, eps * w.abs().sum(1))


@pytest.mark.parametrize("shape", [(16,), (3, 4, 4)])
def test_one_l2_step_of_size_eps_lowers_margin_by_eps_times_l2_norm(shape):
    d = torch.Size(shape).numel()
    model = binary_linear(d, seed=2)
    x = torch.randn(8, *shape, generator=gen(3), dtype=torch.float64)
    y = torch.arange(8) % 2
    eps = 0.5
    m0, w = margin_and_w(model, x, y)
    xa = pgd(model, x, y, eps, steps=1, step_size=eps, norm="l2", clip=INF_BOX)
    m1, _ = margin_and_w(model, xa, y)
    torch.testing.assert_close(m0 - m1, eps * w.norm(dim=1))
    torch.testing.assert_close((xa - x).flatten(1).norm(dim=1), torch.full((8,), eps, dtype=torch.float64))


def test_l2_pgd_on_linear_model_lands_on_the_ball_along_minus_w():
    # With a constant gradient direction, several steps overshoot and the projection must bring
    # delta back to exactly eps * (-w/|w|): checks step -> project -> clip in that order.
    model = binary_linear(10, seed=4)
    x = torch.randn(6, 10, generator=gen(5), dtype=torch.float64)
    y = torch.arange(6) % 2
    _, w = margin_and_w(model, x, y)
    xa = pgd(model, x, y, eps=0.3, steps=5, step_size=0.2, norm="l2", clip=INF_BOX)
    torch.testing.assert_close(xa - x, -0.3 * w / w.norm(dim=1, keepdim=True))
    # One overshooting step with a binding box: project onto the ball first, then clip
    # (clipping first and projecting after would give a different point).
    xin = (x * 0.02).clamp(-0.05, 0.05)
    xb = pgd(model, xin, y, eps=0.3, steps=1, step_size=0.5, norm="l2", clip=(-0.05, 0.05))
    want = (xin - 0.3 * w / w.norm(dim=1, keepdim=True)).clamp(-0.05, 0.05)
    torch.testing.assert_close(xb, want)
    wrong_order = xin + _project(((xin - 0.5 * w / w.norm(dim=1, keepdim=True)).clamp(-0.05, 0.05) - xin), 0.3)
    assert not torch.allclose(want, wrong_order)


def _project(delta, eps):
    return delta * (eps / delta.norm(dim=1, keepdim=True)).clamp(max=1)


def test_fgsm_closed_form_holds_when_the_float32_softmax_saturates():
    # margins ~30: p_y rounds to 1 in float32, so autograd of CE would return grad = p_o * w_o
    # (direction sign(w_o), not sign(w_o - w_y)); the attack must still take the exact step.
    model = binary_linear(16, seed=6, dtype=torch.float32)
    x = torch.randn(8, 16, generator=gen(7))
    y = torch.arange(8) % 2
    biased = nn.Sequential(model, _AddToLabel(y, 30.0))
    assert (biased(x).softmax(1).gather(1, y[:, None]) == 1).all()
    m0, w = margin_and_w(model, x, y)
    eps = 0.01
    m1, _ = margin_and_w(model, fgsm(biased, x, y, eps, clip=INF_BOX), y)
    torch.testing.assert_close(m0 - m1, eps * w.abs().sum(1), rtol=1e-4, atol=1e-4)


class _AddToLabel(nn.Module):
    """Adds `shift` to the logit of each sample's own label (a saturating but linear head)."""

    def __init__(self, y, shift):
        super().__init__()
        self.onehot = F.one_hot(y, 2).float() * shift

    def forward(self, z):
        return z + self.onehot[: len(z)]


def test_l2_step_is_exact_for_gradients_whose_squared_norm_underflows():
    model = binary_linear(16, seed=8, dtype=torch.float32)
    with torch.no_grad():
        model[1].weight.mul_(1e-25)  # input gradients ~1e-25: their float32 squares underflow to 0
    x = torch.randn(4, 16, generator=gen(9))
    y = torch.arange(4) % 2
    xa = pgd(model, x, y, eps=0.5, steps=1, step_size=0.2, norm="l2", clip=INF_BOX)
    torch.testing.assert_close((xa - x).norm(dim=1), torch.full((4,), 0.2), rtol=1e-5, atol=0)


def pgd_start(model, x, y, eps, rand_init=False, generator=None, **kw):
    """pgd from x itself, or from a random start (pgd_random_starts)."""
    return pgd_random_starts(model, x, y, eps, generator=generator, **kw) if rand_init else pgd(model, x, y, eps, **kw)


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("rand_init", [False, True])
def test_result_inside_ball_and_box(norm, loss, targeted, rand_init):
    model = small_cnn()
    x = torch.rand(6, 3, 32, 32, generator=gen(2))
    y = torch.arange(6) % 10
    eps = 8 / 255 if norm == "linf" else 0.5
    xa = pgd_start(model, x, y, eps, steps=4, norm=norm, loss=loss, targeted=targeted, rand_init=rand_init,
             generator=gen(3), step_size=eps)  # large steps so the projection binds
    delta = (xa - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all() and (size > 0.5 * eps).all()
    assert xa.min() >= 0 and xa.max() <= 1


def test_eps_zero_returns_x():
    model = small_cnn()
    x = torch.rand(4, 3, 32, 32, generator=gen(2))
    y = torch.arange(4)
    for norm in ("linf", "l2"):
        for rand_init in (False, True):
            xa = pgd_start(model, x, y, 0.0, steps=3, norm=norm, rand_init=rand_init, generator=gen(0))
            assert torch.equal(xa, x)
    assert torch.equal(fgsm(model, x, y, 0.0), x)


def test_no_side_effects_on_input_model_mode_bn_stats_and_grads():
    model = small_cnn()
    model.train()
    model.body[1].eval()  # a mixed mode must be restored as it was
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = torch.rand(4, 3, 32, 32, generator=gen(2))
    x_copy = x.clone()
    y = torch.arange(4)
    for norm, loss in [("linf", "ce"), ("l2", "cw")]:
        pgd_random_starts(model, x, y, 0.1, steps=3, norm=norm, loss=loss, restarts=2, generator=gen(0))
    fgsm(model, x, y, 0.1), bim(model, x, y, 0.1, 3, 0.01)
    assert torch.equal(x, x_copy)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # incl. BN running stats


def test_attack_runs_model_in_eval_mode():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(x)

    model = Spy().train()
    pgd_random_starts(model, torch.rand(4, 5), torch.arange(4) % 3, 0.1, steps=3, restarts=2)
    assert seen and not any(seen) and model.training


def test_one_sample_alone_equals_inside_a_batch():
    model = small_cnn(dtype=torch.float64)
    x = torch.rand(5, 3, 32, 32, generator=gen(2), dtype=torch.float64)
    y = torch.arange(5)
    for norm, loss in [("linf", "ce"), ("l2", "ce"), ("l2", "cw")]:
        batch = pgd(model, x, y, 0.05, steps=5, norm=norm, loss=loss)
        alone = pgd(model, x[3:4], y[3:4], 0.05, steps=5, norm=norm, loss=loss)
        torch.testing.assert_close(alone, batch[3:4])


def test_works_under_no_grad_callers():
    model = small_cnn()
    x = torch.rand(3, 3, 32, 32, generator=gen(2))
    y = torch.arange(3)
    ref = pgd(model, x, y, 0.05, steps=3, norm="l2")
    with torch.no_grad():
        got = pgd(model, x, y, 0.05, steps=3, norm="l2")
    assert torch.equal(got, ref) and not torch.equal(got, x)
    assert not got.requires_grad


def test_zero_gradients_never_produce_nan():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    nn.init.zeros_(model[1].weight)  # constant logits: the input gradient is exactly 0
    x = torch.rand(4, 3, 2, 2)
    y = torch.arange(4) % 3
    for norm in ("linf", "l2"):
        for loss in ("ce", "cw"):
            xa = pgd(model, x, y, 0.1, steps=3, norm=norm, loss=loss)
            assert torch.equal(xa, x)
        xr = pgd_start(model, x, y, 0.1, steps=3, norm=norm, rand_init=True, generator=gen(0))
        assert torch.isfinite(xr).all()


def test_more_pgd_steps_never_worse_than_fgsm(trained_mlp):
    model, x, y = trained_mlp
    for eps in (0.25, 0.5, 1.0):
        acc_fgsm = accuracy(model, fgsm(model, x, y, eps, clip=None), y)
        acc_pgd = accuracy(model, pgd(model, x, y, eps, steps=20, clip=None), y)
        acc_bim = accuracy(model, bim(model, x, y, eps, steps=20, step_size=eps / 10, clip=None), y)
        assert acc_pgd <= acc_fgsm and acc_bim <= acc_fgsm
    assert acc_pgd < acc_fgsm - 0.1  # at eps=1 the iterative attack is clearly stronger (measured 0.38 vs 0.57)
    # accuracy falls as eps grows
    accs = [accuracy(model, pgd(model, x, y, e, steps=10, clip=None), y) for e in (0.0, 0.25, 0.5, 1.0)]
    assert accs == sorted(accs, reverse=True) and accs[-1] < accs[0]


# ---------------------------------------------------------------- CW loss

def test_cw_margin_with_negative_logits():
    logits = torch.tensor([[-5.0, -1.0, -3.0], [-5.0, -1.0, -3.0], [-2.0, -7.0, -4.0]])
    y = torch.tensor([0, 1, 0])
    torch.testing.assert_close(cw_margin(logits, y), torch.tensor([-4.0, 2.0, 2.0]))
    # the one-hot-multiplication bug would compute max over [0, -1, -3] = 0 for the first row
    kappa = 3.0
    torch.testing.assert_close(cw_loss(logits, y, kappa), -torch.relu(torch.tensor([-4.0, 2.0, 2.0]) + kappa))
    assert (cw_loss(logits, y, kappa) <= 0).all()
    torch.testing.assert_close(attack_objective(logits, y, "cw", kappa), cw_loss(logits, y, kappa))
    # targeted: -ReLU(max_{j!=t} z_j - z_t + kappa)
    torch.testing.assert_close(attack_objective(logits, y, "cw", kappa, targeted=True),
                               -torch.relu(torch.tensor([4.0, -2.0, -2.0]) + kappa))


def test_cw_attack_pushes_margin_down(trained_mlp):
    model, x, y = trained_mlp
    model.eval()
    xa = pgd(model, x, y, 0.5, steps=10, loss="cw", clip=None)
    with torch.no_grad():
        assert cw_margin(model(xa), y).mean() < cw_margin(model(x), y).mean() - 1.0


def test_targeted_attack_lowers_ce_towards_target(trained_mlp):
    model, x, y = trained_mlp
    model.eval()
    t = (y + 1) % 4
    xa = pgd(model, x, t, 4.0, steps=20, norm="l2", targeted=True, clip=None)  # class centres are ~9 apart
    with torch.no_grad():
        assert F.cross_entropy(model(xa), t) < F.cross_entropy(model(x), t) - 1.0
        assert (model(xa).argmax(1) == t).float().mean() > (model(x).argmax(1) == t).float().mean()


# ---------------------------------------------------------------- restarts, random starts, defaults

def test_restarts_keep_the_per_sample_worst_case(trained_mlp):
    model, x, y = trained_mlp
    kw = dict(eps=0.5, steps=3, clip=None)
    combined = pgd_random_starts(model, x, y, restarts=4, generator=gen(7), **kw)
    g = gen(7)  # the same random stream, consumed restart by restart
    singles = [pgd_random_starts(model, x, y, restarts=1, generator=g, **kw) for _ in range(4)]
    model.eval()
    with torch.no_grad():
        obj = lambda xa: attack_objective(model(xa), y)
        succ = lambda xa: model(xa).argmax(1) != y
        best_obj = torch.stack([obj(s) for s in singles]).amax(0)
        any_succ = torch.stack([succ(s) for s in singles]).any(0)
        assert torch.equal(succ(combined), any_succ)
        for i in range(len(y)):
            if not any_succ[i]:  # no restart succeeded: the largest objective wins
                torch.testing.assert_close(obj(combined)[i], best_obj[i])
        assert all(any(torch.equal(combined[i], s[i]) for s in singles) for i in range(len(y)))
        mixed = any_succ & ~torch.stack([succ(s) for s in singles]).all(0)
        assert mixed.any()  # the case that matters: some restarts succeed, others do not


def test_random_start_is_seeded_and_inside_the_ball():
    model = small_cnn()
    x = torch.rand(64, 3, 32, 32, generator=gen(2))
    y = torch.arange(64) % 10
    for norm, eps in [("linf", 0.03), ("l2", 0.5)]:
        # a negligible step returns (almost) the projected random start itself; step_size=0 is refused
        s1 = pgd_start(model, x, y, eps, steps=1, step_size=1e-12, norm=norm, rand_init=True, generator=gen(5), clip=None)
        s2 = pgd_start(model, x, y, eps, steps=1, step_size=1e-12, norm=norm, rand_init=True, generator=gen(5), clip=None)
        s3 = pgd_start(model, x, y, eps, steps=1, step_size=1e-12, norm=norm, rand_init=True, generator=gen(6), clip=None)
        assert torch.equal(s1, s2) and not torch.equal(s1, s3)
        d = (s1 - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (size <= eps * (1 + 1e-5)).all() and (size > 0.9 * eps).all()  # in high d the ball's mass is at its surface


def test_default_step_size_and_wrappers():
    model = small_cnn()
    x = torch.rand(3, 3, 32, 32, generator=gen(2))
    y = torch.arange(3)
    torch.testing.assert_close(pgd(model, x, y, 0.1, steps=4, norm="l2"),
                               pgd(model, x, y, 0.1, steps=4, step_size=2.5 * 0.1 / 4, norm="l2"))
    assert torch.equal(fgsm(model, x, y, 0.03), pgd(model, x, y, 0.03, steps=1, step_size=0.03))
    assert torch.equal(bim(model, x, y, 0.03, 5, 0.01), pgd(model, x, y, 0.03, steps=5, step_size=0.01))
    with torch.no_grad():  # fgsm is exactly x + eps * sign(grad) before clipping
        model.eval()
        xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    torch.testing.assert_close(fgsm(model, x, y, 0.03, clip=None), x + 0.03 * g.sign())


def test_bad_arguments_give_one_clear_line():
    model = small_cnn()
    x, y = torch.rand(2, 3, 32, 32), torch.arange(2)
    for kwargs, msg in [(dict(norm="l3"), "attack norm='l3'"), (dict(loss="mse"), "attack loss='mse'"),
                        (dict(eps=-0.1), "eps=-0.1"), (dict(steps=0), "steps=0")]:
        args = dict(eps=0.1, steps=2) | kwargs
        with pytest.raises(ValueError, match=msg):
            pgd(model, x, y, **args)
    with pytest.raises(ValueError, match="labels y of shape"):
        pgd(model, x, torch.arange(3), 0.1, 2)
    with pytest.raises(ValueError, match="int64 labels"):
        pgd(model, x, torch.zeros(2), 0.1, 2)
    with pytest.raises(ValueError, match="restarts=0"):
        pgd_random_starts(model, x, y, 0.1, 2, restarts=0)
    with pytest.raises(ValueError, match="grad0 is the clean CE gradient"):  # the shared gradient is CE's, from x itself
        pgd(model, x, y, 0.1, 2, loss="cw", grad0=torch.zeros_like(x))
