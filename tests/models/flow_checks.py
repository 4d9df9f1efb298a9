"""Reusable checks for every flow transform (nflows style) and helpers shared by the flow tests."""

import torch
from torch.autograd.functional import jacobian

from tests.tolerance import assert_close_ulps

BASE_KEYS = ("mean", "log_var", "context")


def perturbed(params, scale=0.5, seed=0):
    """A copy of params with every network weight moved by scale * N(0, 1): a non-identity flow."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in params.items():
        if key in BASE_KEYS:
            out[key] = value.clone()
        else:
            noise = torch.randn(value.shape, generator=gen, dtype=value.dtype)
            out[key] = value + scale * noise
    return out


def slice_params(params, i):
    """The parameters of datapoint i alone (shared [1, ...] tensors stay as they are)."""
    return {k: (v if v.shape[0] == 1 else v[i : i + 1]) for k, v in params.items()}


def check_transform(transform, params, inputs, num_terms):
    """Every transform must pass: inverse o forward = id with zero total log|det|, log|det| equal to
    the autograd Jacobian's, no coupling between datapoints or samples, and the same result for
    datapoint i whether run in the batch or alone. Each equality holds up to the rounding of
    num_terms accumulated terms (the conditioners' sums along the whole transform)."""
    num_samples, num_points, num_features = inputs.shape
    outputs, logabsdet = transform.forward(params, inputs)
    assert outputs.shape == inputs.shape and logabsdet.shape == (num_samples, num_points)
    recovered, inverse_logabsdet = transform.inverse(params, outputs)
    # The inverse divides by the scales the forward pass multiplied by: the error is relative to the
    # largest intermediate value, which is at most max(|inputs|, |outputs|).
    size = max(inputs.abs().max(), outputs.abs().max())
    assert_close_ulps(recovered, inputs, num_terms=num_terms, magnitude=size)
    assert_close_ulps(logabsdet + inverse_logabsdet, torch.zeros_like(logabsdet), num_terms=num_terms,
                      magnitude=logabsdet.abs().max())

    # Jacobian of the whole batched map: diagonal blocks give log|det|, off-diagonal blocks must be 0.
    jac = jacobian(lambda x: transform.forward(params, x)[0], inputs)  # [S, N, F, S, N, F]
    for s in range(num_samples):
        for n in range(num_points):
            block = jac[s, n, :, s, n, :]
            expected = torch.linalg.slogdet(block)[1]
            # slogdet's LU is backward stable: its error grows with F and the block's condition number.
            cond = torch.linalg.cond(block).item()
            assert_close_ulps(logabsdet[s, n], expected, num_terms=num_terms + num_features * cond,
                              magnitude=max(logabsdet[s, n].abs().item(), 1.0))
            others = jac[s, n].clone()
            others[:, s, n, :] = 0.0
            # Exactly zero on any CPU: autograd multiplies by structural zeros, never by rounded values.
            assert others.abs().max() == 0.0, "an output depends on another datapoint or sample"

    # Batch independence: datapoint i run alone gives the same output.
    for i in range(num_points):
        alone, alone_logabsdet = transform.forward(slice_params(params, i), inputs[:, i : i + 1])
        assert_close_ulps(alone[:, 0], outputs[:, i], num_terms=num_terms, magnitude=size)
        assert_close_ulps(alone_logabsdet[:, 0], logabsdet[:, i], num_terms=num_terms,
                          magnitude=logabsdet.abs().max())
