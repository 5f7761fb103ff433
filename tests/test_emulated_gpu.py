"""Device readiness without a GPU: the primitives and a whole training run on an emulated CUDA device
(tests/emulated_cuda.py: tensors tagged as on cuda:0, every device or generator mismatch an error, every host wait
and host-to-device copy counted per call site). Each script's smoke preset also runs on it (the smoke tests of
tests/test_exp_*.py pass --device cuda through tests/emulated_cuda.py)."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

import common
from emulated_cuda import CudaTensor, emulated_cuda

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATOR = str(ROOT / "tests" / "emulated_cuda.py")


def test_the_emulation_refuses_what_a_gpu_refuses():
    with emulated_cuda() as emu:
        dev = common.pick_device("cuda")
        x = torch.rand(4, 3).to(dev)
        assert isinstance(x, CudaTensor) and x.device.type == "cuda" and (x * 2).device.type == "cuda"
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.rand(4, 3)  # a CPU tensor of one or more dimensions
        assert (x + torch.tensor(2.0)).device.type == "cuda"  # 0-dim CPU tensors are allowed, as on CUDA
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.randn(3, device=dev, generator=torch.Generator().manual_seed(0))
        with pytest.raises(RuntimeError, match="device type for generator"):
            torch.randn(3, generator=torch.Generator(device=dev))
        torch.randn(3, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        model = torch.nn.Linear(3, 2).to(dev)
        assert isinstance(model.weight, torch.nn.Parameter) and model.weight.device.type == "cuda"
        model(x).sum().backward()
        assert model.weight.grad.device.type == "cuda"
        assert x.cpu().device.type == "cpu" and not isinstance(x.cpu(), CudaTensor)
        float(x.sum())
        x[x > 0.5]
    assert sorted(k.split()[1] for k in emu.syncs) == ["__float__", "__getitem__", "cpu"]  # each host wait, by site
    assert sorted(emu.copies.values()) == [1, 2]  # x; the Linear's weight and bias


def epoch_waits(steps, **recipe):
    """Host waits and host-to-device copies of one training epoch of `steps` steps on the emulated GPU."""
    with emulated_cuda() as emu:
        dev = common.pick_device("cuda")
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(64, 3, 8, 8, generator=g), torch.arange(64) % 4
        data = common.Data("toy", x.to(dev), y.to(dev), x[:8].to(dev), y[:8].to(dev), (0.5,) * 3, (0.25,) * 3, 4)
        model = common.make_model("resnet18", norm="bn", width=0.125, num_classes=4, in_channels=3).to(dev)
        before = sum(emu.syncs.values()), sum(emu.copies.values())
        res = common.train_model(model, data, dict(epochs=1, batch_size=64 // steps, lr=0.01, **recipe), log=lambda s: None)
        assert res["status"] in ("ok", "failed")
    return sum(emu.syncs.values()) - before[0], sum(emu.copies.values()) - before[1], emu


@pytest.mark.parametrize("recipe", [dict(augment=True), dict(augment=True, ligs_lambda=0.5),
                                    dict(adv=dict(kind="pgd", norm="linf", eps=0.03, steps=2))],
                         ids=["crop+flip", "ligs-regularizer", "adversarial"])
def test_a_training_epoch_waits_for_the_device_a_fixed_number_of_times(recipe):
    """The host waits for the device and copies to it per epoch, not per step: 8 steps cost what 4 steps cost
    (before: crop+flip copied its draws twice per step, the LIGS regularizer indexed with boolean masks)."""
    four, eight = epoch_waits(4, **recipe), epoch_waits(8, **recipe)
    assert four[:2] == eight[:2], (dict(four[2].syncs), dict(eight[2].syncs), dict(eight[2].copies))


def test_bn_statistics_are_the_cumulative_average_without_waiting():
    """adapt_bn and exp_depth_batch's exact statistics set BN's momentum to 1/k per batch: the numbers of momentum
    None, without its read of the batch counter from the device in every layer of every batch."""
    import exp_depth_batch
    g = torch.Generator().manual_seed(1)
    x = torch.rand(96, 3, 8, 8, generator=g)
    base = common.make_model("vgg8", norm="bn", width=0.25, num_classes=4, in_channels=3)
    ref = common.make_model("vgg8", norm="bn", width=0.25, num_classes=4, in_channels=3)
    ref.load_state_dict(base.state_dict())
    ref.eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats(), m.train()
            m.momentum = None
    with torch.no_grad():
        for xb in x.split(32):
            ref(xb)
    with emulated_cuda() as emu:
        model = common.make_model("vgg8", norm="bn", width=0.25, num_classes=4, in_channels=3)
        model.load_state_dict(base.state_dict())
        model = common.adapt_bn(model.to("cuda"), x.to("cuda"), batch_size=32)
        mlp = common.make_model("mlp", norm="bn", in_dim=12, hidden=[16] * 3, num_classes=4).to("cuda")
        exp_depth_batch.recompute_bn_stats(mlp, torch.rand(33, 12).to("cuda"), 16)
    assert not emu.syncs
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].cpu()), k
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))  # restored


def apgd_on_the_gpu(steps):
    """APGD-DLR with a restart and a PGD bisection of minimal_eps on the emulated GPU: (results on the CPU, waits)."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    base = common.make_model("vgg8", norm="bn", width=1 / 16, num_classes=10, in_channels=3)
    with emulated_cuda() as emu:
        model = common.make_model("vgg8", norm="bn", width=1 / 16, num_classes=10, in_channels=3)
        model.load_state_dict(base.state_dict())
        model, xg, yg = model.to("cuda"), x.to("cuda"), y.to("cuda")
        before = sum(emu.syncs.values())
        adv = common.apgd(model, xg, yg, 0.05, steps=steps, loss="dlr", restarts=2,
                          generator=torch.Generator("cuda").manual_seed(0))
        waits = sum(emu.syncs.values()) - before
        eps = common.minimal_eps(model, xg, yg, lambda a, b, e: common.pgd(model, a, b, e, steps=2), hi=0.1, iters=3)
        adv = adv.cpu()
    cpu = common.apgd(base, x, y, 0.05, steps=steps, loss="dlr", restarts=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, cpu)
    assert torch.equal(eps, common.minimal_eps(base, x, y, lambda a, b, e: common.pgd(base, a, b, e, steps=2), 0.1, 3))
    return waits


def test_apgd_and_minimal_eps_run_on_the_gpu_waiting_per_restart_not_per_step():
    """The CPU's numbers on the emulated GPU; APGD waits for the device once per restart (to pick the samples still
    standing), not per step or checkpoint."""
    assert apgd_on_the_gpu(4) == apgd_on_the_gpu(12) <= 2


def run(script, *args, gpu=False, syncs=None):
    cmd = [sys.executable, *([EMULATOR] if gpu else []), script, *map(str, args), "--device", "cuda" if gpu else "cpu"]
    env = dict(__import__("os").environ, **({"EMULATED_CUDA_SYNCS": str(syncs)} if syncs else {}))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def records(out):
    strip = lambda r: {k: v for k, v in r.items() if not any(t in k for t in ("time", "second", "per_s"))}  # clocks
    return [strip(r) for r in json.loads((out / "results.json").read_text())["records"]]


@pytest.mark.parametrize("first", ["cpu", "gpu"])
def test_a_cache_filled_on_one_device_serves_the_other(tmp_path, first):
    """exp_table1's smoke models (no norm and BN: their layout is the same on both devices) trained on the CPU are a
    cache hit for an emulated GPU run and the reverse, with the same records as training them there."""
    args = ["exp_table1.py", "--preset", "smoke", "--arch", "vgg8", "--norm", "none", "bn", "--epochs", "1", "--n-eval", "20",
            "--cache", tmp_path / "c"]
    a = run(*args, "--out", tmp_path / "a", gpu=first == "gpu")
    b = run(*args, "--out", tmp_path / "b", gpu=first == "cpu")
    assert "resumed from" not in a.stdout and b.stdout.count("resumed from") == 2, b.stdout[-2000:]
    assert records(tmp_path / "a") == records(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["device"] == ("cpu" if first == "gpu" else "cuda")


def test_a_cpu_checkpoint_resumes_on_the_gpu(tmp_path):
    """A training run stopped after its first epoch on the CPU and resumed on the emulated GPU ends where an
    uninterrupted run ends (no attack draws in this recipe: the attack generator is re-seeded across devices)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 3, 8, 8, generator=g), torch.arange(48) % 4
    recipe = dict(epochs=2, batch_size=16, lr=0.05, augment=True)

    def train(dev, ckpt, stop_after=None):
        def on_epoch(epoch, m):
            if epoch == stop_after:
                raise KeyboardInterrupt
            return {}
        data = common.Data("toy", x.to(dev), y.to(dev), x[:8].to(dev), y[:8].to(dev), (0.5,) * 3, (0.25,) * 3, 4)
        common.set_seed(0)
        model = common.make_model("resnet18", norm="bn", width=0.125, num_classes=4, in_channels=3).to(dev)
        common.train_model(model, data, recipe, seed=3, ckpt=ckpt, log=lambda s: None, key="k", on_epoch=on_epoch)
        return {k: v.cpu() for k, v in model.state_dict().items()}

    whole = train("cpu", None)
    with pytest.raises(KeyboardInterrupt):
        train("cpu", tmp_path / "ck.pt", stop_after=1)
    with emulated_cuda():
        resumed = train("cuda", tmp_path / "ck.pt")
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k


def test_a_run_started_on_the_cpu_resumes_on_the_gpu(tmp_path):
    """--resume of an exp_table1 run started on the CPU, continued on the emulated GPU: the model whose record is
    missing is read from its finished checkpoint on the GPU and evaluated there; the records equal the CPU's."""
    out = tmp_path / "r"
    run("exp_table1.py", "--preset", "smoke", "--arch", "vgg8", "--norm", "none", "bn", "--epochs", "1", "--n-eval", "20",
        "--out", out)
    before = records(out)
    files = sorted((out / "records").glob("*.json"))
    assert len(files) == 2
    files[1].unlink()  # as if stopped after the first model
    r = run("exp_table1.py", "--resume", "--out", out, gpu=True)
    assert "resumed from" in r.stdout, r.stdout[-2000:]
    assert records(out) == before
