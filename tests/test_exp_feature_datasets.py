"""exp_feature_datasets.py end to end through subprocess: a smoke run that builds D_R and D_conflict and
trains on D_conflict, a build killed mid-way and resumed (the same datasets as an uninterrupted build),
Ilyas et al.'s released sets in their exact format, user source checkpoints, --plot-only, and one-line
errors for bad input."""
import json
import pathlib
import signal
import subprocess
import sys

import torch

from test_data import write_cifar10
from test_invert import write_release
from emulated_cuda import command
from paused import start_paused

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = "exp_feature_datasets.py"


def run(*args, gpu=False):  # no fixed time limit: a slow machine is not a failure
    return subprocess.run(command(SCRIPT, *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True)


def datasets_of(run_dir):
    return {p.parent.name.split("-")[0]: torch.load(p, weights_only=False)
            for p in sorted((run_dir / "datasets").glob("*/data.pt"))}


def test_fig7_smoke_builds_trains_and_redraws(tmp_path):
    out = tmp_path / "fig7"
    r = run("--preset", "smoke", "--artifact", "fig7", "--out", out, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    metas = {m["kind"]: m for m in res["records"] if m.get("record") == "dataset"}
    assert set(metas) == {"d_r", "d_conflict"}  # D_conflict starts from D_R
    assert metas["d_conflict"]["from_d_r"] == metas["d_r"]["key_hash"]
    assert 0 <= metas["d_conflict"]["success_rate"] <= 1 and metas["d_r"]["feature_dist_median"] > 0
    assert metas["d_r"]["source"]["role"] == "robust" and metas["d_conflict"]["source"]["role"] == "standard"
    assert all(m["floor_ratio"] > 0 for m in metas.values())
    data = datasets_of(out)
    d_r, d_c = data["d_r"], data["d_conflict"]
    assert d_r["x"].dtype == torch.uint8 and d_r["x"].shape == (48, 3, 16, 16) and len(d_r["y"]) == 48
    assert torch.equal(d_c["y"], (d_r["y"] + 1) % 10)  # attacked towards t_R + 1, labelled so
    epochs = [r for r in res["records"] if "epoch" in r]
    assert {(r["norm"], r["seed"]) for r in epochs} == {("none", 0), ("bn", 0)}
    last = [r for r in epochs if r["epoch"] == 2]
    assert all(0 <= r["rf_acc"] <= 1 and r["nrf_acc"] == r["clean_acc"] for r in last)
    assert [c["id"] for c in res["claims"]] == ["fig7_bn_rf_falls", "fig7_bn_nrf_overtakes", "fig7_none_rf",
                                                 "fig7_bn_vs_none"]
    assert all(c["verdict"] == "inconclusive" for c in res["claims"])  # one seed
    table = (out / "table.md").read_text()
    assert "| D_conflict | bn | 1 |" in table and "throughput / floor" in table
    (out / "table.md").unlink()
    r = run("--plot-only", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "table.md").read_text() == table


def test_start_images_have_another_label(tmp_path):
    out = tmp_path / "b"
    r = run("--preset", "smoke", "--artifact", "fig6", "--norm", "bn", "--epochs", "1", "--milestones", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    data = datasets_of(out)
    from common import build_dataset
    y_train = build_dataset("synthetic", n_train=1000).y_train
    d_r = data["d_r"]
    assert (y_train[d_r["start"]] != d_r["y"]).all() and torch.equal(d_r["y"], y_train[d_r["index"]])
    d_rand = data["d_rand"]
    assert d_rand["y"].min() >= 0 and d_rand["y"].max() <= 9 and len(d_rand["success"]) == 48


def sets_in(folder):
    return {p.parent.name.split("-")[0]: torch.load(p, weights_only=False) for p in sorted(folder.glob("*/data.pt"))}


def assert_same_datasets(a, b):
    assert set(a) == set(b) == {"d_r", "d_nr", "d_rand", "d_det", "d_conflict"}
    for kind in a:
        assert torch.equal(a[kind]["x"], b[kind]["x"]) and torch.equal(a[kind]["y"], b[kind]["y"]), kind


def test_killed_build_resumes_to_the_same_datasets(tmp_path):
    common_args = ["--preset", "smoke", "--artifact", "build", "--n-build", "32", "--chunk", "8", "--inv-steps", "4",
                   "--attack-steps", "4"]
    whole = tmp_path / "whole"
    r = run(*common_args, "--out", whole)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = tmp_path / "killed"
    # killed once D_R is done and D_NR's third chunk is on disk (the script pauses there: tests/paused.py)
    proc = start_paused("exp_feature_datasets.py", [*common_args, "--out", killed], "save_atomic",
                        when="'d_nr-' in str(a[1]) and str(a[1]).endswith('chunk_00002.pt')")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = next(killed.glob("datasets/d_nr-*"))
    assert not (folder / "data.pt").exists() and list(folder.glob("chunk_*.pt"))  # killed mid-way
    r = run("--resume", "--out", killed)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout  # the sources came from their checkpoints
    assert_same_datasets(datasets_of(whole), datasets_of(killed))
    assert not list(killed.glob("datasets/*/chunk_*.pt"))  # merged and tidied
    assert (killed / "figure.png").exists()


def test_sharded_build_gives_the_same_datasets(tmp_path):
    """--artifact build --shard K/2, both shards in parallel into one run directory and rerun with --resume until no
    shard waits: the datasets of one process, bit for bit. The shards take the sources from the reference run's
    cache (training them in parallel is the first pass of a build from scratch: one pass more)."""
    args = ["--preset", "smoke", "--artifact", "build", "--n-build", "16", "--chunk", "8", "--inv-steps", "4",
            "--attack-steps", "4", "--cache", str(tmp_path / "cache")]
    assert run(*args, "--out", tmp_path / "one").returncode == 0
    sharded, printed = tmp_path / "sharded", ""
    for n_pass in range(4):
        procs = [subprocess.Popen([sys.executable, SCRIPT, *args, "--out", str(sharded), "--shard", f"{k}/2",
                                   "--datasets-dir", str(tmp_path / "sharded_sets"), *(["--resume"] if n_pass else [])],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
        outs = [p.communicate() for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        printed += "".join(o[0] for o in outs)
        if not any("still to come" in o[0] for o in outs):
            break
    assert n_pass <= 2, n_pass  # chunks, then (if D_R was not assembled in time) D_conflict's chunks
    assert "source model (trained by shard" not in printed and "[source standard] epoch" not in printed
    assert_same_datasets(sets_in(tmp_path / "cache" / "feature_datasets"), sets_in(tmp_path / "sharded_sets"))


def test_released_datasets_and_user_source_checkpoints(tmp_path):
    write_cifar10(tmp_path, n=8)
    for folder in ("robust_CIFAR", "drand_CIFAR"):
        write_release(tmp_path, folder, n=(6, 4))
    out = tmp_path / "rel"
    r = run("--preset", "smoke", "--artifact", "fig6", "--dataset", "cifar10", "--datasets-from", "released",
            "--data-root", tmp_path, "--norm", "bn", "--epochs", "1", "--milestones", "--per-class", "1", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    metas = [m for m in json.loads((out / "results.json").read_text())["records"] if m.get("record") == "dataset"]
    assert [(m["kind"], m["n"], m["origin"]) for m in metas] == [("d_r", 10, "released"), ("d_rand", 10, "released")]
    # a user's own source checkpoint (a state_dict of the source architecture) replaces training one
    from common import make_model
    torch.manual_seed(0)
    src = make_model("resnet18", norm="bn", width=1 / 16, gn_groups=2)
    torch.save(src.state_dict(), tmp_path / "std.pt")
    out2 = tmp_path / "own"
    r = run("--preset", "smoke", "--artifact", "build", "--source-std", tmp_path / "std.pt", "--source-rob",
            tmp_path / "std.pt", "--n-build", "8", "--chunk", "8", "--out", out2)
    assert r.returncode == 0, r.stderr[-3000:]
    metas = [m for m in json.loads((out2 / "results.json").read_text())["records"] if m.get("record") == "dataset"]
    assert {m["source"]["origin"] for m in metas} == {str(tmp_path / "std.pt")} and not (out2 / "ckpt").exists()
    torch.save({"wrong": torch.zeros(3)}, tmp_path / "bad.pt")
    r = run("--preset", "smoke", "--artifact", "build", "--source-std", tmp_path / "bad.pt", "--out", tmp_path / "x")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not a state_dict" in r.stderr


def test_bad_input_is_one_clear_line(tmp_path):
    cases = [(["--artifact", "fig7", "--datasets-from", "released", "--dataset", "cifar10"], "never released"),
             (["--datasets-from", "released", "--dataset", "digits"], "are CIFAR-10"),
             (["--source-std", tmp_path / "none.pt"], "no such file"),
             (["--inv-step", "0"], "--inv-step 0.0: expected a finite number > 0"),
             (["--n-build", "0"], "--n-build 0: expected an integer >= 1")]
    for extra, message in cases:
        r = run("--preset", "smoke", *extra, "--out", tmp_path / "o")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    write_cifar10(tmp_path, n=4)  # CIFAR-10 present, the released sets not
    r = run("--preset", "smoke", "--artifact", "fig6", "--datasets-from", "released", "--dataset", "cifar10",
            "--data-root", tmp_path, "--out", tmp_path / "o")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "datasets.tar" in r.stderr, r.stderr
