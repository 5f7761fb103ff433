"""ImageNet models whose state_dict is torchvision's, checked without importing torchvision: the parameter counts
torchvision publishes for its weights, the key layout of its VGG and ResNet classes, and loading a weight file in
torchvision's format (keys, shapes, <name>-<sha256 prefix>.pth) with strict=True; a renamed, corrupt or mismatched
file is one DataError line."""
import hashlib

import pytest
import torch

from common import DataError, TV_WEIGHT_FILES, load_tv_weights, make_model, tv_weights_path

PARAMS = {  # torchvision's published num_params of each IMAGENET1K_V1 weight
    ("vgg11", "none"): 132_863_336, ("vgg11", "bn"): 132_868_840, ("vgg13", "none"): 133_047_848,
    ("vgg13", "bn"): 133_053_736, ("vgg16", "none"): 138_357_544, ("vgg16", "bn"): 138_365_992,
    ("vgg19", "none"): 143_667_240, ("vgg19", "bn"): 143_678_248, ("resnet18", "bn"): 11_689_512,
    ("resnet50", "bn"): 25_557_032, ("alexnet", "none"): 61_100_840, ("densenet121", "bn"): 7_978_856,
}


def meta(arch, norm):
    with torch.device("meta"):
        return make_model(f"imagenet_{arch}", norm=norm, num_classes=1000)


@pytest.mark.parametrize("arch,norm", list(PARAMS))
def test_parameter_counts_are_torchvisions(arch, norm):
    assert sum(p.numel() for p in meta(arch, norm).parameters()) == PARAMS[(arch, norm)]
    name = arch + ("_bn" if norm == "bn" and arch.startswith("vgg") else "")
    assert name in TV_WEIGHT_FILES


def test_vgg_keys_are_torchvisions():
    sd = meta("vgg16", "none").state_dict()
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv positions in torchvision's vgg16.features
    assert list(sd) == [f"features.{i}.{t}" for i in convs for t in ("weight", "bias")] + \
        [f"classifier.{i}.{t}" for i in (0, 3, 6) for t in ("weight", "bias")]
    sd = meta("vgg16", "bn").state_dict()  # conv, BatchNorm2d, ReLU per conv: the last conv at 40, its BN at 41
    assert sd["features.40.weight"].shape == (512, 512, 3, 3) and sd["features.41.running_var"].shape == (512,)
    assert "features.41.num_batches_tracked" in sd and sd["classifier.0.weight"].shape == (4096, 25088)
    assert len(sd) == 13 * 2 + 13 * 5 + 6


def test_resnet_keys_and_strides_are_torchvisions():
    r50 = meta("resnet50", "bn")
    sd = r50.state_dict()
    assert len(sd) == 320 and sd["conv1.weight"].shape == (64, 3, 7, 7) and sd["fc.weight"].shape == (1000, 2048)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1) and "layer1.0.downsample.1.running_mean" in sd
    assert sd["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1) and "layer4.2.bn3.num_batches_tracked" in sd
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)  # v1.5: stride in the 3x3
    sd18 = meta("resnet18", "bn").state_dict()
    assert len(sd18) == 122 and "layer1.0.downsample.0.weight" not in sd18 and "layer2.0.downsample.1.bias" in sd18
    assert not any(k.endswith("conv1.bias") for k in sd18)  # no conv biases
    gn = meta("resnet50", "gn").state_dict()  # P1's norms in torchvision's bn places, same names
    assert "layer3.1.bn2.weight" in gn and not any("running" in k for k in gn)
    assert not any(k.startswith("layer") and ".bn" in k for k in meta("resnet50", "none").state_dict())


def test_alexnet_and_densenet_keys_are_torchvisions():
    """P2 Table 5's other models: torchvision's AlexNet (convs at features.0/3/6/8/10, classifier.1/4/6) and
    DenseNet-121 (features.conv0 ... denseblock4.denselayer16, norm5, classifier; 58 dense layers, 3 transitions)."""
    sd = meta("alexnet", "none").state_dict()
    assert list(sd) == [f"features.{i}.{t}" for i in (0, 3, 6, 8, 10) for t in ("weight", "bias")] + \
        [f"classifier.{i}.{t}" for i in (1, 4, 6) for t in ("weight", "bias")]
    assert sd["features.0.weight"].shape == (64, 3, 11, 11) and sd["classifier.1.weight"].shape == (4096, 9216)
    sd = meta("densenet121", "bn").state_dict()
    layers = {k.rsplit(".", 2)[0] for k in sd if ".denselayer" in k}
    assert len(layers) == 6 + 12 + 24 + 16 and "features.denseblock4.denselayer16" in layers
    assert sd["features.denseblock1.denselayer1.conv1.weight"].shape == (128, 64, 1, 1)
    assert sd["features.denseblock1.denselayer1.conv2.weight"].shape == (32, 128, 3, 3)
    assert sd["features.transition3.conv.weight"].shape == (512, 1024, 1, 1)
    assert sd["features.norm5.weight"].shape == (1024,) and sd["classifier.weight"].shape == (1000, 1024)
    assert not any(".bias" in k and "conv" in k for k in sd)


def test_densenet_file_with_torchvisions_legacy_names_loads(tmp_path):
    """torchvision's densenet121-a639ec97.pth (2017) names a dense layer's modules norm.1, conv.1, norm.2, conv.2 and has
    no num_batches_tracked; torchvision renames the keys when it loads the file, and so does load_tv_weights."""
    import re
    torch.manual_seed(0)
    src = make_model("imagenet_densenet121", norm="bn", num_classes=1000).eval()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in src.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    assert "features.denseblock2.denselayer3.norm.1.running_var" in legacy
    torch.save(legacy, tmp_path / "tmp.pth")
    digest = hashlib.sha256((tmp_path / "tmp.pth").read_bytes()).hexdigest()
    (tmp_path / "tmp.pth").rename(tmp_path / f"densenet121-{digest[:8]}.pth")
    dst = load_tv_weights(make_model("imagenet_densenet121", norm="bn", num_classes=1000), tmp_path, "densenet121").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def write_weights(folder, name, model, named=True):
    path = folder / "tmp.pth"
    torch.save(model.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    final = folder / (f"{name}-{digest[:8]}.pth" if named else f"{name}.pth")
    path.rename(final)
    return final


def test_weight_files_load_strictly_and_bad_files_are_one_line(tmp_path):
    torch.manual_seed(0)
    src = make_model("imagenet_resnet18", norm="bn", num_classes=1000).eval()
    for m in src.modules():  # non-trivial BN statistics, as a trained file has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = write_weights(tmp_path, "resnet18", src)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dst = load_tv_weights(make_model("imagenet_resnet18", norm="bn", num_classes=1000, mean=mean, std=std), tmp_path,
                          "resnet18").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the standardizing first layer is not in the file and does what it says
        assert torch.allclose(dst(x), src((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)),
                              atol=1e-5)
    data = bytearray(path.read_bytes())  # one flipped byte: the name's hash no longer matches
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 .* does not start with"):
        tv_weights_path(tmp_path, "resnet18")
    path.rename(tmp_path / "resnet18.pth")  # a renamed file is not taken
    with pytest.raises(DataError, match=r"alexnet-owt-7be5be79\.pth: missing"):  # (its release name is alexnet-owt-<hex>)
        tv_weights_path(tmp_path, "alexnet")
    with pytest.raises(DataError, match=r"resnet18-f37072fd\.pth: missing"):
        tv_weights_path(tmp_path, "resnet18")
    (tmp_path / "resnet18.pth").unlink()
    write_weights(tmp_path, "resnet18", make_model("imagenet_resnet18", norm="gn", num_classes=1000))  # wrong keys
    with pytest.raises(DataError, match="does not fit resnet18") as e:
        load_tv_weights(make_model("imagenet_resnet18", norm="bn", num_classes=1000), tmp_path, "resnet18")
    assert "\n" not in str(e.value)
