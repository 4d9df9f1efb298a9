"""Test tolerances: rounding allowances from the dtype's resolution, sampling allowances from Monte Carlo error.

Two floats computed separately (batched vs alone, fused vs plain, another CPU's SIMD width) agree only up
to rounding, which scales with eps(dtype), with the size of the values involved and with the number of
rounded operations that produced them. Bit-exact comparisons are kept only where both sides run the same
op sequence on the same inputs in the same process, and say so where they are made.
"""

import torch

FACTOR = 8.0  # allowance in units of eps per accumulated term: covers reassociation, FMA and libm differences


def float_tol(dtype, magnitude, num_terms=1, factor=FACTOR):
    """Absolute rounding allowance: factor * num_terms * eps(dtype) * max|magnitude| (the largest value involved)."""
    size = torch.as_tensor(magnitude).detach().double().abs().max().item()
    return factor * num_terms * torch.finfo(dtype).eps * size


def assert_close_ulps(actual, expected, num_terms=1, factor=FACTOR, magnitude=None):
    """assert_close with rtol 0 and atol = float_tol(expected's dtype, magnitude or max|expected|, num_terms, factor)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    size = expected if magnitude is None else magnitude
    atol = float_tol(expected.dtype if expected.is_floating_point() else torch.float64, size, num_terms, factor)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol)


def mc_tol(*stderrs, k=4.0):
    """Statistical allowance k * sqrt(sum of squared standard errors): k = 4 fails a correct result ~1 in 16,000."""
    return k * sum(torch.as_tensor(se).double() ** 2 for se in stderrs).sqrt()
