"""exp_table1.py end to end through subprocess (CleanRL style): smoke preset, records, plot-only,
no silent overwrite, resume after a real kill, and one-line errors for bad input."""
import json
import pathlib
import pickle
import subprocess
import sys
import time

import numpy as np
import torch

from common import NORMS, make_synthetic_images
from emulated_cuda import command

ROOT = pathlib.Path(__file__).resolve().parent.parent
METRICS = ["acc_clean", "acc_noise", "acc_pgd_l2", "acc_pgd_linf", "acc_cw_l2", "acc_cw_linf", "acc_fgsm"]


def run(*args, timeout=None, gpu=False):  # no fixed limit: a slow machine is not a failure
    return subprocess.run(command("exp_table1.py", *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_preset_writes_records_table_and_figure(tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--epochs", "2", "--out", out, "--first-seed", "1", "--arch-lr", "vgg8=0.02",
            gpu=True)  # (the preset's epochs less one: time)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config: " in r.stdout  # the resolved configuration is printed at start
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    assert json.loads((out / "config.json").read_text())["device"] == "cuda"  # on the emulated GPU
    recs = res["records"]
    assert {(x["arch"], x["norm"]) for x in recs} == {(a, n) for a in ("vgg8", "resnet18") for n in NORMS}
    for x in recs:
        assert {"artifact", "dataset", "arch", "norm", "seed", "status"} <= set(x) and x["dataset"] == "synthetic"
        assert x["seed"] == 1 and x["lr"] == 0.02  # --first-seed (--arch-lr: test_quick_rules)
    ok = [x for x in recs if x["status"] == "ok"]
    cfg_eps = dict(l2=json.loads((out / "config.json").read_text())["args"]["eps_l2"],
                   linf=json.loads((out / "config.json").read_text())["args"]["eps_linf"])
    assert len(ok) >= 6, [(x["arch"], x["norm"], x["reason"]) for x in recs if x["status"] != "ok"]
    for x in ok:
        assert all(0.0 <= x[m] <= 1.0 for m in METRICS), x
        # P2's clean generalization gap: eval-mode accuracy over the whole training set minus test accuracy
        assert 0.0 <= x["acc_train_eval"] <= 1.0 and x["gen_gap"] == x["acc_train_eval"] - x["acc_clean"]
        assert 0.0 < x["loss_train_eval"] < 2.3  # eval-mode training cross-entropy, below chance's log(10)
        assert x["acc_clean"] > 0.2  # well above chance on the synthetic task
        for m in ("acc_pgd_l2", "acc_pgd_linf", "acc_cw_l2", "acc_cw_linf"):
            assert x[m] <= x["acc_clean"] + 0.02, (m, x)  # an attack never helps (beyond float noise)
        for k in ("l2", "linf"):  # budget-free statistics beside the accuracies
            assert 0 <= x[f"min_eps_{k}"] <= 16 * cfg_eps[k] and 0 <= x[f"min_eps_{k}_censored"] <= 1
            assert len(x[f"curve_{k}"]) == 7 and 0 <= x[f"auc_{k}"] <= 1
            assert x[f"curve_{k}"] == sorted(x[f"curve_{k}"], reverse=True)  # accuracy falls with the budget
    assert all(x["reason"] for x in recs if x["status"] != "ok")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["preset"] == "smoke" and cfg["args"]["epochs"] == 2 and "git_commit" in cfg and "torch" in cfg
    assert (out / "code.py").read_text() == (ROOT / "exp_table1.py").read_text()
    assert len((out / "results.csv").read_text().strip().splitlines()) == len(recs) + 1
    table = (out / "table.md").read_text()
    assert "| synthetic | vgg8 | bn |" in table and "Difference to the unnormalized model" in table
    assert "median min ε ℓ2" in table and "(median minimal PGD budget)" in (out / "claims.md").read_text()
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (out / "table.md").unlink()
    (out / "figure.png").unlink()
    r = run("--plot-only", out)
    assert r.returncode == 0, r.stderr
    assert (out / "table.md").read_text() == table and (out / "figure.png").exists()

    r = run("--preset", "smoke", "--out", out)  # a finished run is never silently overwritten
    assert r.returncode != 0 and "already holds a run; pass --resume" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    args = ["--preset", "smoke", "--arch", "vgg8", "--norm", "none", "bn", "--epochs", "8"]
    ref = tmp_path / "ref"
    assert run(*args, "--out", ref).returncode == 0
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "exp_table1.py", *args, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline and not list((out / "ckpt").glob("*.pt")):
        time.sleep(0.01)
    p.kill()
    p.wait()
    assert p.returncode != 0, "the run finished before it could be interrupted"
    assert not (out / "results.json").exists() or not json.loads((out / "results.json").read_text())["finished"]
    r = run(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    strip = lambda recs: sorted([{k: v for k, v in x.items() if k != "time_s"} for x in recs], key=lambda x: x["norm"])
    got = strip(json.loads((out / "results.json").read_text())["records"])
    want = strip(json.loads((ref / "results.json").read_text())["records"])
    assert got == want


def test_bad_input_gives_one_clear_line(tmp_path):
    r = run("--dataset", "cifar10", "--data-root", tmp_path / "nothing", "--out", tmp_path / "r")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar10 not found" in lines[0] and "--download" in lines[0] and "--preset quick" in lines[0]
    r = run("--norm", "batchnorm")
    assert r.returncode == 2 and "argument --norm: invalid choice: 'batchnorm'" in r.stderr
    r = run("--preset", "smoke", "--epochs", "0", "--out", tmp_path / "z")
    assert r.returncode == 2 and "--epochs 0: expected an integer >= 1" in r.stderr
    r = run("--plot-only", tmp_path / "nowhere")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_help_and_the_imagenet_artifacts_without_files(tmp_path):
    r = run("--help")
    assert r.returncode == 0 and "--artifact" in r.stdout and "--preset" in r.stdout
    r = run("--artifact", "p2_t5", "--out", tmp_path / "a")  # nothing is skipped: it says which files it needs
    assert r.returncode != 0 and "needs --imagenet-root" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("--artifact", "p2_t5", "--imagenet-root", tmp_path, "--weights-dir", tmp_path, "--out", tmp_path / "b")
    assert r.returncode != 0 and "vgg11-8a719046.pth: missing" in r.stderr and not (tmp_path / "b").exists()


def write_fake_cifar(root):
    """Learnable synthetic images stored in the real CIFAR-10 pickle layout, plus CIFAR-10.1 .npy files."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = make_synthetic_images(200, size=32, seed=i)
        data = (x * 255).round().to(torch.uint8).reshape(200, -1).numpy()
        with open(base / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": y.tolist()}, f)
    x, y = make_synthetic_images(100, size=32, seed=9)
    (root / "cifar10.1").mkdir()
    np.save(root / "cifar10.1" / "cifar10.1_v6_data.npy", (x * 255).round().byte().permute(0, 2, 3, 1).numpy())
    np.save(root / "cifar10.1" / "cifar10.1_v6_labels.npy", y.numpy())


def test_p2_convention_on_cifar10_format_with_cifar101_and_bim(tmp_path):
    write_fake_cifar(tmp_path / "data")
    common_args = ["--preset", "smoke", "--dataset", "cifar10", "--arch", "vgg8", "--norm", "none", "bn",
                   "--data-root", tmp_path / "data", "--epochs", "4"]
    out = tmp_path / "p2t2"
    r = run("--artifact", "p2_t2", *common_args, "--out", out, "--attacks", "strong", "--min-eps-iters", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [x for x in json.loads((out / "results.json").read_text())["records"] if x["status"] == "ok"]
    assert recs, r.stdout[-3000:]
    for x in recs:  # P2 columns: clean, noise, PGD-linf, PGD-l2 (standardized space, clip [-2, 2]), CIFAR-10.1 clean/noise
        assert {"acc_clean", "acc_noise", "acc_pgd_linf", "acc_pgd_l2", "acc_c101_clean", "acc_c101_noise"} <= set(x)
        assert "acc_cw_l2" not in x and x["n_eval"] == 100 and "min_eps_l2" not in x
        for k in ("l2", "linf"):  # --attacks strong: the worst case includes the (deterministic) PGD itself
            assert x[f"acc_pgd_{k}_strong"] <= x[f"acc_pgd_{k}"] and x[f"sel_acc_pgd_{k}_strong"] <= x[f"sel_acc_pgd_{k}"]
    assert "(worst case of PGD, APGD-CE, APGD-DLR)" in (out / "claims.md").read_text()
    assert "CIFAR-10.1 clean" in (out / "table.md").read_text()
    out = tmp_path / "bim"
    r = run("--artifact", "p2_pgd_vs_bim", *common_args, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [x for x in json.loads((out / "results.json").read_text())["records"] if x["status"] == "ok"]
    assert recs and all("acc_bim" in x for x in recs)
