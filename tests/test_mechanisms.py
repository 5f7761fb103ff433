"""P2 mechanism primitives: sphere sampling, Yang et al.'s lambda_G against values computed by hand,
and the plug-in entropy estimator on known distributions."""
import math

import pytest
import torch

from common import entropy_ci_bits, lambda_G, make_spheres, max_trainable_depth, quantized_entropy_bits


def test_spheres_lie_on_their_radius_and_are_balanced():
    g = torch.Generator().manual_seed(0)
    x, y = make_spheres(500, dim=2, generator=g)
    assert x.shape == (1000, 2) and torch.equal(torch.bincount(y), torch.tensor([500, 500]))
    r = x.norm(dim=1)
    torch.testing.assert_close(r[y == 0], torch.ones(500))
    torch.testing.assert_close(r[y == 1], torch.full((500,), 1.3))
    # directions are uniform: the mean direction vanishes and every quadrant is populated
    assert (x / r[:, None]).mean(0).norm() < 0.1
    assert len({(bool(a > 0), bool(b > 0)) for a, b in x.tolist()}) == 4
    x5, _ = make_spheres(10, dim=500, generator=g)
    torch.testing.assert_close(x5.norm(dim=1)[:10], torch.ones(10))


def test_lambda_G_matches_values_computed_by_hand():
    # B = 4: c = -1/3, arccos(c) = 1.9106332, J'(c) = 0.3918266, J(c) = (0.9428090 - 0.4103188)/pi = 0.1694971,
    # lambda = (0.3918266 + 3) / (1 * 0.8305029) - 1 = 3.0840650
    assert lambda_G(4) == pytest.approx(3.0840650, abs=2e-5)  # hand value carried 7 digits
    # values of Yang et al.'s formula evaluated independently (DECISIONS.md D21)
    for B, lam, depth in [(8, 1.788, 27.5), (16, 1.590, 34.5), (32, 1.522, 38.1), (64, 1.493, 39.9), (128, 1.480, 40.8),
                          (1024, 1.4685, 41.6)]:
        assert lambda_G(B) == pytest.approx(lam, abs=1.5e-3)
        assert max_trainable_depth(B) == pytest.approx(depth, abs=0.15)
    assert lambda_G(10 ** 7) == pytest.approx(math.pi / (math.pi - 1), abs=1e-5)  # the large-batch limit
    assert all(lambda_G(b) > lambda_G(b + 1) for b in range(4, 200))  # decreasing in B
    with pytest.raises(ValueError, match="B > 3"):
        lambda_G(3)


def test_plugin_entropy_on_known_distributions():
    # uniform over m distinct codes -> log2 m bits
    for m in (1, 2, 10, 128):
        probs = torch.zeros(m * 50, 10)
        probs[:, 0] = (torch.arange(m * 50) % m).float() / 128 + 1e-4  # m distinct 7-bit codes in class 0
        assert quantized_entropy_bits(probs) == pytest.approx(math.log2(m), abs=1e-9)
    # a one-hot network output over 10 balanced classes -> log2(10) bits (P2's lower reference line)
    onehot = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).float()
    assert quantized_entropy_bits(onehot) == pytest.approx(math.log2(10))
    # p = 1 is clipped to the top level, so it is not a separate symbol from 127/128
    assert quantized_entropy_bits(torch.tensor([[1.0, 0.0], [0.995, 0.005]])) == 0.0
    # a skewed two-symbol distribution: H = -(0.25 log 0.25 + 0.75 log 0.75)
    probs = torch.tensor([[0.9, 0.1]] * 3 + [[0.1, 0.9]])
    assert quantized_entropy_bits(probs) == pytest.approx(0.8112781, abs=1e-6)


def test_paninski_interval_matches_p2():
    assert entropy_ci_bits(60000, bits=7, n_classes=10) == pytest.approx(0.316, abs=0.001)
