"""Every flow transform, with shared ([1, ...]) and per-datapoint ([N, ...]) parameters, D in {1, 2, 5}."""

import pytest
import torch

from gapbench.models.flows import AffineCoupling, AuxiliaryFlow, CompositeTransform, RealNVP, batched_linear
from tests.models.flow_checks import check_transform, perturbed

NUM_SAMPLES, NUM_POINTS = 2, 3


def _transforms(dim):
    yield "coupling-even", AffineCoupling(dim, range(0, dim, 2), "a", 7)
    yield "coupling-all", AffineCoupling(dim, range(dim), "a", 7)  # empty conditioner: constant affine map
    yield "realnvp", RealNVP(dim, num_flow_steps=4, flow_hidden=8).transform
    yield "aux-flow", AuxiliaryFlow(dim, num_flow_steps=2, flow_hidden=8, aux_dim=2).transform


CASES = [(dim, name, leading) for dim in (1, 2, 5) for name, _ in _transforms(dim) for leading in ("shared", "local")]


@pytest.mark.parametrize("dim,name,leading", CASES)
def test_transform_contract(dim, name, leading):
    transform = dict(_transforms(dim))[name]
    gen = torch.Generator().manual_seed(dim)
    num_params = 1 if leading == "shared" else NUM_POINTS
    params = transform.init_params(num_params, dtype=torch.float64, generator=gen)
    params = perturbed(params, scale=0.5, seed=dim)
    inputs = torch.randn(NUM_SAMPLES, NUM_POINTS, transform.num_features, dtype=torch.float64, generator=gen)
    # Rounding accumulates over each coupling's conditioner: a hidden layer (at most 8 units) on at most
    # num_features inputs.
    num_couplings = len(getattr(transform, "transforms", [transform]))
    check_transform(transform, params, inputs, num_terms=num_couplings * (8 + transform.num_features))


@pytest.mark.parametrize("name", ["coupling-even", "realnvp", "aux-flow"])
def test_new_transform_is_the_identity(name):
    transform = dict(_transforms(5))[name]
    params = transform.init_params(NUM_POINTS, dtype=torch.float64)
    inputs = torch.randn(NUM_SAMPLES, NUM_POINTS, transform.num_features, dtype=torch.float64)
    outputs, logabsdet = transform.forward(params, inputs)
    # Bit-exact on any CPU: zero output layers give scale exp(0) = 1 and shift 0, and x * 1 + 0 == x in IEEE.
    assert torch.equal(outputs, inputs) and torch.equal(logabsdet, torch.zeros_like(logabsdet))


def test_log_scale_is_bounded_for_huge_weights():
    transform = AffineCoupling(4, [0, 1], "a", 5)
    params = perturbed(transform.init_params(1), scale=1e4)
    outputs, logabsdet = transform.forward(params, torch.randn(3, 2, 4))
    assert torch.isfinite(outputs).all()
    assert logabsdet.abs().max() <= 2 * 2.0  # two updated features, |log scale| < 2 each


def test_batched_linear_matches_a_loop():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    weight, bias = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    expected = torch.stack([x[:, n] @ weight[n] + bias[n] for n in range(3)], dim=1)
    torch.testing.assert_close(batched_linear(x, weight, bias), expected)
    shared = batched_linear(x, weight[:1], bias[:1])
    torch.testing.assert_close(shared, x @ weight[0] + bias[0])
    broadcast_x = batched_linear(x[:, :1], weight, bias)  # one input row, N weight sets
    torch.testing.assert_close(broadcast_x[:, 1], x[:, 0] @ weight[1] + bias[1])


def test_composite_rejects_colliding_names():
    with pytest.raises(ValueError, match="collide"):
        CompositeTransform([AffineCoupling(2, [0], "a", 3), AffineCoupling(2, [1], "a", 3)])
    with pytest.raises(ValueError, match="subset"):
        AffineCoupling(2, [], "a", 3)
