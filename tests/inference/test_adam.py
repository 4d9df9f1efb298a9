"""Adam on per-datapoint rows: the in-place step (torch's fused kernel where it exists, else in-place
arithmetic) against Adam written out for one row in float64, and the copying update against it."""

import pytest
import torch

from gapbench.inference import adam
from gapbench.inference.adam import adam_step_, adam_update_, finite_rows
from tests.tolerance import float_tol


def _state(dtype, n=5, p=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    param, grad = (torch.randn(n, p, generator=gen, dtype=dtype) for _ in range(2))
    m = 0.1 * torch.randn(n, p, generator=gen, dtype=dtype)
    v = 0.1 * torch.rand(n, p, generator=gen, dtype=dtype)
    return param, grad, m, v


def _adam_one_row(param, grad, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    return param - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps), m, v


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_row_lr", [False, True])
def test_in_place_step_is_the_per_row_update(monkeypatch, fused, dtype, per_row_lr):
    if not fused:
        monkeypatch.setattr(adam, "_has_fused_adam", lambda param: False)
    elif not adam._has_fused_adam(torch.zeros(1, dtype=dtype)):
        pytest.skip("this torch has no fused Adam kernel on a CPU")
    param, grad, m, v = _state(dtype)
    step = torch.tensor([1, 2, 7, 2, 300])  # each row's own t: its own bias corrections
    lr = torch.tensor([1e-2, 5e-3, 1e-2, 2.5e-3, 5e-3], dtype=dtype) if per_row_lr else 1e-2
    p1, m1, v1 = param.clone(), m.clone(), v.clone()
    adam_step_(p1, grad, m1, v1, step, lr)
    # Adam itself, row by row in float64: m and v are one multiply-add each; the parameter's step,
    # ~lr in size, is rounded through a few operations
    for i in range(param.shape[0]):
        rate = float(lr[i]) if per_row_lr else lr
        ref, ref_m, ref_v = _adam_one_row(*(t[i].double() for t in (param, grad, m, v)), int(step[i]), rate)
        torch.testing.assert_close(p1[i].double(), ref, rtol=0, atol=float_tol(dtype, param.abs().max(), num_terms=4))
        torch.testing.assert_close(m1[i].double(), ref_m, rtol=0, atol=float_tol(dtype, grad.abs().max(), num_terms=4))
        torch.testing.assert_close(v1[i].double(), ref_v, rtol=0,
                                   atol=float_tol(dtype, (grad * grad).abs().max(), num_terms=4))
    # adam_update_: the same step on a copy, the parameters given left as they were
    m2, v2, before = m.clone(), v.clone(), param.clone()
    new = adam_update_(param, grad, m2, v2, step, lr.unsqueeze(1) if per_row_lr else lr)
    assert torch.equal(param, before) and torch.equal(new, p1) and torch.equal(m2, m1) and torch.equal(v2, v1)
    assert (p1 - param).abs().max() > 1e-4  # the step moved the parameters


def test_finite_rows_tells_overflowing_sums_from_non_finite_entries():
    big = torch.finfo(torch.float32).max / 2
    grad = torch.zeros(4, 5)
    grad[0] = big  # finite, but its float32 sum overflows
    grad[1, 2] = float("inf")
    grad[2, 0] = float("nan")
    assert finite_rows(grad).tolist() == [True, False, False, True]
    assert finite_rows(torch.ones(3, 2)).tolist() == [True, True, True]
