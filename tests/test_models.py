"""Models, norms and Fixup (P1, P2; DECISIONS.md D8-D11): shapes, structure and init rules."""
import math

import pytest
import torch
import torch.nn as nn

from common import (NORMS, DeepLinear, FixupBasicBlock, FixupBottleneck, FixupWideBlock, Standardize,
                    make_model, norm_layer)

SMALL = {  # arch -> kwargs giving a tiny model of the same topology
    "vgg8": dict(width=1 / 16), "vgg11": dict(width=1 / 16), "vgg13": dict(width=1 / 16),
    "vgg16": dict(width=1 / 16), "vgg19": dict(width=1 / 16),
    "resnet18": dict(width=1 / 16), "resnet34": dict(width=1 / 16), "resnet50": dict(width=1 / 16),
    "resnet20": dict(width=0.25), "resnet56": dict(width=0.25), "resnet110": dict(width=0.25),
    "wrn10_1": dict(),
}
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def x32(n=3, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- norm factory

def test_norm_factory_types_and_groups():
    assert isinstance(norm_layer("none", 8), nn.Identity)
    assert isinstance(norm_layer("bn", 8), nn.BatchNorm2d) and isinstance(norm_layer("bn", 8, dim=1), nn.BatchNorm1d)
    inn, ln = norm_layer("in", 8), norm_layer("ln", 8)
    assert (inn.num_groups, inn.num_channels, inn.affine) == (8, 8, True)
    assert (ln.num_groups, ln.num_channels) == (1, 8)
    assert norm_layer("gn", 64).num_groups == 32  # Wu & He default
    assert norm_layer("gn", 48).num_groups == 16  # gcd(32, 48): the group count must divide C
    assert norm_layer("gn", 8, gn_groups=4).num_groups == 4
    bn = norm_layer("bn", 8, dim=1, bn_eps=1e-3, bn_momentum=None)
    assert bn.eps == 1e-3 and bn.momentum is None


def test_norm_factory_errors():
    with pytest.raises(ValueError, match="norm='batch'"):
        norm_layer("batch", 8)
    with pytest.raises(ValueError, match="undefined for fully-connected"):
        norm_layer("in", 8, dim=1)


def test_instance_norm_is_per_instance_per_channel():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 1
    layer = norm_layer("in", 6).double()
    mu, var = x.mean((2, 3), keepdim=True), x.var((2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(layer(x), (x - mu) / torch.sqrt(var + layer.eps))


def test_layer_norm_normalizes_over_chw():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 3 + 1
    layer = norm_layer("ln", 6).double()
    mu, var = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(layer(x), (x - mu) / torch.sqrt(var + layer.eps))


# ---------------------------------------------------------------- every arch x every norm

@pytest.mark.parametrize("arch", list(SMALL))
@pytest.mark.parametrize("norm", NORMS)
def test_arch_norm_shapes_and_structure(arch, norm):
    torch.manual_seed(0)
    model = make_model(arch, norm=norm, num_classes=7, gn_groups=2, **SMALL[arch])
    x = x32()
    out = model(x)
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    model.eval()
    feats = model.features(x)
    assert feats.dim() == 2 and feats.shape[0] == 3
    torch.testing.assert_close(model.fc(feats), model(x))  # forward = classifier(features)
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if norm == "none":  # VGGs: a bias where there is no norm; ResNets/WRNs: none, as the authors' (DECISIONS.md D10)
        assert not norms and all((c.bias is not None) == arch.startswith("vgg") for c in convs)
    else:
        assert norms and all(c.bias is None for c in convs)
        if norm == "bn":
            assert all(isinstance(m, nn.BatchNorm2d) for m in norms)
        else:
            want = {"in": lambda m: m.num_groups == m.num_channels, "ln": lambda m: m.num_groups == 1,
                    "gn": lambda m: m.num_groups == 2}[norm]
            assert all(isinstance(m, nn.GroupNorm) and want(m) for m in norms)


@pytest.mark.parametrize("arch,params", [
    # Reference counts of the standard implementations (kuangliu CIFAR ResNets, akamaster option-A
    # ResNet-20/56/110, Zagoruyko WRN-28-10): the topology matches exactly.
    ("resnet18", 11_173_962), ("resnet34", 21_282_122), ("resnet50", 23_520_842),
    ("resnet20", 269_722), ("resnet56", 853_018), ("resnet110", 1_727_962), ("wrn28_10", 36_479_194),
])
def test_parameter_counts_match_reference_architectures(arch, params):
    model = make_model(arch, norm="bn")
    assert sum(p.numel() for p in model.parameters()) == params


def test_vgg_layout():
    for depth, n_conv in [(8, 5), (11, 8), (13, 10), (16, 13), (19, 16)]:
        m = make_model(f"vgg{depth}", norm="bn")
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        linears = [c for c in m.modules() if isinstance(c, nn.Linear)]
        assert len(convs) == n_conv and len(linears) == 3  # name counts weight layers
        assert len(convs) + len(linears) == depth
    m = make_model("vgg8", norm="bn", n_fc=1, width=0.5)
    assert m.features(x32()).shape == (3, 256) and len([c for c in m.modules() if isinstance(c, nn.Linear)]) == 1
    # ceil-mode pools: 8x8 inputs (digits) and 28x28 (MNIST) pass all five pools
    assert make_model("vgg11", norm="bn", width=1 / 16, in_channels=1)(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert make_model("vgg11", norm="bn", width=1 / 16, in_channels=1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_options_shortcut_and_activation():
    torch.manual_seed(0)
    with_sc = make_model("resnet18", norm="bn", width=1 / 16)
    no_sc = make_model("resnet18", norm="bn", width=1 / 16, shortcut=False)
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    assert n_params(no_sc) < n_params(with_sc)  # the 1x1 projections are dropped
    assert all(b.proj is None and not b.shortcut for b in no_sc.layers)
    no_sc.load_state_dict({k: v for k, v in with_sc.state_dict().items() if "proj" not in k})
    with_sc.eval(), no_sc.eval()
    assert not torch.allclose(with_sc(x32()), no_sc(x32()))
    block = no_sc.layers[0]
    xb = torch.rand(3, 4, 8, 8)
    torch.testing.assert_close(block(xb), torch.relu(block.branch(xb)))  # output = act(branch) only
    for act, cls in [("leaky_relu", nn.LeakyReLU), ("selu", nn.SELU)]:
        m = make_model("resnet18", norm="bn", width=1 / 16, act=act)
        assert any(isinstance(a, cls) for a in m.modules()) and not any(isinstance(a, nn.ReLU) for a in m.modules())
    assert [a for a in make_model("resnet18", norm="bn", width=1 / 16, act="leaky_relu").modules()
            if isinstance(a, nn.LeakyReLU)][0].negative_slope == 0.1


def test_option_a_shortcut_has_no_parameters_and_pads():
    m = make_model("resnet20", norm="bn")
    assert not any("proj" in k for k in m.state_dict())
    block = m.layers[3]  # first block of stage 2: 16 -> 32 channels, stride 2
    block.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        sc = torch.relu(block(x)) - torch.relu(block.branch(x) + torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], 1))
    assert sc.abs().max() == 0


def test_make_model_errors_are_one_line():
    for kwargs, msg in [(dict(arch="resnet19"), "unknown arch 'resnet19'"), (dict(arch="vgg8", norm="fixup"), "fixup"),
                        (dict(arch="vgg8", norm="BN"), "norm='BN'"), (dict(arch="mlp"), "in_dim"),
                        (dict(arch="wrn27_2"), "6n\\+4"), (dict(arch="resnet20", norm="fixup", shortcut=False), "shortcut"),
                        (dict(arch="vgg8", act="gelu"), "act='gelu'"), (dict(arch="wrn28_10", final_bn=True), "final_bn")]:
        with pytest.raises(ValueError, match=msg) as err:
            make_model(**kwargs)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- input standardization

def test_standardize_inside_model_equals_standardizing_outside():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    torch.manual_seed(0)
    inside = make_model("vgg8", norm="bn", width=1 / 16, mean=mean, std=std).eval()
    outside = make_model("vgg8", norm="bn", width=1 / 16).eval()
    outside.load_state_dict({k: v for k, v in inside.state_dict().items() if not k.startswith("input_norm")})
    x = x32()
    z = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(inside(x), outside(z))
    assert [n for n, _ in inside.named_parameters() if n.startswith("input_norm")] == []  # buffers, not trained
    flat = Standardize([0.5], [0.25])
    torch.testing.assert_close(flat(torch.ones(2, 5)), torch.full((2, 5), 2.0))
    with pytest.raises(ValueError, match="std > 0"):
        Standardize([0.5, 0.5], [0.2, 0.0])


# ---------------------------------------------------------------- Fixup (DECISIONS.md D11)

@pytest.mark.parametrize("arch,kw", [("resnet20", {}), ("resnet18", dict(width=1 / 8)), ("resnet50", dict(width=1 / 8)),
                                     ("wrn16_2", {}), ("wrn16_2", dict(final_bn=True))])
def test_fixup_zero_logits_zero_branches_no_norm(arch, kw):
    torch.manual_seed(0)
    model = make_model(arch, norm="fixup", **kw)
    x = x32(4)
    assert model(x).abs().max() == 0  # classifier weight and bias start at zero
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == (1 if kw.get("final_bn") else 0)  # only P2's single BN before the classifier
    assert model.fc.weight.abs().max() == 0 and model.fc.bias.abs().max() == 0
    blocks = [m for m in model.modules() if isinstance(m, (FixupBasicBlock, FixupBottleneck, FixupWideBlock))]
    assert blocks
    for b in blocks:  # every residual branch outputs exactly 0 at init
        c_in = (b.conv1.in_channels)
        assert b.branch(torch.randn(2, c_in, 8, 8)).abs().max() == 0
        assert b.scale.item() == 1.0
    scalars = [n for n, p in model.named_parameters() if p.numel() == 1]
    assert len(scalars) == sum(5 if not isinstance(b, FixupBottleneck) else 7 for b in blocks) + 2


def test_fixup_init_scale_is_L_to_minus_half_for_basic_blocks():
    # ResNet-110: L = 54 residual blocks; conv1 ~ N(0, 2/(out*9)) * 54^-1/2, conv2 = 0 (DECISIONS.md D11)
    torch.manual_seed(0)
    model = make_model("resnet110", norm="fixup")
    blocks = [b for b in model.layers]
    assert len(blocks) == 54
    w = torch.cat([(b.conv1.weight / math.sqrt(2.0 / (b.conv1.out_channels * 9))).flatten() for b in blocks])
    assert abs(w.std().item() - 54 ** -0.5) < 0.01 * 54 ** -0.5 * 5
    assert all(b.conv2.weight.abs().max() == 0 for b in blocks)
    # bottleneck (m = 3): L^(-1/4)
    model = make_model("resnet50", norm="fixup")
    b = model.layers[5]
    ratio = b.conv1.weight.std().item() / math.sqrt(2.0 / b.conv1.out_channels)
    assert abs(ratio - 16 ** -0.25) < 0.05 * 16 ** -0.25
    # WRN-28-10: L = 12 blocks
    wrn = make_model("wrn28_10", norm="fixup")
    blocks = [m for m in wrn.modules() if isinstance(m, FixupWideBlock)]
    assert len(blocks) == 12
    ratio = blocks[5].conv1.weight.std().item() / math.sqrt(2.0 / (blocks[5].conv1.out_channels * 9))
    assert abs(ratio - 12 ** -0.5) < 0.02 * 12 ** -0.5


def test_fixup_network_learns_from_zero_init():
    torch.manual_seed(0)
    model = make_model("resnet20", norm="fixup", width=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = x32(8), torch.arange(8) % 10
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert model(x).abs().max() > 0
    assert any(b.conv2.weight.abs().max() > 0 for b in model.layers)


# ---------------------------------------------------------------- MLP and deep linear net

def test_mlp_norm_positions_and_biases():
    m = make_model("mlp", norm="bn", in_dim=64, hidden=[32, 16, 8], norm_positions=[0, 2], bn_eps=1e-3)
    linears = [l for l in m.hidden if isinstance(l, nn.Linear)]
    bns = [l for l in m.hidden if isinstance(l, nn.BatchNorm1d)]
    assert [l.bias is None for l in linears] == [True, False, True]
    assert len(bns) == 2 and all(b.eps == 1e-3 for b in bns)
    assert m(torch.rand(5, 1, 8, 8)).shape == (5, 10)  # images are flattened
    assert m.features(torch.rand(5, 64)).shape == (5, 8)
    with pytest.raises(ValueError, match="norm_positions"):
        make_model("mlp", norm="bn", in_dim=4, hidden=[4], norm_positions=[3])
    ln = make_model("mlp", norm="ln", in_dim=4, hidden=[6])
    assert any(isinstance(l, nn.GroupNorm) and l.num_groups == 1 for l in ln.modules())


def test_deep_linear_without_bn_is_one_linear_map():
    torch.manual_seed(0)
    net = DeepLinear(in_dim=2, width=16, depth=8, norm="none").double()
    x1, x2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    h = lambda x: net.layer_outputs(x)[-1]
    torch.testing.assert_close(h(0.3 * x1 + 0.7 * x2), 0.3 * h(x1) + 0.7 * h(x2))  # affine map
    assert len(net.layer_outputs(x1)) == 9 and not any(isinstance(m, nn.ReLU) for m in net.modules())


def test_deep_linear_with_bn_maps_each_batch_differently_in_train_mode():
    torch.manual_seed(0)
    net = make_model("deep_linear", norm="bn", in_dim=2, width=16, depth=4).double().train()
    a, b = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    shared = a[:1]
    out_a = net.features(torch.cat([shared, a[1:]]))[0]
    out_b = net.features(torch.cat([shared, b[1:]]))[0]
    assert not torch.allclose(out_a, out_b)  # the same point lands elsewhere in another batch
    net.eval()
    torch.testing.assert_close(net.features(torch.cat([shared, a[1:]]))[0], net.features(torch.cat([shared, b[1:]]))[0])
