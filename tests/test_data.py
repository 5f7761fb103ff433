"""Dataset readers on tiny files written here in the exact on-disk formats, the md5-checked
downloader against a local HTTP server, the bundled digits, and on-device augmentation."""
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading

import numpy as np
import pytest
import torch

import common
from common import (DataError, augment_crop_flip, build_dataset, class_balanced_subset, download, load_digits,
                    make_synthetic_images, read_cifar10, read_cifar101, read_mnist, read_svhn, resize_images)


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- CIFAR-10 python pickle batches

def write_cifar10(root, n=4):
    """The real layout: cifar-10-batches-py/data_batch_{1..5}, test_batch; each a pickled dict with
    bytes keys, data uint8 (N, 3072) in channel-major order and labels a list of ints."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    made = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng(i).integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng(100 + i).integers(0, 10, n)]
        with open(base / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        made[name] = (data, labels)
    return made


def test_cifar10_reader_round_trip(tmp_path):
    made = write_cifar10(tmp_path)
    d = read_cifar10(tmp_path)
    assert d["x_train"].shape == (20, 3, 32, 32) and d["x_test"].shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(d["x_train"][:4].reshape(4, -1), made["data_batch_1"][0])
    np.testing.assert_array_equal(d["x_test"][1, 2], made["test_batch"][0][1, 2048:].reshape(32, 32))  # blue plane
    assert d["y_train"].tolist()[:4] == made["data_batch_1"][1] and d["y_train"].dtype == np.int64
    data = build_dataset("cifar10", root=tmp_path)
    assert data.x_train.dtype == torch.float32 and 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert data.mean == common.STATS["cifar10"][0]


def test_cifar10_truncated_batch_is_one_clear_error(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt CIFAR-10 batch .*data_batch_3") as e:
        read_cifar10(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_dataset_names_the_path_and_the_way_out(tmp_path):
    for name, expected in [("cifar10", "cifar-10-batches-py/data_batch_1"), ("svhn", "svhn/train_32x32.mat"),
                           ("mnist", "mnist/train-images-idx3-ubyte")]:
        with pytest.raises(DataError) as e:
            build_dataset(name, root=tmp_path)
        msg = str(e.value)
        assert expected in msg and "--download" in msg and "--preset quick" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---------------------------------------------------------------- SVHN .mat

def test_svhn_reader_round_trip(tmp_path):
    from scipy.io import savemat
    base = tmp_path / "svhn"
    base.mkdir()
    X = rng(1).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10]], dtype=np.uint8)  # SVHN stores digit 0 as label 10
    for split in ("train", "test"):
        savemat(base / f"{split}_32x32.mat", {"X": X, "y": y})
    d = read_svhn(tmp_path)
    assert d["x_train"].shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(d["x_train"][2, 1], X[:, :, 1, 2])  # (H, W, C, N) -> (N, C, H, W)
    assert d["y_test"].tolist() == [0, 1, 2, 9, 0]
    (base / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(DataError, match="corrupt SVHN file"):
        read_svhn(tmp_path)


# ---------------------------------------------------------------- MNIST idx

def idx_bytes(arr):
    magic = 0x803 if arr.ndim == 3 else 0x801
    return struct.pack(">II", magic, arr.shape[0]) + b"".join(struct.pack(">I", s) for s in arr.shape[1:]) + arr.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reader_round_trip_raw_and_gz(tmp_path, gz):
    base = tmp_path / "mnist"
    base.mkdir()
    imgs = {p: rng(i).integers(0, 256, (3, 28, 28), dtype=np.uint8) for i, p in enumerate(("train", "t10k"))}
    labels = {p: rng(9 + i).integers(0, 10, 3).astype(np.uint8) for i, p in enumerate(("train", "t10k"))}
    for p in ("train", "t10k"):
        for kind, arr in (("images-idx3", imgs[p]), ("labels-idx1", labels[p])):
            raw = idx_bytes(arr)
            name = f"{p}-{kind}-ubyte"
            (base / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    d = read_mnist(tmp_path)
    assert d["x_train"].shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(d["x_test"][:, 0], imgs["t10k"])
    assert d["y_train"].tolist() == labels["train"].tolist()


def test_mnist_truncated_or_bad_magic_is_one_clear_error(tmp_path):
    base = tmp_path / "mnist"
    base.mkdir()
    for p in ("train", "t10k"):
        (base / f"{p}-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10])
        (base / f"{p}-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="corrupt MNIST file .*train-images-idx3-ubyte"):
        read_mnist(tmp_path)
    (base / "train-images-idx3-ubyte").write_bytes(struct.pack(">II", 1234, 0))
    with pytest.raises(DataError, match="bad magic number"):
        read_mnist(tmp_path)


# ---------------------------------------------------------------- download against a local server

class Server:
    """A threaded HTTP server on 127.0.0.1 serving `files` ({path: bytes}); a path in `truncate`
    announces the full Content-Length but closes the connection after half the body."""

    def __init__(self, files, truncate=()):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in outer.truncate else body)

            def log_message(self, *a):
                pass

        self.files, self.truncate = files, set(truncate)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_good_file_wrong_checksum_and_interrupted_transfer(tmp_path):
    body = bytes(rng(3).integers(0, 256, 300_000, dtype=np.uint8))
    md5 = hashlib.md5(body).hexdigest()
    with Server({"/good.bin": body, "/cut.bin": body}, truncate={"/cut.bin"}) as srv:
        dest = download(f"{srv.url}/good.bin", tmp_path / "a" / "good.bin", md5, chunk=4096)
        assert dest.read_bytes() == body
        with pytest.raises(DataError, match="failed its checksum"):
            download(f"{srv.url}/good.bin", tmp_path / "bad.bin", "0" * 32)
        with pytest.raises(DataError, match="interrupted|IncompleteRead"):
            download(f"{srv.url}/cut.bin", tmp_path / "cut.bin", md5, timeout=5)
        with pytest.raises(DataError, match="HTTPError"):
            download(f"{srv.url}/missing.bin", tmp_path / "missing.bin", md5)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["good.bin"]  # no partial files


def test_download_flag_fetches_and_unpacks_cifar10(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_cifar10(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    archive = buf.getvalue()
    root = tmp_path / "root"
    with Server({"/cifar.tgz": archive}) as srv:
        monkeypatch.setitem(common.SOURCES, "cifar10", (
            "", [("cifar-10-python.tar.gz", f"{srv.url}/cifar.tgz", hashlib.md5(archive).hexdigest())],
            common.SOURCES["cifar10"][2]))
        data = build_dataset("cifar10", root=root, download=True)
    assert data.x_train.shape == (20, 3, 32, 32)
    torch.testing.assert_close(data.x_test, build_dataset("cifar10", root=src).x_test)


# ---------------------------------------------------------------- bundled digits, synthetic, resizing

def test_bundled_digits_split_and_range():
    d = load_digits()
    assert d["x_train"].shape == (1500, 1, 8, 8) and d["x_test"].shape == (297, 1, 8, 8)
    assert d["x_train"].min() == 0 and d["x_train"].max() == 1
    assert set(d["y_train"].unique().tolist()) == set(range(10))
    again = load_digits()
    assert torch.equal(d["y_test"], again["y_test"])  # the split is fixed
    raw = np.load(common.DIGITS_FILE)
    assert raw["images"].shape == (1797, 8, 8) and raw["images"].max() == 16
    big = build_dataset("digits", size=32, channels=3)
    assert big.x_train.shape == (1500, 3, 32, 32) and len(big.mean) == 3


def test_nearest_upscaling_replicates_pixels_and_keeps_moments():
    x = torch.rand(4, 1, 8, 8)
    for k in (2, 3, 4):
        up = resize_images(x, 8 * k)
        assert up.shape == (4, 1, 8 * k, 8 * k)
        blocks = up.unfold(2, k, k).unfold(3, k, k)  # (4, 1, 8, 8, k, k): each k x k block is one pixel
        assert torch.equal(blocks, x[..., None, None].expand_as(blocks))
        torch.testing.assert_close(up.mean(), x.mean())
        torch.testing.assert_close(up.std(unbiased=False), x.std(unbiased=False))
    assert resize_images(x, 20, "bilinear").shape == (4, 1, 20, 20)


def test_synthetic_images_are_learnable_shape():
    x, y = make_synthetic_images(200, size=16, seed=0)
    x2, _ = make_synthetic_images(200, size=16, seed=0)
    assert x.shape == (200, 3, 16, 16) and torch.equal(x, x2) and x.min() >= 0 and x.max() <= 1
    # class means differ far more than the noise level: a nearest-class-mean classifier works
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    xt, yt = make_synthetic_images(200, size=16, seed=5)
    pred = ((xt[:, None] - means[None]) ** 2).flatten(2).sum(2).argmin(1)
    assert (pred == yt).float().mean() > 0.9


def test_class_balanced_subset():
    y = torch.arange(100) % 10
    idx = class_balanced_subset(y, 3, seed=1)
    assert len(idx) == 30 and torch.equal(torch.bincount(y[idx]), torch.full((10,), 3))
    assert torch.equal(idx, class_balanced_subset(y, 3, seed=1))


def test_augmentation_crops_and_flips_on_device():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    same = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(same, x)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = augment_crop_flip(x, g1, pad=2, flip=True)
    off = torch.randint(0, 5, (2, 2), generator=g2)  # the same draws, replayed by hand
    flip = torch.rand(2, generator=g2) < 0.5
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        want = xp[b, :, off[0, b]:off[0, b] + 6, off[1, b]:off[1, b] + 6]
        assert torch.equal(out[b], want.flip(2) if flip[b] else want)
    x = torch.rand(2000, 1, 4, 4)
    many = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    flipped = (many != x).flatten(1).any(1).float().mean()
    assert 0.45 < flipped < 0.55  # each image is flipped with probability 1/2


def test_cifar101_reader(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10.1 not found"):
        read_cifar101(tmp_path)
    base = tmp_path / "cifar10.1"
    base.mkdir()
    data = rng(4).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.save(base / "cifar10.1_v6_data.npy", data)
    np.save(base / "cifar10.1_v6_labels.npy", np.arange(6) % 10)
    x, y = read_cifar101(tmp_path)
    assert x.shape == (6, 3, 32, 32) and y.dtype == np.int64
    np.testing.assert_array_equal(x[2, 1], data[2, :, :, 1])
    np.save(base / "cifar10.1_v6_labels.npy", np.arange(5))
    with pytest.raises(DataError, match="corrupt CIFAR-10.1"):
        read_cifar101(tmp_path)


def test_imagenet_folder_missing_is_clear_and_does_not_import_torchvision(tmp_path):
    import sys
    with pytest.raises(DataError, match="ImageNet not found: expected"):
        common.ImageNetFolder(tmp_path)
    assert "torchvision" not in sys.modules


def write_mnist(root, labels=(1, 2, 3), swap=False):
    base = root / "mnist"
    base.mkdir(parents=True, exist_ok=True)
    for p in ("train", "t10k"):
        imgs, labs = idx_bytes(np.zeros((3, 28, 28), np.uint8)), idx_bytes(np.array(labels, np.uint8))
        (base / f"{p}-images-idx3-ubyte").write_bytes(labs if swap else imgs)
        (base / f"{p}-labels-idx1-ubyte").write_bytes(imgs if swap else labs)


def test_mnist_labels_out_of_range_or_swapped_files_are_one_clear_error(tmp_path):
    write_mnist(tmp_path, labels=(1, 2, 12))
    with pytest.raises(DataError, match="labels .* values 1..12, expected 0..9"):
        read_mnist(tmp_path)
    write_mnist(tmp_path, swap=True)
    with pytest.raises(DataError, match="files swapped"):
        read_mnist(tmp_path)


def test_mnist_arrays_are_writable(tmp_path):
    # np.frombuffer gives read-only arrays, and torch.from_numpy warns on each load otherwise
    write_mnist(tmp_path)
    assert all(v.flags.writeable for v in read_mnist(tmp_path).values())


def test_digits_from_data_root_and_corrupt_digits_files(tmp_path):
    from common import DIGITS_FILE
    with np.load(DIGITS_FILE) as z:
        images, labels = z["images"], z["labels"]
    np.savez(tmp_path / "digits.npz", images=images[::-1].copy(), labels=labels[::-1].copy())
    mine, bundled = load_digits(root=tmp_path), load_digits()
    assert not torch.equal(mine["x_train"], bundled["x_train"])  # --data-root is honoured
    assert torch.equal(load_digits(root=tmp_path / "elsewhere")["x_train"], bundled["x_train"])  # else the bundled file
    (tmp_path / "digits.npz").write_bytes((DIGITS_FILE).read_bytes()[:500])  # truncated
    with pytest.raises(DataError, match="corrupt digits file"):
        load_digits(root=tmp_path)
    np.savez(tmp_path / "digits.npz", pictures=images, labels=labels)  # wrong key
    with pytest.raises(DataError, match="corrupt digits file"):
        load_digits(root=tmp_path)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels + 5)  # labels out of range
    with pytest.raises(DataError, match="corrupt digits file"):
        load_digits(root=tmp_path)
