"""The paper presets are the papers (and, where a paper is silent, the authors' code): each test reads what a
script's paper preset resolves to, or builds what it builds, and checks it against the paper or the code it
follows (DECISIONS.md says which, and why where the project departs)."""
import importlib

import pytest
import torch

import common


def paper(script, artifact, *extra):
    mod = importlib.import_module(script)
    return mod, mod.get_args(["--preset", "paper", "--artifact", artifact, *extra])


@pytest.mark.parametrize("script, artifacts", [("exp_ligs_trend", ["fig2", "fig4", "fig5", "fig8"]),
                                               ("exp_landscape", ["fig9", "fig14", "fig15", "fig16", "fig17"])])
def test_p1_sec4_runs_use_the_authors_lr(script, artifacts):
    """P1 Sec. 4 (Figs 2, 4, 5, 8, 9, 14-17): the authors' train_models.sh trains at --learning-rate 0.1, 150 epochs,
    /10 at 50 and 100 (DECISIONS.md D14)."""
    for art in artifacts:
        _, args = paper(script, art)
        assert (args.lr, args.epochs, list(args.milestones)) == (0.1, 150, [50, 100]), art


def test_fig17_compares_fixup_and_bn_on_resnet20_and_resnet56():
    """P1 Fig 17's caption: "Comparison of BN and FixupIni on Resnet20 (top) and ResNet56 (bottom)"; Fig 9's
    Fixup-vs-BN panel is ResNet-20 only."""
    mod, args = paper("exp_landscape", "fig17")
    assert {(arch, norm) for _, arch, norm, _ in mod.models(args)} == {
        (a, n) for a in ("resnet20", "resnet56") for n in ("bn", "fixup")}
    mod, args = paper("exp_landscape", "fig9")
    assert {arch for _, arch, norm, _ in mod.models(args) if norm == "fixup"} == {"resnet20"}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20", "wrn16_2"])
def test_resnets_have_no_conv_biases_with_any_norm(arch):
    """P1's MadryLab ResNet replaces BN by the identity and keeps bias=False; P2's Fixup code has bias-free convs
    (DECISIONS.md D10). VGGs keep a bias exactly where there is no norm."""
    for norm in ("none", "bn", "gn"):
        m = common.make_model(arch, norm=norm, width=0.25 if arch.startswith("resnet") else 1.0)
        assert all(c.bias is None for c in m.modules() if isinstance(c, torch.nn.Conv2d)), (arch, norm)
    vgg = lambda n: [c.bias is not None for c in common.make_model("vgg11", norm=n, width=0.25).modules()
                     if isinstance(c, torch.nn.Conv2d)]
    assert all(vgg("none")) and not any(vgg("bn"))


def test_fake_relu_inversion_passes_gradient_through_the_last_relu():
    """Ilyas et al.'s and P1's authors' inversion goes through `fake_relu` (forward ReLU, backward identity): the
    features are the same, and units the last ReLU zeroes still pass a gradient."""
    torch.manual_seed(0)
    m = common.make_model("resnet18", norm="bn", width=0.125).eval()
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    real, fake = m.features(x), m.features(x, fake_relu=True)
    assert torch.equal(real, fake)
    g_real, = torch.autograd.grad(real.sum(), x)
    g_fake, = torch.autograd.grad(m.features(x, fake_relu=True).sum(), x)
    assert not torch.allclose(g_real, g_fake)
    _, args = paper("exp_feature_datasets", "build")
    assert args.inv_relu == "fake"
    with pytest.raises(ValueError, match="fake_relu"):
        common.invert_features(common.make_model("vgg11", width=0.25), x, x, 1, 0.1, fake_relu=True)


def test_feature_dataset_training_uses_the_robustness_augmentation():
    """The authors train on D_R, D_NR, D_rand with the robustness library's default augmentation: crop+flip,
    ColorJitter(.25, .25, .25), RandomRotation(2); D_det and D_conflict without augmentation."""
    mod, args = paper("exp_feature_datasets", "fig6")
    assert args.augment == "robustness"
    assert {k for k, v in mod.TABLE6.items() if v["augment"]} == {"d_r", "d_nr", "d_rand"}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    d = common.augment_draws(g, [64], "cpu", jitter=True)[0]
    assert d.shape == (10, 64)
    assert ((d[3:6] >= 0.75) & (d[3:6] <= 1.25)).all() and (d[9].abs() <= 2).all()
    ident = d.clone()
    ident[3:6], ident[9] = 1.0, 0.0
    assert torch.equal(common.jitter_rotate(x, ident), x)  # unit factors, no rotation: unchanged
    y = common.jitter_rotate(x, d)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    bright = ident.clone()
    bright[3] = 0.8  # brightness alone scales the image
    assert torch.allclose(common.jitter_rotate(x, bright), (0.8 * x).clamp(0, 1))


def test_spheres_follow_the_authors_code():
    """P2 App. C, Fig 8: the authors' ReLUNetwork (Linear without activation, then [BN(momentum None) -> Linear ->
    ReLU] x 2, then the classifier); Figs 1/7: the notebook's width 10, 30 blocks, BN before each Linear, evenly
    spaced points. Their batch-1 running statistics make every layer one affine map (DECISIONS.md D22)."""
    mod, args = paper("exp_spheres", "fig8")
    net = mod.SpheresMLP(2, 1000, "bn").net
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "Linear"]
    assert all(m.momentum is None for m in net if isinstance(m, torch.nn.BatchNorm1d))
    assert (args.mlp, args.batch_size, args.width, args.seeds) == ("authors", 50, 1000, 5)
    mod, args = paper("exp_spheres", "fig1")
    assert (args.lin_width, args.lin_depth, args.bn_place, args.points) == (10, 30, "before", "even")
    recs = {}
    for stats in ("first-batch", "batch"):
        args.bn_stats = stats
        recs[stats] = [r["separability"] for r in mod.run_fig1(args, torch.device("cpu"))[0] if r["norm"] == "bn"]
    assert recs["first-batch"] == [1.0] * 8  # one affine map: the circles stay nested at every layer
    assert max(recs["batch"][1:]) < 1.0  # each batch its own statistics: the classes mix from layer 2


def test_bn_adaptation_defaults_to_the_authors_one_batch_of_32():
    """P1 Table 7: the companion code (phibenz/batch_norm_adaptation.pytorch) resets the batch counter, runs one
    shuffled batch of 32 corrupted images in train mode with momentum None, then evaluates the whole set."""
    _, args = paper("exp_corruption", "t7")
    assert (args.adapt_on, args.adapt_batch) == ("batch", 32)
    torch.manual_seed(0)
    m = common.make_model("vgg8", norm="bn", width=0.25).eval()
    x = torch.rand(32, 3, 32, 32)
    a = common.adapt_bn(m, x, batch_size=32)
    bn = next(b for b in a.modules() if isinstance(b, torch.nn.BatchNorm2d))  # the first: its input ignores BN stats
    seen = []
    bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        a(x)
    assert torch.allclose(bn.running_mean, seen[0].mean((0, 2, 3)), atol=1e-6)  # the batch's own statistics
    assert torch.allclose(bn.running_var, seen[0].var((0, 2, 3)), atol=1e-6)  # (unbiased, as nn.BatchNorm)
