"""Representation inversion (`invert_features`, Ilyas et al. 2019 Alg. 1; P1 App. B.3) and the reader of
Ilyas et al.'s released feature datasets."""
import pytest
import torch
import torch.nn as nn

from common import DataError, feature_distance, invert_features, make_model, read_ilyas_dataset


def gen(seed):
    return torch.Generator().manual_seed(seed)


class LinearFeatures(nn.Module):
    """g(x) = W x: the minimisers of ||W x - W x_t|| form the affine set x_t + null(W)."""

    def __init__(self, W):
        super().__init__()
        self.W = nn.Parameter(W)

    def features(self, x):
        return x.flatten(1) @ self.W.T


def small_resnet(dtype=torch.float32):
    torch.manual_seed(0)
    model = make_model("resnet18", norm="bn", width=1 / 16, in_channels=3).to(dtype)
    with torch.no_grad():  # non-trivial BN running statistics
        model.train()
        for _ in range(3):
            model(torch.rand(16, 3, 16, 16, generator=gen(1), dtype=dtype))
    return model


def test_linear_features_converge_to_the_projection_onto_the_solution_set():
    d, k = 12, 4
    W = torch.randn(k, d, generator=gen(0), dtype=torch.float64)
    model = LinearFeatures(W)
    x_t = torch.randn(3, d, generator=gen(1), dtype=torch.float64)
    x0 = torch.randn(3, d, generator=gen(2), dtype=torch.float64)
    P = W.T @ torch.linalg.solve(W @ W.T, W)  # projection onto the row space of W
    closed = x0 + (x_t - x0) @ P.T  # the point of x_t + null(W) nearest to x0: gradient steps stay in row(W)
    step = 1e-3
    xr = invert_features(model, x_t, x0, steps=20000, step_size=step, clip=None)
    assert torch.allclose((xr - x0) @ (torch.eye(d, dtype=torch.float64) - P).T, torch.zeros_like(x0), atol=1e-10)
    assert (xr - closed).norm(dim=1).max() < 5 * step  # normalised steps reach the optimum to within a few steps
    assert feature_distance(model, xr, x_t).max() < 5 * step * W.norm(2)
    assert (x0 - closed).norm(dim=1).min() > 100 * step  # and the start was far from it


def test_feature_distance_falls_and_result_stays_in_the_box():
    model = small_resnet()
    x_t, x0 = torch.rand(6, 3, 16, 16, generator=gen(3)), torch.rand(6, 3, 16, 16, generator=gen(4))
    d0 = feature_distance(model, x0, x_t)
    xr = invert_features(model, x_t, x0, steps=40, step_size=0.1)
    d1 = feature_distance(model, xr, x_t)
    assert (d1 < 0.5 * d0).all(), (d0, d1)
    assert xr.min() >= 0 and xr.max() <= 1


def test_no_side_effects_on_inputs_modes_bn_statistics_and_grads():
    model = small_resnet()
    model.train()
    list(model.modules())[3].eval()  # a mixed mode must be restored as it was
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x_t, x0 = torch.rand(4, 3, 16, 16, generator=gen(3)), torch.rand(4, 3, 16, 16, generator=gen(4))
    copies = x_t.clone(), x0.clone()
    with torch.no_grad():  # works under a no_grad caller
        xr = invert_features(model, x_t, x0, steps=3, step_size=0.1)
    assert not xr.requires_grad and not torch.equal(xr, x0)
    assert torch.equal(x_t, copies[0]) and torch.equal(x0, copies[1])
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_one_sample_alone_equals_inside_a_batch():
    model = small_resnet(torch.float64)
    x_t = torch.rand(5, 3, 16, 16, generator=gen(3), dtype=torch.float64)
    x0 = torch.rand(5, 3, 16, 16, generator=gen(4), dtype=torch.float64)
    batch = invert_features(model, x_t, x0, steps=5, step_size=0.1)
    alone = invert_features(model, x_t[2:3], x0[2:3], steps=5, step_size=0.1)
    torch.testing.assert_close(alone, batch[2:3])


def test_matching_features_make_no_step_and_no_nan():
    model = small_resnet()
    x = torch.rand(3, 3, 16, 16, generator=gen(5))
    xr = invert_features(model, x, x, steps=3, step_size=0.1)  # zero distance: zero gradient
    assert torch.equal(xr, x)
    W = torch.zeros(2, 5)
    xr = invert_features(LinearFeatures(W), torch.rand(2, 5), torch.rand(2, 5), steps=3, step_size=0.1)
    assert torch.isfinite(xr).all()


def test_bad_arguments_are_one_clear_error():
    model = small_resnet()
    with pytest.raises(ValueError, match="one shape"):
        invert_features(model, torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16), 1, 0.1)
    with pytest.raises(ValueError, match="step_size"):
        invert_features(model, torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), 1, 0.0)


# ---------------------------------------------------------------- Ilyas et al.'s released datasets

def write_release(root, kind_folder="robust_CIFAR", n=(3, 2), ims=None, labs=None):
    folder = root / "release_datasets" / kind_folder
    folder.mkdir(parents=True, exist_ok=True)
    g = gen(0)
    ims = ims if ims is not None else [torch.rand(k, 3, 32, 32, generator=g) for k in n]
    labs = labs if labs is not None else [torch.randint(0, 10, (k,), generator=g) for k in n]
    torch.save(ims, folder / "CIFAR_ims")  # torch-saved lists of tensors, no file extension (MadryLab's format)
    torch.save(labs, folder / "CIFAR_lab")
    return (torch.cat(ims), torch.cat(labs)) if isinstance(ims, list) else None


def test_released_datasets_are_read_in_their_exact_format(tmp_path):
    x, y = write_release(tmp_path)
    got_x, got_y = read_ilyas_dataset(tmp_path, "d_r")
    assert torch.equal(got_x, x) and torch.equal(got_y, y) and got_y.dtype == torch.long


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"), ("garbage", "not a torch-saved"), ("shape", "N x 3 x 32 x 32"),
    ("labels", "labels in 0..9"), ("range", "outside"), ("dict", "list of tensors")])
def test_malformed_released_files_are_one_clear_line(tmp_path, case, match):
    if case == "missing":
        pass
    elif case == "garbage":
        write_release(tmp_path)
        (tmp_path / "release_datasets" / "robust_CIFAR" / "CIFAR_ims").write_bytes(b"not a torch file")
    elif case == "shape":
        write_release(tmp_path, ims=[torch.rand(2, 1, 28, 28)], labs=[torch.zeros(2, dtype=torch.long)])
    elif case == "labels":
        write_release(tmp_path, ims=[torch.rand(2, 3, 32, 32)], labs=[torch.tensor([1, 10])])
    elif case == "range":
        write_release(tmp_path, ims=[torch.rand(2, 3, 32, 32) * 255], labs=[torch.tensor([1, 2])])
    else:
        write_release(tmp_path, ims={"a": torch.rand(2, 3, 32, 32)}, labs=[torch.tensor([1, 2])])
    with pytest.raises(DataError, match=match) as e:
        read_ilyas_dataset(tmp_path, "d_r")
    assert "\n" not in str(e.value)


def test_other_label_indices_never_pick_the_same_label_and_are_seeded():
    from common import other_label_indices
    y_pool = torch.arange(200) % 10
    y = torch.randint(0, 10, (500,), generator=gen(0))
    j = other_label_indices(y, y_pool, gen(1))
    assert (y_pool[j] != y).all() and j.min() >= 0 and j.max() < 200
    assert torch.equal(j, other_label_indices(y, y_pool, gen(1)))
    assert len(set(y_pool[j].tolist())) == 10  # every other label is drawn
