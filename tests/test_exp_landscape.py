"""exp_landscape.py end to end through subprocess: every artifact's smoke run, plot-only and bad input.
(The probe's bit-identical-state guarantee is a unit test in test_training.py.)"""
import json
import math
import pathlib
import subprocess

import pytest
from emulated_cuda import command

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, timeout=None, gpu=False):  # no fixed limit: a slow machine is not a failure
    return subprocess.run(command("exp_landscape.py", *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


VARIANTS = {"fig9": {"resnet20 shortcut", "resnet20 no shortcut", "resnet56 shortcut", "resnet56 no shortcut",
                     "resnet20 fixup"},
            "fig14": {"none", "bn", "in", "ln", "gn"}, "fig15": {"none", "bn"}, "fig16": {"shortcut", "no shortcut"},
            "fig17": {"resnet20 bn", "resnet20 fixup", "resnet56 bn", "resnet56 fixup"}}  # P1 Fig 17's caption


@pytest.mark.parametrize("artifact", ["fig9", "fig14", "fig15", "fig16", "fig17"])
def test_smoke_artifact(tmp_path, artifact):
    out = tmp_path / artifact
    # (fig15: VGG16 x 2 norms keeps the test short; the others train one epoch. The probes of fig14-17 are one code
    # path: fig15 runs it on the emulated GPU, which costs 1.5x; fig9's per-epoch metrics run there in exp_ligs_trend)
    extra = ["--norm", "none", "bn"] if artifact == "fig15" else ["--epochs", "1", "--milestones", "--probe-epochs", "1"]
    r = run("--preset", "smoke", "--artifact", artifact, "--out", out, *extra, gpu=artifact == "fig15")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    recs = res["records"]
    assert {x["variant"] for x in recs} == VARIANTS[artifact]
    if artifact == "fig9":
        for v in VARIANTS[artifact]:
            rows = [x for x in recs if x["variant"] == v]
            assert rows[0]["epoch"] == 0 and "ligs" in rows[0] and "clean_acc" in rows[0]
    else:
        probes = [x for x in recs if "step" in x]
        assert {x["variant"] for x in probes} == VARIANTS[artifact]
        for x in probes:
            assert x["step"] % 10 == 0
            vals = [x[k] for k in ("loss_min", "loss_max", "gdiff_min", "gdiff_max", "beta")]
            assert all(math.isfinite(v) for v in vals), x
            assert x["loss_min"] <= x["loss_max"] and x["gdiff_min"] <= x["gdiff_max"] and x["beta"] >= 0
    assert (out / f"{artifact}.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "table.md").read_text()
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").read_text() == table


def test_help_and_bad_input(tmp_path):
    assert run("--help").returncode == 0
    r = run("--artifact", "fig14", "--data-root", tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "cifar10 not found" in r.stderr
    r = run("--artifact", "fig99")
    assert r.returncode == 2 and "invalid choice: 'fig99'" in r.stderr
