"""exp_spheres.py end to end through subprocess, plus the separability check of Figs 1/7."""
import json
import pathlib
import subprocess
import sys

import torch

from common import DeepLinear, make_spheres

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from exp_spheres import joint_pca, quadratic_separability  # noqa: E402
from emulated_cuda import command  # noqa: E402


def run(*args, timeout=None, gpu=False):  # no fixed limit: a slow machine is not a failure
    return subprocess.run(command("exp_spheres.py", *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_both_figures(tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--out", out, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    fig1 = [x for x in res["records"] if x["artifact"] == "fig1"]
    assert {(x["norm"], x["layer"]) for x in fig1} == {(n, ly) for n in ("bn", "none") for ly in (0, 2, 4, 6)}
    assert all(x["separability"] == 1.0 for x in fig1 if x["norm"] == "none")  # one linear map: still nested
    finals = [x for x in res["records"] if x["artifact"] == "fig8" and x["epoch"] == "final"]
    want = {("none", 0.001), ("none", 0.01), ("none", 0.1), ("bn", 0.001), ("bn", 0.01)}
    assert {(x["norm"], x["lr"]) for x in finals} == want
    assert len(finals) == 10 and all("noisy_test_acc" in x for x in finals if x["status"] == "ok")
    curves = [x for x in res["records"] if x["artifact"] == "fig8" and x["epoch"] != "final"]
    assert all(0.0 <= x["train_acc"] <= 1.0 for x in curves)
    for name in ("fig1.png", "fig8.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.md").read_text()
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").read_text() == table


def test_fig1_separability_without_bn_is_exact_and_bn_mixes_the_batches():
    # Without BN the deep linear net is one affine map, so the nested circles stay separable by a
    # quadratic in the joint 2-PC projection; with BN (train mode) each batch gets its own affine map.
    g = torch.Generator().manual_seed(3)
    batches = [make_spheres(16, generator=g) for _ in range(2)]
    y = torch.cat([b[1] for b in batches])
    seps = {}
    for norm in ("none", "bn"):
        torch.manual_seed(0)
        net = DeepLinear(2, 128, 16, 2, norm, bn_momentum=None).double().train()
        with torch.no_grad():
            outs = [net.layer_outputs(x.double())[14] for x, _ in batches]
        a, b = joint_pca(*outs)
        seps[norm] = quadratic_separability(torch.cat([a, b]), y)
    assert seps["none"] == 1.0
    assert seps["bn"] < 1.0  # measured: the classes of the two batches overlap at layer 14


def test_bad_flags():
    r = run("--batch-points", "5")
    assert r.returncode == 2 and "expected an even number >= 4" in r.stderr
    assert run("--help").returncode == 0
