"""Data-parallel training under torchrun on CPU (gloo): 2 ranks x batch 8 with synchronized BN is the
single-process batch-16 run (parameters and BN buffers, float64), and per-rank BN is a different model."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import sys, torch, common
common.init_distributed()
mode, out = sys.argv[1], sys.argv[2]
calls = {"all_gather": 0, "all_reduce": 0}  # the collectives issued from Python (DDP's own gradient buckets are not)
for name in calls:
    def counted(*a, _f=getattr(torch.distributed, name), _n=name, **k):
        calls[_n] += 1
        return _f(*a, **k)
    setattr(torch.distributed, name, counted)
x = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
y = torch.arange(40) % 10
data = common.Data("toy", x, y, x[:8], y[:8], (0.5,) * 3, (0.25,) * 3)
common.set_seed(0)
model = common.make_model("resnet18", norm="bn", width=0.125, num_classes=10, in_channels=3).double()
recipe = dict(epochs=2, batch_size=16, lr=0.1, augment=True, weight_decay=5e-4)  # 16, 16, 8: the last batch 4 + 4
on_epoch = lambda e, m: dict(acc=common.accuracy(m, x[:8], y[:8]))  # eval-mode BN inside the synchronized block
res = common.train_model(model, data, recipe, seed=3, log=lambda s: None, ddp_bn=mode, ckpt=sys.argv[3], key=dict(k=1),
                         on_epoch=on_epoch)
state = {k: v.clone() for k, v in model.state_dict().items()}
if common.is_main_process():
    torch.save(dict(state=state, history=res["history"], calls=calls), out)
common.finish_distributed()
'''


def run(tmp_path, name, ranks, mode):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out, ckpt = tmp_path / f"{name}.pt", tmp_path / f"{name}.ckpt"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(worker)] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(worker)]
    r = subprocess.run(cmd + [mode, str(out), str(ckpt)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=False), torch.load(ckpt, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), "single", 1, "sync")


def test_two_ranks_with_sync_bn_equal_one_process(single, tmp_path):
    (one, _), (two, ckpt2) = single, run(tmp_path, "sync", 2, "sync")
    assert one["state"].keys() == two["state"].keys()
    for k, v in one["state"].items():  # weights, running means/variances, batch counters
        assert torch.allclose(v.double(), two["state"][k].double(), rtol=1e-9, atol=1e-11), k
    for a, b in zip(one["history"], two["history"]):  # logged loss and accuracy are the global batch's
        assert a.get("train_loss", 0) == pytest.approx(b.get("train_loss", 0), rel=1e-9)
        assert a.get("train_acc") == b.get("train_acc") and a["acc"] == b["acc"]
    assert ckpt2["key"] == {"k": 1}  # the same model: the same cache key
    # like torch.nn.SyncBatchNorm, one collective per BN layer each way: an all-gather forward, an all-reduce backward
    # (before: two all-reduces each way); plus one all-reduce of the logged loss and accuracy per epoch
    n_bn, steps, epochs = 20, 2 * 3, 2  # ResNet18's 20 BN layers; 2 epochs of 3 batches
    assert two["calls"] == {"all_gather": n_bn * steps, "all_reduce": n_bn * steps + epochs}


def test_per_rank_bn_is_a_different_model(single, tmp_path):
    (one, _), (local, ckpt) = single, run(tmp_path, "local", 2, "local")
    diff = max(float((v.double() - local["state"][k].double()).abs().max()) for k, v in one["state"].items()
               if v.is_floating_point())
    assert diff > 1e-4  # BN over 8 samples per rank is not BN over the batch of 16
    assert ckpt["key"] == {"key": {"k": 1}, "per_rank_bn": 2}  # and it is cached under another key


def test_a_script_under_torchrun_writes_once_and_equals_one_process(tmp_path):
    """exp_depth_batch.py (MLPs with BN) under torchrun, 2 ranks: rank 0 alone writes, and the records (training,
    BIM, entropy) are those of one process."""
    args = ["exp_depth_batch.py", "--preset", "smoke", "--depths", "2", "--batches", "32", "--epoch-scale", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    read = lambda d: json.loads((tmp_path / d / "results.json").read_text())["records"]
    assert read("two") == read("one")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["args"]["ddp_bn"] == "sync"
    assert two.stdout.count("run directory:") == 1  # one rank prints


def test_the_feature_dataset_build_under_torchrun(tmp_path):
    """exp_feature_datasets.py builds its datasets inside a torchrun job (2 gloo ranks): rank 0 builds and
    assembles them, the other ranks wait for its data.pt (before: a rank found neither the chunks rank 0 had
    deleted nor data.pt, and failed with KeyError 'd_r'), then both train on them data-parallel."""
    args = ["exp_feature_datasets.py", "--preset", "smoke", "--artifact", "fig7", "--epochs", "1", "--milestones",
            "--n-build", "16", "--chunk", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    recs = json.loads((tmp_path / "two" / "results.json").read_text())["records"]
    assert sorted(r["kind"] for r in recs if r.get("record") == "dataset") == ["d_conflict", "d_r"]
    assert {(r["norm"], r["status"]) for r in recs if r.get("record") != "dataset"} == {("none", "ok"), ("bn", "ok")}
    assert two.stdout.count("run directory:") == 1
    # (the numbers are not one process's: the robust source's adversarial training draws its PGD starts per rank,
    # and float32 all-reduces sum in another order)
