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


def test_p2_seeds_per_model():
    """P2 App. A.3: "We train WideResNets (WRN) with five unique seeds"; the VGGs of Tables 2 and 4 have three."""
    mod, args = paper("exp_table1", "p2_t2")
    assert (mod.seeds_for(args, "wrn28_10")[0], mod.seeds_for(args, "vgg8")[0]) == (5, 3)
    mod, args = paper("exp_corruption", "p2_t4")
    seeds = {}
    for _, r in mod.planned_runs(args):
        seeds.setdefault(r["arch"], set()).add(r["seed"])
    assert {a: len(s) for a, s in seeds.items()} == {"vgg8": 3, "vgg13": 3, "wrn28_10": 5}
    _, args = paper("exp_table1", "p2_t2", "--arch-seeds", "vgg8=4")
    assert args.arch_seeds == {"vgg8": 4}


def test_p2_table2_selects_the_best_test_epoch_and_reports_both():
    """P2 Sec. 3: Table 2 evaluates "the best model in terms of test accuracy"; Table 4 reuses those models."""
    mod, args = paper("exp_table1", "p2_t2")
    assert args.select == "best_test" and mod.recipe(args, "cifar10", "vgg8", "bn")["select"] == "best_test"
    assert all(c["metric"].startswith("sel_") for c in mod.CLAIMS["p2_t2"])
    mod, args = paper("exp_table1", "p2_t1")
    assert "select" not in mod.recipe(args, "svhn", "vgg8", "bn")  # final epoch elsewhere (and unchanged cache keys)
    mod, args = paper("exp_corruption", "p2_t4")
    assert mod.recipe(args, "cifar10", "wrn28_10", "bn", "standard")["select"] == "best_test"
    assert "select" not in mod.recipe(args, "cifar10", "vgg13", "bn", "standard")  # Table 3's model


def test_best_test_selection_keeps_the_best_epoch_across_a_resume(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 8, 8, generator=g), torch.arange(64) % 4
    xt, yt = torch.rand(32, 3, 8, 8, generator=g), torch.arange(32) % 4
    data = common.Data("toy", x, y, xt, yt, (0.5,) * 3, (0.25,) * 3, 4)
    recipe = dict(epochs=4, batch_size=16, lr=0.05, select="best_test")

    def train(ckpt=None, stop_after=None):
        def on_epoch(epoch, m):
            if epoch == stop_after:
                raise KeyboardInterrupt
            return {}
        common.set_seed(0)
        model = common.make_model("vgg8", norm="bn", width=0.25, num_classes=4, in_channels=3)
        return model, common.train_model(model, data, recipe, seed=1, ckpt=ckpt, log=lambda s: None, on_epoch=on_epoch)

    model, res = train()
    accs = {h["epoch"]: h["test_acc"] for h in res["history"] if "test_acc" in h}
    assert sorted(accs) == [1, 2, 3, 4] and res["best"]["test_acc"] == max(accs.values())
    assert res["best"]["epoch"] == min(e for e, a in accs.items() if a == max(accs.values()))  # ties: the earlier
    best = common.make_model("vgg8", norm="bn", width=0.25, num_classes=4, in_channels=3)
    best.load_state_dict(res["best"]["model"])
    assert common.accuracy(best, xt, yt) == res["best"]["test_acc"]
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "c.pt", stop_after=2)
    _, resumed = train(tmp_path / "c.pt")
    assert resumed["best"]["epoch"] == res["best"]["epoch"]
    assert all(torch.equal(v, resumed["best"]["model"][k]) for k, v in res["best"]["model"].items())


def test_p2_a2_longer_pgd_on_vgg16_bn():
    """P2 App. A.2: "For VGG16 on CIFAR-10, using 40 iterations of PGD with a step size of eps/20, instead of 20
    iterations with eps/10" -- 28.9 ± 0.2 %, P2 Table 3's VGG16 with BN, so Table 3's BN model and recipe."""
    mod, args = paper("exp_table1", "p2_pgd_steps")
    assert mod.plan(args) == [("cifar10", "vgg16", "bn")]
    assert mod.recipe(args, "cifar10", "vgg16", "bn") == mod.recipe(paper("exp_table1", "p2_t3")[1], "cifar10", "vgg16",
                                                                     "bn")  # a --cache hit for p2_t3's model
    specs = mod.attack_suite(args, "standardized", "cifar10", None)
    eps = args.eps_linf
    assert (specs["pgd_linf"]["steps"], specs["pgd_linf"]["step_size"]) == (20, eps / 10)
    assert (specs["pgd_linf_long"]["steps"], specs["pgd_linf_long"]["step_size"]) == (40, eps / 20)
    _, args = paper("exp_table1", "p2_pgd_vs_bim", "--step-div", "5", "--bim-step-div", "8")
    specs = mod.attack_suite(args, "standardized", "svhn", None)
    assert specs["pgd_l2"]["step_size"] == args.eps_l2 / 5 and specs["bim"]["step_size"] == args.eps_linf / 8


def test_p1_resnets_get_the_resnet_recipe_in_every_script():
    """P1 App. B.1 states the ResNet recipe (350 epochs, LR 0.1, /10 at 150 and 250); exp_table1.py and
    exp_corruption.py give it to every ResNet, so a ResNet18 trained by one is a --cache hit for the other."""
    t1, a1 = paper("exp_table1", "p1_t1", "--arch", "resnet18")
    co, a2 = paper("exp_corruption", "t7", "--arch", "resnet18")
    r1, r2 = t1.recipe(a1, "cifar10", "resnet18", "bn"), co.recipe(a2, "cifar10", "resnet18", "bn", "standard")
    assert r1 == r2 and (r1["epochs"], r1["lr"], tuple(r1["milestones"])) == (350, 0.1, (150, 250))


def test_p1_table3_extracts_from_the_training_set():
    """P1 App. B.3: features are extracted "for each sample x from D", the training set, every image of it."""
    mod, args = paper("exp_transfer", "p1_t3")
    assert (args.extract_from, args.per_class) == ("train", None)  # (the smoke test reads it back from table.md)
