"""exp_corruption.py end to end through subprocess: smoke runs of every artifact (records, tables,
claims, figure, plot-only), released CIFAR-10-C files written here in their exact format, the checkpoint
cache shared with exp_table1.py, resume, and one-line errors for bad input."""
import json
import pathlib
import pickle
import subprocess

import numpy as np

from test_corruptions import write_cifar10c
from test_data import write_cifar10
from emulated_cuda import command

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["--corruptions", "gaussian_noise", "fog", "contrast", "frost", "--severities", "1", "5"]


def run(*args, script="exp_corruption.py", gpu=False):  # no fixed time limit: a slow machine is not a failure
    return subprocess.run(command(script, *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True)


def test_t7_smoke_adapts_bn_and_redraws(tmp_path):
    out = tmp_path / "t7"
    r = run("--preset", "smoke", "--artifact", "t7", "--arch", "vgg8", "--out", out, *SMALL, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped frost" in r.stdout
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 1 and recs[0]["status"] == "ok"
    rec = recs[0]
    for name in ("gaussian_noise", "fog", "contrast"):
        for s in (1, 5):
            assert 0 <= rec[f"acc_{name}_s{s}"] <= 1 and 0 <= rec[f"ada_{name}_s{s}"] <= 1
    assert not any(k.startswith("acc_frost") for k in rec)
    table = (out / "table.md").read_text()
    assert "Skipped: frost" in table and "BN statistics adaptation (P1 Table 7)" in table
    claims = json.loads((out / "results.json").read_text())["claims"]
    assert [c["id"] for c in claims] == ["t7_adapt"] and claims[0]["verdict"] == "inconclusive"  # one seed
    (out / "table.md").unlink()
    r = run("--plot-only", out)
    assert r.returncode == 0, r.stderr
    assert (out / "table.md").read_text() == table and (out / "figure.png").exists()


def test_fig1_and_p2_t4_smoke(tmp_path):
    r = run("--preset", "smoke", "--artifact", "fig1", "--arch", "vgg8", "--norm", "none", "bn", "--out", tmp_path / "f",
            *SMALL, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((tmp_path / "f" / "results.json").read_text())["records"]
    assert {(x["norm"], x["training"]) for x in recs} == {(n, t) for n in ("none", "bn") for t in ("standard", "adversarial")}
    ids = {c["id"] for c in json.loads((tmp_path / "f" / "results.json").read_text())["claims"]}
    assert {"fig1_adv_noise", "fig1_bn_noise", "fig1_bn_fog_contrast"} <= ids
    r = run("--preset", "smoke", "--artifact", "p2_t4", "--arch", "vgg8", "--out", tmp_path / "p", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "p" / "table.md").read_text()
    assert "Gap (P2 Sec. 3)" in table and "| vgg8 | standard | none − bn |" in table and "| vgg8 | bn | gaussian |" in table
    ids = {c["id"] for c in json.loads((tmp_path / "p" / "results.json").read_text())["claims"]}
    assert {"p2t4_noise_cells_none", "p2t4_mce_none", "p2t4_clean_none"} <= ids


def fake_cifar(tmp_path, n=12, learnable=False):
    """CIFAR-10 batches and CIFAR-10-C files in their real formats (random pixels; with `learnable`, each
    image's brightness encodes its label, so that a tiny model trains in a few epochs)."""
    made = write_cifar10(tmp_path, n=n)
    if learnable:
        for name, (data, labels) in made.items():
            data[:] = (np.asarray(labels)[:, None] * 25 + data % 8).astype(np.uint8)
            with open(tmp_path / "cifar-10-batches-py" / name, "wb") as f:
                pickle.dump({b"labels": labels, b"data": data}, f, protocol=2)
    write_cifar10c(tmp_path, made["test_batch"][1], names=("fog", "gaussian_noise"))
    return made


def test_released_files_are_read_and_a_cached_exp_table1_model_is_reused(tmp_path):
    fake_cifar(tmp_path, n=100, learnable=True)
    cache = tmp_path / "cache"
    common = ["--preset", "smoke", "--dataset", "cifar10", "--data-root", tmp_path, "--arch", "vgg8", "--norm", "bn",
              "--cache", cache, "--epochs", "4", "--width", "0.0625", "--gn-groups", "2", "--batch-size", "32",
              "--lr", "0.02", "--weight-decay", "0.0005", "--warmup-epochs", "0"]
    r = run(*common, "--artifact", "p2_t2", "--out", tmp_path / "t1", script="exp_table1.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(cache.glob("*.pt"))) == 1
    r = run(*common, "--artifact", "p2_t4", "--out", tmp_path / "c", "--corruptions", "fog", "gaussian_noise",
            "--severities", "1", "2", "3", "4", "5", "--n-eval", "40")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "released CIFAR-10-C" in r.stdout and "resumed from" in r.stdout  # exp_table1's checkpoint, not retrained
    assert len(list(cache.glob("*.pt"))) == 1
    rec = json.loads((tmp_path / "c" / "results.json").read_text())["records"][0]
    assert rec["status"] == "ok", rec
    assert all(0 <= rec[f"acc_fog_s{s}"] <= 1 for s in range(1, 6))


def test_bad_input_is_one_clear_line(tmp_path):
    cases = [(["--severities", "0"], "--severities 0: expected integers in 1..5"),
             (["--corruptions", "rain"], "invalid choice: 'rain'"),
             (["--dataset", "svhn"], "--dataset: invalid choice: 'svhn'"),
             (["--frost-dir", tmp_path / "nope"], "--frost-dir"),
             (["--seeds", "0"], "--seeds 0: expected an integer >= 1")]
    for extra, msg in cases:
        r = run("--preset", "smoke", "--out", tmp_path / "x", *extra)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    fake_cifar(tmp_path)
    labels = np.load(tmp_path / "CIFAR-10-C" / "labels.npy")
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", labels[:-1])  # truncated labels file
    r = run("--preset", "smoke", "--dataset", "cifar10", "--data-root", tmp_path, "--corruptions", "fog", "--out",
            tmp_path / "y")
    assert r.returncode != 0 and "labels.npy" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "y").exists()  # nothing is written before the inputs are checked
    r = run("--preset", "smoke", "--dataset", "cifar10", "--data-root", tmp_path / "none", "--out", tmp_path / "z")
    assert r.returncode != 0 and "cifar10 not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_keeps_finished_models(tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "smoke", "--artifact", "p2_t4", "--arch", "vgg8", "--corruptions", "fog", "--severities", "1"]
    r = run(*args, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    first = res["records"][0]
    files = sorted((out / "records").glob("*.json"), key=lambda f: json.loads(f.read_text())["index"])
    assert len(files) == 2
    files[1].unlink()  # as if killed after the first model
    r = run("--resume", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((out / "results.json").read_text())["records"]
    assert len(recs) == 2 and recs[0] == first and "model 1 of 1 done here (2 in the run)" in r.stdout
