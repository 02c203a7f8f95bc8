"""Property test of kd_loss against the float64 reference written from each divergence's formula:
random shapes, temperatures, logit scales, masks, labels and dtypes (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdplug import _ext
from kdplug.ops import DIVERGENCES, kd_loss

from test_ops import LOW_PRECISION
from test_ops_divergences import assert_close_scaled, float32_floor, reference_grads

BACKENDS = ["torch"] + (["native"] if _ext.native_status().available else [])


@st.composite
def problems(draw):
    rows = draw(st.integers(1, 12))
    classes = draw(st.one_of(st.integers(1, 140), st.integers(141, 3000)))  # both CPU kernels
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.floats(0.1, 30.0))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    student = (torch.randn(rows, classes, generator=g) * scale).to(dtype)
    teacher = (torch.randn(rows, classes, generator=g) * scale).to(dtype)
    mask = torch.rand(rows, generator=g) > draw(st.sampled_from([0.0, 0.3]))
    labels = torch.randint(0, classes, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.2] = -100
    return dict(
        student=student, teacher=teacher,
        temperature=draw(st.sampled_from([0.05, 0.3, 1.0, 2.5, 8.0, 100.0])),
        name=draw(st.sampled_from(sorted(DIVERGENCES))),
        beta=draw(st.floats(0.05, 0.95)),
        mask=draw(st.sampled_from([None, mask])),
        labels=labels, alpha=draw(st.sampled_from([0.0, 0.4, 1.0])),
        reduction=draw(st.sampled_from(["none", "sum", "batchmean"])),
        grad_seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems())
def test_kd_loss_matches_the_float64_reference(backend, case):
    s, t, temperature, name = case["student"], case["teacher"], case["temperature"], case["name"]
    kw = dict(beta=case["beta"], labels=case["labels"], alpha=case["alpha"],
              reduction=case["reduction"], mask=case["mask"])
    student = s.clone().requires_grad_()
    loss = kd_loss(student, t, temperature, divergence=name, backend=backend, **kw)
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(case["grad_seed"]))
    grad_out = grad_out + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_out)
    ref_loss, ref_grad, _ = reference_grads(s, t, temperature, name, grad_out, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == s.dtype
    if name == "reverse_kl":  # finite logits: no teacher probability is exactly 0 in float64
        assert torch.isfinite(loss).all()
    # float32's floor for each term: the divergence's (size T²) and the cross-entropy's (T = 1)
    floor = (float32_floor(temperature, s.shape[-1], s.float())
             + (1 - case["alpha"]) * float32_floor(1.0, s.shape[-1], s.float()))
    low = s.dtype in LOW_PRECISION
    # (per row: a sum of rows adds up their errors, e.g. ~1e-7·T² per row of one class at T = 8,
    # where every divergence is 0 and float32's log of the mixture is off by an ulp or two)
    rows_summed = s.shape[0] if case["reduction"] == "sum" else 1
    assert_close_scaled(loss, ref_loss, 1e-4 if low else 2e-5, floor * rows_summed)
    grad_tol = LOW_PRECISION.get(s.dtype, 2e-4 if temperature >= 100 else 2e-5)
    if name == "tvd":  # compared away from its kink, where float32 cannot tell p from q
        near_tie = tvd_near_tie(s, t, temperature)
        grad, ref_grad = grad[~near_tie], ref_grad[~near_tie]
    assert_close_scaled(grad, ref_grad, grad_tol, floor / temperature)


def tvd_near_tie(s, t, temperature):
    """Classes where |p − q| is within a few times float32's error on p and q (log-probabilities
    good to about 4e-7·(log C + max|x|/T), as float32_floor says). TVD's gradient holds
    sign(p − q) per class, so there rounding alone may flip it: at T = 100 with bf16 logits (a
    student logit equal to the teacher's is common at 8 bits) the float32 path and the float64
    reference gave opposite signs in one class of 2639."""
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    scale = max(s.abs().max().item(), t.abs().max().item()) / temperature
    error = 8 * 4e-7 * (torch.log(torch.tensor(s.shape[-1] + 1.0)).item() + scale)
    return (p - q).abs() <= error * (p + q)
