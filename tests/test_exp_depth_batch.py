"""exp_depth_batch.py end to end through subprocess: the smoke grid, cell-by-cell resume, plot-only."""
import json
import pathlib
import subprocess
import sys

from emulated_cuda import command
from paused import start_paused

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, timeout=None, gpu=False):  # no fixed limit: a slow machine is not a failure
    return subprocess.run(command("exp_depth_batch.py", *args, gpu=gpu), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_grid(tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--out", out, gpu=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] is True
    recs = res["records"]
    assert {(x["norm"], x["depth"], x["batch"]) for x in recs} == {(n, d, b) for n in ("bn", "none") for d in (2, 6)
                                                                 for b in (8, 32)}
    for x in recs:
        assert x["lr"] == 1e-3 * x["batch"]  # eta proportional to the batch size
        if x["status"] == "ok":
            assert 0 <= x["acc_bim"] <= x["acc_clean"] + 0.02
            assert 0 <= x["min_eps_bim"] <= 4 * 0.1 and 0 <= x["min_eps_bim_censored"] <= 1  # budget-free BIM
            assert 0 <= x["entropy_bits"] <= 10.6  # at most log2(1500 training images)
    table = (out / "table.md").read_text()
    assert "B=8: 27.5" in table  # Yang et al.'s depth limit for B = 8
    for name in ("heatmaps.png", "entropy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").read_text() == table


def records(out):
    return json.loads((out / "results.json").read_text())["records"]


def start(*args):
    return subprocess.Popen([sys.executable, "exp_depth_batch.py", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_shards_in_parallel_and_a_killed_shard_resumed_equal_one_process(tmp_path):
    """--shard K/N: two shards in parallel into one directory, one of them killed after its first cell: --plot-only
    builds what exists and lists the missing cells, the killed shard resumed with --resume completes the set, and
    the records are those of one process. (Merging several directories: tests/test_scale_out.py.)"""
    args = ["--preset", "smoke", "--depths", "2", "4", "6", "--batches", "32", "--epoch-scale", "0.5"]
    ref = tmp_path / "ref"
    assert run(*args, "--out", ref).returncode == 0
    want = records(ref)
    assert len(want) == 6
    shared = tmp_path / "shared"
    procs = [start(*args, "--out", shared, "--shard", "0/2"),  # shard 1 of 2 (cells 1, 3, 5) pauses after its first
             start_paused("exp_depth_batch.py", [*args, "--out", shared, "--shard", "1/2"])]  # cell (bn, L=4)
    procs[1].kill()  # and is killed there
    procs[1].wait()
    assert procs[0].wait() == 0, procs[0].stderr.read()[-2000:]
    r = run("--plot-only", shared)  # partial: tables from what exists, the missing runs listed
    assert r.returncode == 0 and "runs are missing" in r.stdout
    assert 1 <= len((shared / "missing.txt").read_text().split()) <= 3
    assert (shared / "log.shard-0-of-2.txt").exists() and (shared / "table.md").exists()
    r = run(*args, "--out", shared, "--resume", "--shard", "1/2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert records(shared) == want and json.loads((shared / "results.json").read_text())["finished"] is True
    assert len(list((shared / "records").glob("*.json"))) == 6 and not (shared / "missing.txt").exists()
    r = run(*args, "--epoch-scale", "1", "--out", shared, "--shard", "0/2")  # joining a run with other settings
    assert r.returncode != 0 and "error: --out" in r.stderr and "epoch_scale" in r.stderr
