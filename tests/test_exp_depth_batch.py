"""exp_depth_batch.py end to end through subprocess: the smoke grid, cell-by-cell resume, plot-only."""
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*args, timeout=None):  # no fixed limit: a slow machine is not a failure
    return subprocess.run([sys.executable, "exp_depth_batch.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_grid(tmp_path):
    out = tmp_path / "run"
    r = run("--preset", "smoke", "--out", out)
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
            assert 0 <= x["entropy_bits"] <= 10.6  # at most log2(1500 training images)
    table = (out / "table.md").read_text()
    assert "B=8: 27.5" in table  # Yang et al.'s depth limit for B = 8
    for name in ("heatmaps.png", "entropy.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    (out / "table.md").unlink()
    assert run("--plot-only", out).returncode == 0 and (out / "table.md").read_text() == table


def test_interrupted_sweep_resumes_cell_by_cell(tmp_path):
    args = ["--preset", "smoke", "--depths", "2", "4", "6", "--batches", "8", "--epoch-scale", "0.5"]
    ref = tmp_path / "ref"
    assert run(*args, "--out", ref).returncode == 0
    out = tmp_path / "cut"
    p = subprocess.Popen([sys.executable, "exp_depth_batch.py", *args, "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        path = out / "results.json"
        if path.exists() and len(json.loads(path.read_text())["records"]) >= 2:
            break
        time.sleep(0.02)
    p.kill()
    p.wait()
    assert p.returncode != 0, "the sweep finished before it could be interrupted"
    r = run(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    key = lambda x: (x["norm"], x["depth"], x["batch"], x["seed"])
    got = sorted(json.loads((out / "results.json").read_text())["records"], key=key)
    want = sorted(json.loads((ref / "results.json").read_text())["records"], key=key)
    assert got == want
