"""Training loop (resume, divergence, chance detection, adversarial training), evaluation and run records."""
import json

import pytest
import torch

from common import (accuracy, build_dataset, epoch_metrics, evaluate, fmt_mean_sem, landscape_probe, load_records, lr_at,
                    make_model, make_optimizer, mean_sem, pick_device, prepare_run_dir, save_records, train_model)


@pytest.fixture(scope="module")
def data():
    return build_dataset("synthetic", size=16, n_train=256, n_test=64)


def small(seed=0, norm="bn"):
    """A tiny conv net with BN running statistics (so resume must restore buffers too)."""
    torch.manual_seed(seed)
    return make_model("vgg8", norm=norm, width=1 / 8)


def mlp(seed=0):
    torch.manual_seed(seed)
    return make_model("mlp", norm="bn", in_dim=3 * 16 * 16, hidden=[64, 64])


RECIPE = dict(epochs=3, batch_size=32, lr=0.05, milestones=(2,), weight_decay=5e-4, augment=False)


def test_lr_schedule():
    assert lr_at(0.0, 0.1, (5, 8)) == 0.1 and lr_at(5.0, 0.1, (5, 8)) == pytest.approx(0.01)
    assert lr_at(9.5, 0.1, (5, 8)) == pytest.approx(0.001)
    assert lr_at(1.0, 0.1, (), warmup_epochs=4) == pytest.approx(0.025) and lr_at(4.0, 0.1, (), warmup_epochs=4) == 0.1


def test_optimizers():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer("sgd", p, 0.1, 0.9, 5e-4), torch.optim.SGD)
    assert isinstance(make_optimizer("adam", p, 1e-3), torch.optim.Adam)
    assert isinstance(make_optimizer("adagrad", p, 1e-2), torch.optim.Adagrad)
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        make_optimizer("rmsprop", p, 0.1)


def test_training_learns_and_logs_epoch_zero(data):
    model = mlp()
    seen = []
    res = train_model(model, data, RECIPE, seed=0, log=seen.append,
                      on_epoch=lambda e, m: dict(test_acc=accuracy(m, data.x_test, data.y_test)))
    assert res["status"] == "ok" and [h["epoch"] for h in res["history"]] == [0, 1, 2, 3]
    assert res["history"][0]["test_acc"] < 0.5 < res["history"][-1]["test_acc"]
    assert res["history"][-1]["train_loss"] < res["history"][1]["train_loss"]
    assert res["history"][3]["lr"] == pytest.approx(0.005)  # one milestone passed
    assert len(seen) == 3 and "epoch   3/3" in seen[-1]


def test_resume_after_interruption_gives_identical_numbers(data, tmp_path):
    recipe = dict(RECIPE, augment=True, lr=0.02)  # crop+flip: the augmentation RNG must resume too
    full = small()
    ref = train_model(full, data, recipe, seed=3, ckpt=tmp_path / "full.pt", log=lambda s: None)

    class Interrupt(Exception):
        pass

    def stop_in_epoch_2(epoch, model):
        if epoch == 2:
            raise Interrupt  # dies after training epoch 2, before its checkpoint: epoch 2 is lost
        return {}

    part = small()
    with pytest.raises(Interrupt):
        train_model(part, data, recipe, seed=3, ckpt=tmp_path / "part.pt", log=lambda s: None, on_epoch=stop_in_epoch_2)
    assert torch.load(tmp_path / "part.pt", weights_only=False)["state"]["epoch"] == 1
    resumed = small(seed=99)  # a differently initialized model: everything must come from the checkpoint
    out = train_model(resumed, data, recipe, seed=3, ckpt=tmp_path / "part.pt", log=lambda s: None)
    assert ref["status"] == out["status"] == "ok"
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]
    assert strip(out["history"]) == strip(ref["history"])
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # weights, BN statistics: bit-identical
    again = train_model(resumed, data, recipe, seed=3, ckpt=tmp_path / "part.pt", log=lambda s: None)
    assert strip(again["history"]) == strip(ref["history"])  # a finished checkpoint is not retrained


def test_divergence_and_chance_are_reported_not_raised(data):
    res = train_model(small(norm="none"), data, dict(RECIPE, lr=1e6, augment=False), seed=0, log=lambda s: None)
    assert res["status"] == "failed" and "diverged" in res["reason"]
    assert len(res["history"]) == 2  # stopped after the first epoch
    res = train_model(mlp(), data, dict(RECIPE, lr=0.0), seed=0, log=lambda s: None)
    assert res["status"] == "failed" and "no better than chance" in res["reason"]


def test_adversarial_training_uses_adversarial_examples(data):
    adv = dict(kind="pgd", norm="l2", eps=1.0, steps=3, step_size=0.4, clip=(0.0, 1.0))
    std, rob = mlp(), mlp()
    train_model(std, data, dict(RECIPE, epochs=4, augment=False), seed=0, log=lambda s: None)
    train_model(rob, data, dict(RECIPE, epochs=4, augment=False, adv=adv), seed=0, log=lambda s: None)
    spec = {"pgd": dict(adv, steps=10, step_size=None)}
    # measured: 0.77 vs 0.33 robust accuracy at this budget, both 1.0 clean
    assert evaluate(rob, data.x_test, data.y_test, spec)["pgd"] > evaluate(std, data.x_test, data.y_test, spec)["pgd"] + 0.2


def test_evaluate_clean_noise_and_attacks(data):
    model = mlp()
    train_model(model, data, RECIPE, seed=0, log=lambda s: None)
    specs = dict(clean=dict(kind="clean"), noise0=dict(kind="noise", sigma=0.0), noise=dict(kind="noise", sigma=0.3),
                 fgsm=dict(kind="fgsm", eps=0.1), bim=dict(kind="bim", eps=0.1, steps=5, step_size=0.02),
                 pgd=dict(kind="pgd", eps=0.1, steps=5, rand_init=True))
    a, b = evaluate(model, data.x_test, data.y_test, specs, batch_size=20), evaluate(model, data.x_test, data.y_test, specs)
    assert a == b  # seeded noise and random starts; batch size does not matter
    assert a["clean"] == accuracy(model, data.x_test, data.y_test) == a["noise0"]
    assert a["pgd"] <= a["clean"] and a["bim"] <= a["clean"]
    with pytest.raises(ValueError, match="kind='cw'"):
        evaluate(model, data.x_test, data.y_test, {"x": dict(kind="cw")})


def test_mean_sem():
    m, s, n = mean_sem([0.1, 0.2, 0.3, float("nan"), None])
    assert (round(m, 6), round(s, 6), n) == (0.2, round(0.1 / 3 ** 0.5, 6), 3)
    assert fmt_mean_sem([0.5]) == "50.0" and fmt_mean_sem([]) == "–"
    assert fmt_mean_sem([0.5, 0.7]) == "60.0 ± 10.0"


def test_run_records_round_trip_and_no_silent_overwrite(tmp_path):
    out = prepare_run_dir("exp_x", tmp_path / "run")
    (out / "config.json").write_text("{}")
    records = [dict(artifact="a", dataset="d", arch="vgg8", norm="bn", seed=0, acc_clean=0.9),
               dict(artifact="a", dataset="d", arch="vgg8", norm="none", seed=0, status="failed")]
    save_records(out, records, finished=True)
    assert load_records(out) == records
    assert json.loads((out / "results.json").read_text())["finished"] is True
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header == "artifact,dataset,arch,norm,seed,acc_clean,status"
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        prepare_run_dir("exp_x", out)
    assert prepare_run_dir("exp_x", out, resume=True) == out
    with pytest.raises(ValueError, match="holds no run to continue"):
        prepare_run_dir("exp_x", tmp_path / "other", resume=True)


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert pick_device("auto").type == "cuda"
    else:
        assert pick_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA device"):
            pick_device("cuda")


def test_ligs_regularizer_runs_and_resumes_exactly(data, tmp_path):
    recipe = dict(RECIPE, ligs_lambda=1.0, ligs_sigma=0.05)
    ref_model = mlp()
    ref = train_model(ref_model, data, recipe, seed=1, ckpt=tmp_path / "a.pt", log=lambda s: None)
    plain = train_model(mlp(), data, RECIPE, seed=1, log=lambda s: None)
    assert ref["status"] == "ok" and ref["history"][-1]["train_loss"] != plain["history"][-1]["train_loss"]

    class Stop(Exception):
        pass

    def stop(epoch, model):
        if epoch == 2:
            raise Stop
        return {}

    with pytest.raises(Stop):
        train_model(mlp(), data, recipe, seed=1, ckpt=tmp_path / "b.pt", log=lambda s: None, on_epoch=stop)
    resumed = mlp(seed=7)
    out = train_model(resumed, data, recipe, seed=1, ckpt=tmp_path / "b.pt", log=lambda s: None)
    assert [h["train_loss"] for h in out["history"][1:]] == [h["train_loss"] for h in ref["history"][1:]]
    assert all(torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(), resumed.state_dict().values()))


def test_epoch_metrics_matches_its_parts(data):
    from common import ligs
    model = mlp()
    train_model(model, data, RECIPE, seed=0, log=lambda s: None)
    xs, ys = data.x_test[:40], data.y_test[:40]
    m = epoch_metrics(model, data.x_test, data.y_test, xs, ys, eps=0.5, steps=3, sigma=0.05, seed=4,
                      perturbations=("gaussian", "fgsm"))
    assert m["clean_acc"] == accuracy(model, data.x_test, data.y_test)
    assert m["robust_acc"] == evaluate(model, xs, ys, {"p": dict(kind="pgd", norm="l2", eps=0.5, steps=3)})["p"]
    assert m["ligs"] == ligs(model, xs, ys, sigma=0.05, generator=torch.Generator().manual_seed(4))[0]
    assert set(m) == {"clean_acc", "robust_acc", "ligs", "ligs_skipped", "ligs_fgsm", "ligs_fgsm_skipped"}
    assert epoch_metrics(model, data.x_test, data.y_test, xs, ys, 0.5, 3, 0.05, 4)["ligs"] == m["ligs"]  # same draw


def naive_probe(model, x, y, step_sizes):
    """Reference: mutate a deep copy's parameters for every step length."""
    import copy
    import torch.nn.functional as F
    m = copy.deepcopy(model).train()
    params = list(m.parameters())
    w0 = [p.detach().clone() for p in params]
    g = torch.cat([t.flatten() for t in torch.autograd.grad(F.cross_entropy(m(x), y), params)])
    losses, diffs, betas = [], [], []
    for s in step_sizes:
        m2 = copy.deepcopy(model).train()
        with torch.no_grad():
            off = 0
            for p, w in zip(m2.parameters(), w0):
                p.copy_(w - s * g[off:off + p.numel()].view_as(p))
                off += p.numel()
        loss = F.cross_entropy(m2(x), y)
        gs = torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(m2.parameters()))])
        losses.append(loss.item())
        diffs.append((g - gs).norm().item())
        betas.append(diffs[-1] / (s * g.norm().item()))
    return dict(loss_min=min(losses), loss_max=max(losses), gdiff_min=min(diffs), gdiff_max=max(diffs), beta=max(betas))


def test_landscape_probe_matches_a_naive_reference_and_leaves_state_bit_identical(data):
    model = small().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.x_train[:32].double(), data.y_train[:32]
    for _ in range(2):  # non-trivial momentum buffers and BN statistics
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = [{k: v.clone() for k, v in s.items()} for s in opt.state.values()]
    grads = [p.grad.clone() for p in model.parameters()]
    steps = [0.05, 0.1, 0.2, 0.4]
    got = landscape_probe(model, x, y, steps)
    want = naive_probe(model, x, y, steps)
    for k in want:
        assert abs(got[k] - want[k]) <= 1e-8 * max(1.0, abs(want[k])), (k, got[k], want[k])
    assert got["loss_min"] <= got["loss_max"] and got["gdiff_min"] <= got["gdiff_max"] and got["beta"] >= 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # incl. BN running stats
    assert all(torch.equal(a[k], b[k]) for a, b in zip(opt.state.values(), opt_state) for k in a)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model.training  # mode restored


def test_on_step_probes_are_recorded(data):
    rows = train_model(mlp(), data, dict(RECIPE, epochs=1), seed=0, log=lambda s: None,
                       on_step=lambda step, m, x, y: {"probe": float(step)} if step % 3 == 0 else None)["history"]
    probed = [r for r in rows if "step" in r]
    assert [r["step"] for r in probed] == [0, 3, 6] and all(r["probe"] == r["step"] for r in probed)
