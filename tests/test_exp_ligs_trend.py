"""exp_ligs_trend.py end to end through subprocess: every artifact's smoke run, the quoted user command
without CIFAR-10, plot-only and skips."""
import json
import math
import pathlib
import subprocess

import pytest
from emulated_cuda import command

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, timeout=None, gpu=False):  # no fixed limit: a slow machine is not a failure
    return subprocess.run(command("exp_ligs_trend.py", *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def records_of(out):
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    return res["records"]


EXPECTED_VARIANTS = {
    "fig4": {f"{t} {n}" for t in ("standard", "adversarial") for n in ("none", "bn", "in", "ln", "gn")},
    "fig2": {"standard none", "standard bn"},
    "fig5": {"lambda=0", "lambda=0.1", "lambda=1", "lambda=10"},
    "fig8": {f"{f}={v}" for f, vs in {"width": [0.5, 1.0, 2.0], "depth": ["resnet18", "resnet34", "resnet50"],
                                        "act": ["relu", "leaky_relu", "selu"], "weight_decay": [0.0, 0.0005, 0.005],
                                        "lr": [0.01, 0.1, 0.5], "optimizer": ["sgd", "adagrad", "adam"]}.items() for v in vs},
}


@pytest.mark.parametrize("artifact", ["fig4", "fig2", "fig5", "fig8"])
def test_smoke_artifact(tmp_path, artifact):
    out = tmp_path / artifact
    r = run("--preset", "smoke", "--artifact", artifact, "--out", out, "--epochs", "1", "--milestones",  # (one epoch)
            gpu=artifact in ("fig2", "fig4"))  # (the emulated GPU costs 1.5x: two artifacts run on it)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records_of(out)
    assert {x["variant"] for x in recs} == EXPECTED_VARIANTS[artifact]
    for x in recs:
        assert {"artifact", "dataset", "arch", "norm", "seed", "epoch", "status"} <= set(x)
        if "ligs" in x and not math.isnan(x["ligs"]):
            assert -1.0 <= x["ligs"] <= 1.0 and 0.0 <= x["clean_acc"] <= 1.0 and 0.0 <= x["robust_acc"] <= 1.0
    for variant in EXPECTED_VARIANTS[artifact]:  # epoch 0 is measured before any training step
        rows = [x for x in recs if x["variant"] == variant]
        assert rows[0]["epoch"] == 0 and "ligs" in rows[0]
        if rows[0]["status"] == "ok":
            assert [x["epoch"] for x in rows] == [0, 1]
            assert 0 <= rows[-1]["min_eps_l2"] <= 4 * 0.25 and "min_eps_l2" not in rows[0]  # the final model's
            assert all("ligs_dm" in x for x in rows)  # 16x16 inputs: LIGS also at the dimension-matched sigma
    if artifact == "fig2":
        assert all({"ligs_uniform", "ligs_fgsm", "ligs_pgd"} <= set(x) for x in recs if "ligs" in x)
    if artifact == "fig4":
        assert {x["training"] for x in recs} == {"standard", "adversarial"}
        assert (out / "fig3_scatter.png").exists()
    assert (out / f"{artifact}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| variant | status |" in (out / "table.md").read_text()
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").exists()


def test_the_quoted_command_without_cifar10_is_one_clear_line():
    r = run("--norm", "bn")  # paper preset: CIFAR-10 under ./data, which holds only the bundled digits
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar10 not found" in lines[0] and "--download" in lines[0] and "--preset quick" in lines[0]
    assert r.stdout == ""  # a failed start prints only the error line (and creates no run directory)


def test_help_skip_and_bad_flags(tmp_path):
    assert run("--help").returncode == 0
    r = run("--artifact", "fig11", "--data-root", tmp_path, "--out", tmp_path / "f")  # ImageNet's 100-class substitute
    assert r.returncode != 0 and "ImageNet not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("--norm", "batch")
    assert r.returncode == 2 and "invalid choice: 'batch'" in r.stderr
    r = run("--preset", "smoke", "--per-class", "0", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--per-class 0: expected an integer >= 1" in r.stderr
