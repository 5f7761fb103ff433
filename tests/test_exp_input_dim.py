"""exp_input_dim.py end to end through subprocess (digits stand-in, smoke preset)."""
import json
import math
import pathlib
import subprocess
from emulated_cuda import command

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, timeout=None, gpu=False):  # no fixed limit: a slow machine is not a failure
    return subprocess.run(command("exp_input_dim.py", *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_all_tables_and_fig4(tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--out", out, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    recs = res["records"]
    t11 = [x for x in recs if x["table"] == "t11"]
    assert {(x["k"], x["lam"]) for x in t11} == {(1, 0), (2, 0), (3, 0), (4, 0), (2, 0.01), (3, 0.0225), (4, 0.05)}
    for x in t11:
        if x["status"] == "ok":
            # FGSM never lowers the loss of a linear model (it ascends a convex loss's linearization)
            assert x["loss_fgsm01"] >= x["loss_fgsm005"] >= x["loss_clean"] - 1e-6 and x["acc_fgsm01"] <= x["acc_clean"]
    t6 = {(x["k"], x["norm"]) for x in recs if x["table"] == "t6"}
    assert t6 == {(k, n) for k in (1, 2, 3) for n in ("none", "bn")}
    assert {(x["k"], x["lam"]) for x in recs if x["table"] == "t7"} == {(2, 0.01), (3, 0.0225)}
    for x in recs:
        if x["table"] != "t11" and x["status"] == "ok":
            for m in ("acc_clean", "acc_noise", "acc_bim"):
                assert 0 <= x[m] <= 1 and math.isfinite(x[m.replace("acc", "loss")])
            assert 0 <= x["min_eps_bim"] <= 4 * 0.1 and 0 <= x["min_eps_bim_censored"] <= 1  # budget-free BIM
    table = (out / "table.md").read_text()
    assert "Table 11" in table and "Table 12" in table and "Table 7" in table
    assert (out / "fig4.png").read_bytes()[:4] == b"\x89PNG" and (out / "fig4_activations.npz").exists()
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").read_text() == table


def test_missing_mnist_is_one_clear_line(tmp_path):
    r = run("--dataset", "mnist", "--data-root", tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "mnist not found" in r.stderr


def write_mnist_from_digits(root):
    """MNIST's idx files (28x28 uint8) holding the bundled digits upscaled: a realistic small stand-in."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from common import load_digits
    from test_data import idx_bytes
    d = load_digits()
    base = root / "mnist"
    base.mkdir(parents=True)
    for split, (xs, ys) in (("train", (d["x_train"], d["y_train"])), ("t10k", (d["x_test"], d["y_test"]))):
        x = F.interpolate(torch.as_tensor(np.asarray(xs), dtype=torch.float32).reshape(len(ys), 1, 8, 8), size=28,
                          mode="bilinear").squeeze(1)
        x = (x / x.max() * 255).round().clamp(0, 255).numpy().astype(np.uint8)
        (base / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (base / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.asarray(ys, np.uint8)))


def test_appb_invariance_examples_on_mnist_format_files(tmp_path):
    """P2 App. B on MNIST-format files written here: the weight-decay and BN MLPs at 28x28 are scored on the 100
    bundled invariance-based examples against their oracle labels; the claims and table name both files."""
    write_mnist_from_digits(tmp_path / "data")
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--artifact", "appb", "--dataset", "mnist", "--data-root", tmp_path / "data",
            "--mlp-epochs", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads((out / "results.json").read_text())["records"]
    assert sorted((x["variant"], x["norm"], x["lam"]) for x in recs) == [("bn", "bn", 0.0), ("wd", "none", 0.01)]
    for x in recs:
        assert x["status"] == "ok" and all(0 <= x[f"acc_automated_eps0{e}"] <= 1 for e in (3, 4))
    claims = (out / "claims.md").read_text()
    assert "automated_eps03" in claims and "automated_eps04" in claims and "86 vs 74" in claims
    assert "invariance-based examples" in (out / "table.md").read_text()


def test_appb_needs_mnist_and_intact_files(tmp_path):
    r = run("--preset", "quick", "--artifact", "appb")  # the digits: no 28x28 models
    assert r.returncode == 2 and "needs --dataset mnist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    import shutil
    import exp_input_dim
    folder = tmp_path / "inv"
    shutil.copytree(ROOT / "data" / "excessive_invariance", folder)
    x, y = exp_input_dim.read_invariance_examples(folder, "automated_eps03")  # the bundled files are the published ones
    assert x.shape == (100, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and set(y.tolist()) <= set(range(10))
    f = folder / "invariance_examples" / "linf" / "automated_eps04_labels.npy"
    f.write_bytes(f.read_bytes()[:-1] + b"\x01")
    import pytest
    from common import DataError
    with pytest.raises(DataError, match="sha256"):
        exp_input_dim.read_invariance_examples(folder, "automated_eps04")
