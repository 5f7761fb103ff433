"""Checkpoints that load anywhere and run no code, a shared cache that never trains one model twice at once, the
torchrun backend chosen by --device (issue: runs where its users run it)."""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from common import DataError, build_dataset, load_tensors, make_model, read_cifar10, train_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE = dict(epochs=3, batch_size=16, lr=0.1, adv=dict(kind="pgd", eps=0.02, steps=2, rand_init=True))


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", n_train=128, n_test=32, size=8, channels=1, seed=0)


def mlp():
    torch.manual_seed(0)
    return make_model("mlp", norm="bn", in_dim=64, hidden=[16], num_classes=10)


class RunsCode:
    """An object whose unpickling would create a file: what a doctored checkpoint or dataset batch could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_saved_by_another_device_type_resumes(data, tmp_path):
    # A CUDA run's checkpoint holds a 16-byte attack-generator state (Philox seed and offset), a CPU run's 5,056
    # bytes; loading one into the other's generator failed ("Expected a CPUGeneratorImplState of size 5056").
    ckpt = tmp_path / "run.pt"

    def stop_after_epoch_1(epoch, model):
        if epoch == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        train_model(mlp(), data, RECIPE, seed=3, ckpt=ckpt, log=lambda s: None, on_epoch=stop_after_epoch_1)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["g_attack_device"] == "cpu" and saved["g_attack"].device.type == "cpu"
    saved["g_attack"] = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    saved["g_attack_device"] = "cuda"  # as a GPU run writes it
    torch.save(saved, ckpt)
    out = train_model(mlp(), data, RECIPE, seed=3, ckpt=ckpt, log=lambda s: None)
    assert out["status"] == "ok" and [h["epoch"] for h in out["history"]] == [0, 1, 2, 3]
    again = train_model(mlp(), data, RECIPE, seed=3, ckpt=tmp_path / "again.pt", log=lambda s: None)
    drop = lambda row: {k: v for k, v in row.items() if k != "time_s"}
    assert drop(again["history"][1]) == drop(out["history"][1])  # the epoch before the device change is the same run's


def test_checkpoints_are_read_onto_the_cpu(data, tmp_path, monkeypatch):
    # map_location=<the model's device> moved the CPU data generator's state to the GPU, where set_state refuses it
    train_model(mlp(), data, dict(RECIPE, epochs=1), ckpt=tmp_path / "c.pt", log=lambda s: None)
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or load(*a, **k))
    train_model(mlp(), data, dict(RECIPE, epochs=1), ckpt=tmp_path / "c.pt", log=lambda s: None)
    assert seen == [dict(map_location="cpu", weights_only=True)]


def test_a_checkpoint_that_would_run_code_is_refused(data, tmp_path):
    marker, ckpt = tmp_path / "ran", tmp_path / "cache" / "0123.pt"
    ckpt.parent.mkdir()
    torch.save(dict(model={}, payload=RunsCode(marker)), ckpt)
    with pytest.raises(DataError, match="not a plain tensor file"):
        train_model(mlp(), data, RECIPE, ckpt=ckpt, log=lambda s: None)
    assert not marker.exists()
    with pytest.raises(DataError, match="dataset .* not a plain tensor file"):
        load_tensors(ckpt, "dataset")
    assert not marker.exists()


def write_cifar(root, payload=None):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"batch_label": name.encode(), b"labels": list(rng.integers(0, 10, 4)),
             b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * 4}
        if payload is not None and name == "data_batch_3":
            d[b"extra"] = payload
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)


def test_cifar_batches_are_read_with_a_restricted_unpickler(tmp_path):
    write_cifar(tmp_path / "ok")
    assert read_cifar10(tmp_path / "ok")["x_train"].shape == (20, 3, 32, 32)
    marker = tmp_path / "ran"
    write_cifar(tmp_path / "bad", RunsCode(marker))
    with pytest.raises(DataError, match="corrupt CIFAR-10 batch .*data_batch_3.*: refusing "):
        read_cifar10(tmp_path / "bad")
    assert not marker.exists()


def test_two_processes_on_one_cache_key_train_it_once(tmp_path):
    # Both start at once with the same model and --cache: one trains, the other waits and reuses its checkpoint.
    args = [sys.executable, "exp_table1.py", "--preset", "smoke", "--arch", "vgg8", "--norm", "bn", "--epochs", "2",
            "--cache", str(tmp_path / "cache")]
    procs = [subprocess.Popen(args + ["--out", str(tmp_path / o)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for o in "ab"]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trained = [o[0].count("epoch   1/2") for o in outs]
    assert sorted(trained) == [0, 1], trained  # (before the lock: both trained it, [1, 1])
    waited = outs[trained.index(0)][0]
    assert "resumed from" in waited and "(ok)" in waited
    recs = [json.loads((tmp_path / o / "results.json").read_text())["records"][0] for o in "ab"]
    assert recs[0]["acc_pgd_l2"] == recs[1]["acc_pgd_l2"]
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    ckpt = tmp_path / "m.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "m.pt.lock").write_text(json.dumps(dict(host=common.platform.node(), pid=int(dead.stdout))))
    said = []
    with common.checkpoint_lock(ckpt, said.append, poll_s=0.01):
        assert json.loads((tmp_path / "m.pt.lock").read_text())["pid"] == os.getpid()
    assert not said and not (tmp_path / "m.pt.lock").exists()


def test_the_torchrun_backend_follows_the_device(monkeypatch):
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: seen.append(backend))
    for device in ("cpu", "cuda", "auto"):
        common.init_distributed(device)
    assert seen == ["gloo", "nccl", "nccl"]  # before: NCCL whenever a GPU was present, then CPU collectives failed


def test_amp_on_a_cpu_is_one_error_line(tmp_path):
    # --amp was silently ignored on a CPU (while changing the cache key) and unknown to three scripts
    for script in ("exp_table1", "exp_spheres", "exp_depth_batch"):
        r = subprocess.run([sys.executable, f"{script}.py", "--preset", "smoke", "--device", "cpu", "--amp", "--out",
                            str(tmp_path / script)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            "error: --amp: bf16 autocast is for CUDA runs and this one runs on the CPU (drop --amp, or --device cuda)"], \
            r.stderr[-2000:]
        assert not (tmp_path / script).exists()


def test_the_precision_policy_is_applied_and_recorded(tmp_path):
    import argparse
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    fast = dict(deterministic_algorithms=False, cudnn_benchmark=True, tf32_matmul=True, tf32_cudnn=True)
    try:
        assert common.precision_policy(argparse.Namespace(device="cpu", deterministic=False)) == fast
    finally:  # these flags are process-wide
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = before
    out = tmp_path / "R"
    r = subprocess.run([sys.executable, "exp_depth_batch.py", "--preset", "smoke", "--depths", "2", "--batches", "32",
                        "--epoch-scale", "0.5", "--deterministic", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["args"]["deterministic"] is True
    assert cfg["precision"] == {k: not v for k, v in fast.items()}  # everything the other way round


def test_the_gpu_check_runs_on_a_cpu_and_feeds_the_cost_table(tmp_path):
    import cost_table
    # (the smoke check is every script's smoke run with --device: the suite runs those on their own)
    r = subprocess.run([sys.executable, "gpu_check.py", "--device", "cpu", "--quick", "--only", "portability", "cache",
                        "throughput", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["check"] for c in report["checks"]] == ["portability", "cache", "throughput"]
    assert all(c["passed"] for c in report["checks"]), report
    models = json.loads((tmp_path / "throughput.json").read_text())["models"]
    assert models and all(m["train_images_per_s_fp32"] > 0 and m["pgd_images_per_s_fp32"] > 0 for m in models)
    tflops, source = cost_table.measured_tflops(tmp_path / "throughput.json")
    assert tflops > 0 and source == "cpu"
