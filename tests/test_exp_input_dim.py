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
    table = (out / "table.md").read_text()
    assert "Table 11" in table and "Table 12" in table and "Table 7" in table
    assert (out / "fig4.png").read_bytes()[:4] == b"\x89PNG" and (out / "fig4_activations.npz").exists()
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").read_text() == table


def test_missing_mnist_is_one_clear_line(tmp_path):
    r = run("--dataset", "mnist", "--data-root", tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "mnist not found" in r.stderr
