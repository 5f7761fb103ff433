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


def tree(root, per_class=2):
    for k, wnid in enumerate(WNIDS):
        (root / "val" / wnid).mkdir(parents=True)
        for i in range(per_class):
            image(300 + 40 * i, 260 + 30 * k, 10 * k + i).save(root / "val" / wnid / f"img_{i}.JPEG", quality=95)
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
    stands in for the 0.5 GB VGGs): streaming evaluation, top-1 <= top-5, claims, and a resume that adds nothing."""
    import hashlib
    import json

    import exp_table1
    root, weights = tree(tmp_path / "imagenet", per_class=3), tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    archs = exp_table1.ARTIFACTS[artifact]["runs"]["models"]["imagenet"]
    for name in [f"{a}{bn}" for a in archs for bn in ("", "_bn")]:
        torch.save(TinyVGG(name.endswith("_bn")).state_dict(), weights / "tmp.pth")
        digest = hashlib.sha256((weights / "tmp.pth").read_bytes()).hexdigest()
        (weights / "tmp.pth").rename(weights / f"{name}-{digest[:8]}.pth")
    monkeypatch.setattr(exp_table1, "make_model", lambda arch, norm, num_classes, **kw: TinyVGG(norm == "bn"))
    monkeypatch.setattr("sys.argv", ["exp_table1.py"])  # (the parser's name, which --resume checks)
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--artifact", artifact, "--imagenet-root", str(root), "--weights-dir", str(weights),
            "--workers", "1", "--batch-size", "4", "--out", str(out)]
    exp_table1.main(exp_table1.get_args(argv))
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    assert {(r["arch"], r["norm"]) for r in recs} == {(a, n) for a in archs for n in ("none", "bn")}
    for r in recs:
        assert r["dataset"] == "imagenet" and r["n_eval"] == 9 and r["weights"].startswith(r["arch"])
        for k in [k for k in r if k.startswith("acc_") and not k.startswith("acc_top5")]:
            assert 0 <= r[k] <= r["acc_top5_" + k[4:]] <= 1  # top-1 never above top-5
    claims = {c["id"] for c in res["claims"]}
    assert claims == ({"p2t5_top5_pgd", "p2t5_top1_pgd", "p2t5_top5_clean"} if artifact == "p2_t5" else
                      {"p1t1in_clean", "p1t1in_pgd_l2", "p1t1in_pgd_linf", "p1t1in_cw_l2", "p1t1in_cw_linf"})
    table = (out / "table.md").read_text()
    assert "| imagenet | " in table and "top-5" in table
    exp_table1.main(exp_table1.get_args(argv[:-2] + ["--resume", "--out", str(out)]))  # nothing left to do
    assert json.loads((out / "results.json").read_text())["records"] == recs
    with pytest.raises(DataError, match="needs --imagenet-root"):
        exp_table1.main(exp_table1.get_args(["--preset", "smoke", "--artifact", artifact, "--out", str(tmp_path / "x")]))


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
    shutil.rmtree(tmp_path / "data" / "imagenet" / "val" / WNIDS[0])  # a class folder missing from val: one line
    r = subprocess.run([sys.executable, "exp_ligs_trend.py", "--preset", "smoke", "--artifact", "fig11", "--dataset",
                        "imagenet100", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "x")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"lacks the class folder {WNIDS[0]}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
