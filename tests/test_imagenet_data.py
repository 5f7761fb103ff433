"""ImageNet read with Pillow alone, from tiny trees the tests write in both layouts: class order, the devkit's flat
validation folder, torchvision's evaluation preprocessing on a known image, and one-line errors for a missing folder,
an empty class and a truncated JPEG; the ImageNet artifacts end to end on local files."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import DataError, ImageNetFolder, imagenet_subset

WNIDS = ["n02119789", "n01440764", "n04592741"]  # written unsorted: the class index is the sorted order


def image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def tree(root, per_class=2, split="val"):
    for k, wnid in enumerate(WNIDS):
        (root / split / wnid).mkdir(parents=True)
        for i in range(per_class):
            image(300 + 40 * i, 260 + 30 * k, 10 * k + i + 1000 * (split == "train")).save(
                root / split / wnid / f"img_{i}.JPEG", quality=95)
    return root


def test_class_folders_are_indexed_in_sorted_wnid_order(tmp_path):
    ds = ImageNetFolder(tree(tmp_path), "val")
    assert ds.classes == sorted(WNIDS) and len(ds) == 6
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 2, 2]
    assert ds.samples[0][0].parent.name == "n01440764"  # tench is class 0, as in torchvision's pretrained order
    x, y = ds[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and y == 1


def test_evaluation_preprocessing_is_torchvisions_resize_256_center_crop_224(tmp_path):
    """A 512x384 image: torchvision's Resize(256) gives int(256 * 512 / 384) = 341 x 256 (PIL bilinear), and
    CenterCrop(224) starts at left int(round(58.5)) = 58, top int(round(16.0)) = 16; ToTensor divides by 255."""
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    img = image(512, 384, 0)
    img.save(tmp_path / "val" / "n01440764" / "a.png")  # lossless, so the expected pixels are known exactly
    x, _ = ImageNetFolder(tmp_path, "val")[0]
    expected = np.asarray(img.resize((341, 256), Image.BILINEAR).crop((58, 16, 58 + 224, 16 + 224)), dtype=np.float32)
    assert torch.equal(x, torch.from_numpy(expected / 255).permute(2, 0, 1).float())
    portrait = common._pil_resize_short(image(300, 500, 1), 256)
    assert portrait.size == (256, int(256 * 500 / 300))  # the short side is the width here
    gray = Image.fromarray(np.full((240, 250), 7, np.uint8))  # a grayscale JPEG is converted to RGB
    gray.save(tmp_path / "val" / "n01440764" / "b.JPEG")
    assert ImageNetFolder(tmp_path, "val")[1][0].shape == (3, 224, 224)


def test_random_resized_crop_is_torchvisions_rule():
    """torchvision's RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)): boxes inside the image with an area fraction
    and aspect ratio in range (up to the rounding to pixels); an image where no try fits takes the centred crop of
    the whole image clamped to the ratio -- for 1000 x 10 (every try is over 10 pixels high) that is 13 x 10 at
    left (1000 - 13) // 2 = 493, and for 10 x 1000 10 x 13 at top 493."""
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(2000):
        left, top, w, h = common.random_resized_crop_box(500, 375, g)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02 and 0.08 - 0.005 <= w * h / (500 * 375) <= 1.0
        fractions.append(w * h / (500 * 375))
    assert min(fractions) < 0.1 and max(fractions) > 0.9  # the whole range of areas is drawn
    assert common.random_resized_crop_box(1000, 10, g) == (493, 0, 13, 10)
    assert common.random_resized_crop_box(10, 1000, g) == (0, 493, 10, 13)  # h = round(10 / (3/4)) = 13 rows
    assert common.random_resized_crop_box(50, 50, torch.Generator().manual_seed(5)) == \
        common.random_resized_crop_box(50, 50, torch.Generator().manual_seed(5))


def test_training_items_are_random_resized_crops_and_flips_fixed_by_epoch_and_index(tmp_path):
    """train=True: item i of epoch seed e is the crop+resize (PIL bilinear, as torchvision's resized_crop) of the box
    drawn from (e, i), flipped on the next draw < 1/2; the same (e, i) gives the same tensor in any process."""
    root = tree(tmp_path, per_class=2, split="train")
    ds = ImageNetFolder(root, "train", size=48, train=True)
    img = ds.load(3)
    ds.epoch_seed = 7
    g = torch.Generator().manual_seed(7 * 100_000_007 + 3)
    left, top, w, h = common.random_resized_crop_box(*img.size, g)
    want = img.crop((left, top, left + w, top + h)).resize((48, 48), Image.BILINEAR)
    if float(torch.rand(1, generator=g)) < 0.5:
        want = want.transpose(Image.FLIP_LEFT_RIGHT)
    x, y = ds[3]
    assert torch.equal(x, common.pil_to_tensor01(want)) and y == 1
    assert torch.equal(ds[3][0], x)
    flips = 0
    for e in range(40):  # other epochs, other crops; about half of them flipped
        ds.epoch_seed = e
        g = torch.Generator().manual_seed(e * 100_000_007 + 3)
        common.random_resized_crop_box(*img.size, g)
        flips += float(torch.rand(1, generator=g)) < 0.5
    assert 10 <= flips <= 30
    ds.epoch_seed = 8
    assert not torch.equal(ds[3][0], x)
    xs, _ = common.collect(common.imagenet_loader(ds, batch_size=3, workers=2), "t")  # in worker processes: the same
    assert torch.equal(xs[3], ds[3][0])


def test_flat_validation_folder_with_the_devkit(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    (tmp_path / "val").mkdir()
    # the devkit numbers its synsets in its own order (ID 1 = n02119789), not in sorted-wnid order
    ids = {1: "n02119789", 2: "n01440764", 3: "n04592741", 4: "n00000000"}  # 4: an inner node, num_children > 0
    synsets = np.array([(i, w, 0 if i < 4 else 2) for i, w in ids.items()],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy_io.savemat(data / "meta.mat", {"synsets": synsets})
    truth = [3, 1, 2, 1]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{t}\n" for t in truth))
    for i in range(4):
        image(260, 250, i).save(tmp_path / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    ds = ImageNetFolder(tmp_path, "val")
    assert ds.classes == sorted(WNIDS)
    assert [label for _, label in ds.samples] == [sorted(WNIDS).index(ids[t]) for t in truth] == [2, 1, 0, 1]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("3\n1\n")
    with pytest.raises(DataError, match="2 labels for 4 images"):
        ImageNetFolder(tmp_path, "val")


def test_bad_trees_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"ImageNet not found: expected .*val/<wnid>/\*\.JPEG"):
        ImageNetFolder(tmp_path, "val")
    root = tree(tmp_path / "a")
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(DataError, match="n09999999: an empty class folder"):
        ImageNetFolder(root, "val")
    (root / "val" / "n09999999").rmdir()
    flat = tmp_path / "flat"
    (flat / "val").mkdir(parents=True)
    image(250, 250, 0).save(flat / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DataError, match="needs the devkit"):
        ImageNetFolder(flat, "val")
    victim = root / "val" / "n04592741" / "img_1.JPEG"  # a truncated JPEG, read in a DataLoader worker
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])
    with pytest.raises(DataError) as e:
        imagenet_subset(ImageNetFolder(root, "val"), 6)
    assert "img_1.JPEG: unreadable image" in str(e.value) and "\n" not in str(e.value)


class TinyVGG(torch.nn.Module):
    """Stands in for torchvision's VGGs in the end-to-end test (their files are 0.5 GB each; their keys and shapes are
    tested in test_imagenet_models.py): the same state_dict prefixes, 1000 outputs."""

    def __init__(self, bn):
        super().__init__()
        layers = [torch.nn.Conv2d(3, 4, 3, padding=1)] + ([torch.nn.BatchNorm2d(4)] if bn else []) + [torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(2))
        self.classifier = torch.nn.Sequential(torch.nn.Linear(16, 1000))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_p2_table_10_runs_on_imagenet_files_without_torchvision(tmp_path, monkeypatch):
    import hashlib
    import json
    import sys

    import exp_transfer
    root, weights = tree(tmp_path / "imagenet", per_class=3), tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn"):
        torch.save(TinyVGG(name.endswith("_bn")).state_dict(), weights / "tmp.pth")
        digest = hashlib.sha256((weights / "tmp.pth").read_bytes()).hexdigest()
        (weights / "tmp.pth").rename(weights / f"{name}-{digest[:8]}.pth")  # named as torch.hub names its files
    monkeypatch.setattr(exp_transfer, "make_model", lambda arch, norm, num_classes: TinyVGG(norm == "bn"))
    out = tmp_path / "run"
    args = exp_transfer.get_args(["--preset", "smoke", "--artifact", "p2_t10", "--arch", "vgg11", "vgg13",
                                  "--imagenet-root", str(root), "--weights-dir", str(weights), "--out", str(out)])
    exp_transfer.main(args)
    recs = json.loads((out / "results.json").read_text())["records"]
    assert {(r["source"], r["target"]) for r in recs} == {(s, t) for s in ("vgg11", "vgg11_bn")
                                                          for t in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn")}
    assert all(r["setting"] == "imagenet" and r["status"] == "ok" and 0 <= r["top1"] <= r["top5"] <= 1 for r in recs)
    assert "ImageNet" in (out / "table.md").read_text() and "torchvision" not in sys.modules
    (weights / next(p.name for p in weights.iterdir() if p.name.startswith("vgg13_bn"))).unlink()
    with pytest.raises(DataError, match=r"vgg13_bn-abd245e5\.pth: missing"):
        exp_transfer.main(exp_transfer.get_args(["--preset", "smoke", "--artifact", "p2_t10", "--arch", "vgg11", "vgg13",
                                                 "--imagenet-root", str(root), "--weights-dir", str(weights),
                                                 "--out", str(tmp_path / "run2")]))


@pytest.mark.parametrize("artifact", ["p2_t5", "p1_t1_imagenet"])
def test_imagenet_tables_run_on_local_files_and_resume(tmp_path, monkeypatch, artifact):
    """exp_table1's ImageNet artifacts end to end on a self-written ImageNet tree and hash-named weight files (TinyVGG
    stands in for torchvision's 0.03-0.5 GB models): streaming evaluation, top-1 <= top-5, claims on the BN/none pairs
    only, and a resume that adds nothing. P1 Table 1 trains its ResNet18 with and without BN here (32 x 32 crops)."""
    import hashlib
    import json

    import exp_table1
    root, weights = tree(tmp_path / "imagenet", per_class=3), tmp_path / "weights"
    tree(root, per_class=4, split="train")
    weights.mkdir()
    torch.manual_seed(0)
    archs = ["vgg16", "resnet18"] if artifact == "p1_t1_imagenet" else \
        exp_table1.ARTIFACTS[artifact]["runs"]["models"]["imagenet"]
    trained = exp_table1.ARTIFACTS[artifact]["runs"].get("train", [])
    released = [(a, n) for a in archs for n in ("none", "bn") if a not in trained and exp_table1.tv_name(a, n)]
    for a, n in released:
        torch.save(TinyVGG(n == "bn").state_dict(), weights / "tmp.pth")
        digest = hashlib.sha256((weights / "tmp.pth").read_bytes()).hexdigest()
        base = common.TV_WEIGHT_FILES[exp_table1.tv_name(a, n)].rsplit("-", 1)[0]
        (weights / "tmp.pth").rename(weights / f"{base}-{digest[:8]}.pth")
    real = exp_table1.make_model
    monkeypatch.setattr(exp_table1, "make_model", lambda arch, norm, num_classes, **kw: real(
        arch, norm=norm, num_classes=num_classes, **kw) if arch[9:] in trained else TinyVGG(norm == "bn"))
    monkeypatch.setattr("sys.argv", ["exp_table1.py"])  # (the parser's name, which --resume checks)
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--artifact", artifact, "--arch", *archs, "--imagenet-root", str(root), "--weights-dir",
            str(weights), "--workers", "1", "--batch-size", "4", "--size", "32", "--epochs", "1", "--out", str(out)]
    exp_table1.main(exp_table1.get_args(argv))
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    want = released + [(a, n) for a in trained if a in archs for n in ("none", "bn")]
    assert sorted((r["arch"], r["norm"]) for r in recs) == sorted(want)
    for r in recs:
        assert r["dataset"] == "imagenet" and r["n_eval"] == 9
        assert r["weights"] == "trained here" if r["arch"] in trained else r["weights"].startswith(r["arch"])
        for k in [k for k in r if k.startswith("acc_") and not k.startswith("acc_top5")]:
            assert 0 <= r[k] <= r["acc_top5_" + k[4:]] <= 1  # top-1 never above top-5
    claims = {c["id"]: c for c in res["claims"]}
    if artifact == "p2_t5":
        assert {(a, n) for a, n in want if a in ("alexnet", "densenet121", "resnet18")} == \
            {("alexnet", "none"), ("densenet121", "bn"), ("resnet18", "bn")}
        assert set(claims) == {"p2t5_top5_pgd", "p2t5_top1_pgd", "p2t5_top5_clean"}
        assert all(c["n_a"] == c["n_b"] == 4 for c in claims.values())  # the four VGG pairs, not the unpaired models
    else:
        assert set(claims) == {"p1t1in_clean", "p1t1in_pgd_l2", "p1t1in_pgd_linf", "p1t1in_cw_l2", "p1t1in_cw_linf"}
        assert all(c["n_a"] == c["n_b"] == 2 for c in claims.values())
        assert (out / "ckpt" / "imagenet_resnet18_bn_s0.pt").exists()
    table = (out / "table.md").read_text()
    assert "| imagenet | " in table and "top-5" in table and "The paper's numbers" in table
    exp_table1.main(exp_table1.get_args(argv[:-2] + ["--resume", "--out", str(out)]))  # nothing left to do
    assert json.loads((out / "results.json").read_text())["records"] == recs
    with pytest.raises(DataError, match="needs --imagenet-root"):
        exp_table1.main(exp_table1.get_args(["--preset", "smoke", "--artifact", artifact, "--out", str(tmp_path / "x")]))


def test_imagenet_resnet_training_resumes_exactly_and_falls_back_when_it_diverges(tmp_path, monkeypatch):
    """P1 Table 1's ImageNet ResNets: a run interrupted after its first epoch resumes from the checkpoint and ends with
    the weights of an uninterrupted run; a no-norm ResNet that diverges is retrained with the warm-up and clipping
    fallback, and its record says so."""
    import exp_table1
    root = tree(tmp_path / "imagenet", per_class=4, split="train")
    args = exp_table1.get_args(["--preset", "smoke", "--artifact", "p1_t1_imagenet", "--imagenet-root", str(root),
                                "--size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0"])
    train_set = ImageNetFolder(root, "train", size=32, train=True)
    device = torch.device("cpu")
    whole, _ = exp_table1.trained_resnet(args, tmp_path / "a", train_set, "resnet18", "bn", device)
    saves = []
    real_save = common.save_atomic

    def save_then_stop(obj, path):
        real_save(obj, path)
        saves.append(path)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint
    monkeypatch.setattr(common, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        exp_table1.trained_resnet(args, tmp_path / "b", train_set, "resnet18", "bn", device)
    monkeypatch.setattr(common, "save_atomic", real_save)
    resumed, info = exp_table1.trained_resnet(args, tmp_path / "b", train_set, "resnet18", "bn", device)
    assert len(saves) == 1 and info["status"] == "ok" and not info["fallback"]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    args.lr = 1e6  # a no-norm ResNet at an absurd LR diverges
    _, info = exp_table1.trained_resnet(args, tmp_path / "c", train_set, "resnet18", "none", device)
    assert info["fallback"] and (tmp_path / "c" / "ckpt" / "imagenet_resnet18_none_s0_fallback.pt").exists()
    assert info["status"] == "ok" or "diverged" in info["reason"]


def test_streamed_training_refuses_torchrun(tmp_path, monkeypatch):
    """Each torchrun rank would train its own copy of the model: one clear line pointing to --shard instead, from the
    trainer and from both scripts before any run directory is made (exp_table1 would first evaluate the VGGs)."""
    import exp_ligs_trend
    import exp_table1
    monkeypatch.setattr(common, "is_distributed", lambda: True)
    model = common.make_model("imagenet_resnet18", norm="bn", num_classes=1000)
    train_set = ImageNetFolder(tree(tmp_path / "data" / "imagenet", split="train"), "train", size=32, train=True)
    with pytest.raises(ValueError, match="use --shard k/N, not torchrun"):
        common.train_stream(model, train_set, dict(common.HE_IMAGENET, epochs=1))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="p1_t1_imagenet's ResNet training runs in one process per GPU"):
        exp_table1.main(exp_table1.get_args(["--preset", "smoke", "--artifact", "p1_t1_imagenet", "--arch", "resnet18",
                                             "--imagenet-root", str(tmp_path / "data" / "imagenet"), "--out", str(out)]))
    with pytest.raises(ValueError, match="--dataset imagenet .* not torchrun"):
        exp_ligs_trend.main(exp_ligs_trend.get_args(["--preset", "smoke", "--artifact", "fig11", "--dataset", "imagenet",
                                                     "--data-root", str(tmp_path / "data"), "--out", str(out)]))
    assert not out.exists()


def test_fig11_on_the_100_class_substitute_from_imagenet_files(tmp_path):
    """P1 Fig 11's labelled substitute end to end: ImageNet class folders under --data-root/imagenet/{train,val}, read
    at 32x32, torchvision's ResNet18 layout with and without BN, LIGS per epoch, the substitute named in the table."""
    import json
    import subprocess
    import sys

    from tests.test_project import ROOT
    for split in ("train", "val"):
        tree_root = tmp_path / "data" / "imagenet"
        for k, wnid in enumerate(WNIDS):
            (tree_root / split / wnid).mkdir(parents=True)
            for i in range(4 if split == "train" else 2):
                image(80 + 8 * i, 70 + 5 * k, 100 * k + i + (50 if split == "val" else 0)).save(
                    tree_root / split / wnid / f"{split}_{i}.JPEG")
    out = tmp_path / "fig11"
    r = subprocess.run([sys.executable, "exp_ligs_trend.py", "--preset", "smoke", "--artifact", "fig11", "--dataset",
                        "imagenet100", "--data-root", str(tmp_path / "data"), "--size", "32", "--arch", "imagenet_resnet18",
                        "--norm", "none", "bn", "--epochs", "1", "--milestones", "--per-class", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((out / "results.json").read_text())["records"]
    assert {x["variant"] for x in recs} == {"resnet18 none", "resnet18 bn"}
    assert all(x["dataset"] == "imagenet100" and -1 <= x["ligs"] <= 1 for x in recs if "ligs" in x)
    assert "SUBSTITUTE: 100 classes at 64x64" in (out / "table.md").read_text() and (out / "fig11.png").exists()
    out = tmp_path / "fig11_imagenet"  # P1 Fig 11 on ImageNet itself: streamed, 1000 outputs, the whole val set
    r = subprocess.run([sys.executable, "exp_ligs_trend.py", "--preset", "smoke", "--artifact", "fig11", "--dataset",
                        "imagenet", "--data-root", str(tmp_path / "data"), "--size", "32", "--arch", "imagenet_resnet18",
                        "--norm", "bn", "--epochs", "1", "--milestones", "--per-class", "1", "--batch-size", "4",
                        "--workers", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((out / "results.json").read_text())["records"]
    assert [x["epoch"] for x in recs] == [0, 1] and all(x["dataset"] == "imagenet" for x in recs)
    assert all(0 <= x["clean_acc"] <= 1 and -1 <= x["ligs"] <= 1 and "robust_acc" in x for x in recs)
    assert "SUBSTITUTE" not in (out / "table.md").read_text() and "images/s" in r.stdout
    shutil.rmtree(tmp_path / "data" / "imagenet" / "val" / WNIDS[0])  # a class folder missing from val: one line
    r = subprocess.run([sys.executable, "exp_ligs_trend.py", "--preset", "smoke", "--artifact", "fig11", "--dataset",
                        "imagenet100", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"lacks the class folder {WNIDS[0]}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
