"""Sharding contracts of every exp_*.py (in process, no training): each artifact's run list has unique names that
do not depend on --shard, N shards partition it exactly, and the per-run record files of common.Sweep resume,
adopt a run directory of an earlier version and merge."""
import importlib
import json
import subprocess
import sys

import pytest

import common
from tests.test_project import ROOT, SCRIPTS


def artifacts(mod):
    return sorted(mod.ARTIFACTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_artifact_has_a_fixed_list_of_uniquely_named_runs(script):
    mod = importlib.import_module(script[:-3])
    for preset in ("paper", "quick"):
        for art in artifacts(mod):
            extra = ["--dataset", "mnist"] if (script, art) == ("exp_input_dim.py", "appb") else []  # MNIST only
            args = mod.get_args(["--preset", preset, "--artifact", art, *extra])
            runs = mod.planned_runs(args)
            names = [n for n, _ in runs]
            assert len(set(names)) == len(names), (script, art)
            assert all(isinstance(p, dict) and p for _, p in runs), (script, art)
            if not (script == "exp_feature_datasets.py" and art == "build"):
                assert runs, (script, preset, art)
            for n in (1, 2, 3, 7):  # N shards partition the runs; a run's name and index never depend on N
                parts = [common.Sweep("unused", runs, shard=[k, n]).mine() for k in range(n)]
                got = sorted((i, name) for part in parts for i, name, _ in part)
                assert got == [(i, name) for i, (name, _) in enumerate(runs)]


@pytest.mark.parametrize("bad", ["2/2", "1", "-1/2", "a/b", "1/0"])
def test_bad_shard_is_one_line(bad):
    r = subprocess.run([sys.executable, "exp_spheres.py", "--shard", bad], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--shard" in r.stderr


def test_shard_needs_a_shared_out():
    r = subprocess.run([sys.executable, "exp_spheres.py", "--preset", "smoke", "--shard", "0/2"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: --shard needs --out RUN_DIR: the directory every shard " \
                                                     "of the run writes into"


def test_sweep_files_partial_runs_and_adoption(tmp_path):
    runs = [(f"r{i}", dict(k=i)) for i in range(5)]
    a = common.Sweep(tmp_path / "a", runs, shard=[1, 2])
    assert [n for _, n, _ in a.todo()] == ["r1", "r3"]
    a.save("r1", [dict(k=1, v=0.5)])
    a.save("r3", [dict(k=3, v=0.1)], finished=False)  # an interrupted multi-seed run
    assert [n for _, n, _ in a.todo()] == ["r3"] and a.previous("r3") == [dict(k=3, v=0.1)]
    assert a.missing() == ["r0", "r2", "r3", "r4"]
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["finished"] is False and res["records"] == [dict(k=1, v=0.5), dict(k=3, v=0.1)]
    assert not list((tmp_path / "a").rglob("*.tmp"))
    old = tmp_path / "old"  # a run directory written before per-run files: its records are adopted, none lost
    old.mkdir()
    recs = [dict(k=0, v=1), dict(k=2, v=2), dict(k=2, v=3), dict(other=True)]
    (old / "results.json").write_text(json.dumps(dict(records=recs, finished=False)))
    b = common.Sweep(old, runs)
    assert [n for _, n, _ in b.todo()] == ["r1", "r3", "r4"]
    assert sorted(map(json.dumps, b.records())) == sorted(map(json.dumps, recs))
    with pytest.raises(ValueError, match="unique"):
        common.Sweep(tmp_path / "c", [("a b", {}), ("a_b", {})])


def test_readme_cost_table_matches_the_presets():
    import cost_table
    readme = (ROOT / "README.md").read_text()
    block = readme.split(cost_table.MARK[0])[1].split(cost_table.MARK[1])[0]
    assert block.strip() == cost_table.table().strip(), "run: python cost_table.py --write"
    assert "exp_depth_batch.py | fig2 | 528 |" in block  # 11 depths x 8 batches x 2 norms x 3 seeds


def test_feature_dataset_training_shards_need_the_build_first(tmp_path):
    base = [sys.executable, "exp_feature_datasets.py", "--preset", "smoke", "--out", str(tmp_path / "r")]
    r = subprocess.run(base + ["--artifact", "fig6", "--shard", "0/2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: --shard: the standard source model is not there yet")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_plot_only_merges_the_record_files_of_several_run_directories(tmp_path):
    """Shards run into separate directories (other machines): --plot-only A B copies B's finished runs into A,
    a finished copy wins over an unfinished one, and what no directory has is listed as missing."""
    import exp_depth_batch as m
    args = m.get_args(["--preset", "smoke", "--depths", "2", "--batches", "8", "--out", str(tmp_path / "a")])
    runs = m.planned_runs(args)
    assert [n for n, _ in runs] == ["bn_L2_B8_s0", "none_L2_B8_s0"]
    for d, k in (("a", 0), ("b", 1)):
        (tmp_path / d).mkdir()
        common.write_config(tmp_path / d, argparse_ns(vars(args) | dict(out=str(tmp_path / d), shard=[k, 3])),
                            ROOT / "exp_depth_batch.py", "cpu")
        common.Sweep(tmp_path / d, runs, shard=[k, 3]).save(runs[k][0], [dict(runs[k][1], acc=k)])
    common.Sweep(tmp_path / "a", runs).save(runs[1][0], [dict(runs[1][1], acc=-1)], finished=False)
    run_dir, cfg, recs, missing = common.merge_runs([tmp_path / "a", tmp_path / "b"], "exp_depth_batch.py", m.planned_runs)
    assert missing == [] and [r["acc"] for r in recs] == [0, 1]
    assert json.loads((tmp_path / "a" / "results.json").read_text())["finished"] is True
    (tmp_path / "a" / "records" / "none_L2_B8_s0.json").unlink()
    assert common.merge_runs([tmp_path / "a"], "exp_depth_batch.py", m.planned_runs)[3] == ["none_L2_B8_s0"]
    assert (tmp_path / "a" / "missing.txt").read_text() == "none_L2_B8_s0\n"
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg_b["args"]["width"] = 99
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg_b))
    with pytest.raises(common.DataError, match="--width"):
        common.merge_runs([tmp_path / "a", tmp_path / "b"], "exp_depth_batch.py", m.planned_runs)


def argparse_ns(d):
    import argparse
    return argparse.Namespace(**d)
