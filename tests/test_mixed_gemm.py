"""The half-precision-in, float32-out GEMM the fused linear head sums its head gradient with."""
from __future__ import annotations

import platform
import sys

import pytest
import torch

from kdplug import _mixed_gemm as mixed_gemm
from kdplug.ops import fused_linear_kd

HALF = [torch.bfloat16, torch.float16]
# torch's x86-64 Linux wheels link MKL, which exports both symbols
EXPECTED = (sys.platform.startswith("linux") and platform.machine() == "x86_64"
            and torch.backends.mkl.is_available())


def operands(k, m, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    return torch.randn(m, n, generator=g), a, b


@pytest.mark.parametrize("dtype", HALF)
def test_it_is_found_where_torch_links_mkl(dtype):
    assert mixed_gemm.available(dtype) == EXPECTED


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("k,m,n", [(1, 1, 1), (41, 1271, 33), (256, 517, 24)])
def test_it_adds_the_product_to_float32_against_float64(dtype, k, m, n):
    acc, a, b = operands(k, m, n, dtype)
    want = acc.double() + a.double().t() @ b.double()
    ran = mixed_gemm.addmm_t_(acc, a, b)
    assert ran == EXPECTED
    if ran:
        # float32 accumulation of exact half-precision products: float32 rounding only
        torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5 * k ** 0.5)


@pytest.mark.parametrize("dtype", HALF)
def test_rows_of_a_wider_tensor_and_a_wider_sum_are_read_by_their_strides(dtype):
    acc_wide, a_wide, b_wide = operands(9, 300, 40, dtype, seed=1)
    acc, a, b = acc_wide[:200, 3:20], a_wide[:, 5:205], b_wide[:, 3:20]
    want = acc.double() + a.double().t() @ b.double()
    outside = acc_wide.clone()
    outside[:200, 3:20] = 0
    assert mixed_gemm.addmm_t_(acc, a, b) == EXPECTED
    if EXPECTED:
        torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)
        inside = acc_wide.clone()
        inside[:200, 3:20] = 0
        assert torch.equal(inside, outside)


@pytest.mark.parametrize("case", ["float32 operands", "mixed operands", "half sum",
                                  "column stride", "shape mismatch", "no rows"])
def test_what_it_cannot_do_it_leaves_untouched_and_says_so(case):
    acc, a, b = operands(5, 7, 3, torch.bfloat16)
    if case == "float32 operands":
        a, b = a.float(), b.float()
    elif case == "mixed operands":
        b = b.half()
    elif case == "half sum":
        acc = acc.bfloat16()
    elif case == "column stride":
        a = a.t().contiguous().t()
    elif case == "shape mismatch":
        b = b[:4]
    else:
        a, b = a[:0], b[:0]
    before = acc.clone()
    assert mixed_gemm.addmm_t_(acc, a, b) is False
    assert torch.equal(acc, before)


@pytest.mark.parametrize("dtype", HALF)
def test_the_fused_heads_half_precision_gradient_is_the_same_either_way(dtype, monkeypatch):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(45, 24, generator=g).to(dtype)
    weight = (torch.randn(301, 24, generator=g) / 3).to(dtype)
    teacher_hidden = torch.randn(45, 16, generator=g).to(dtype)
    teacher_weight = torch.randn(301, 16, generator=g).to(dtype)
    labels = torch.randint(0, 301, (45,), generator=g)

    def head_gradient():
        w = weight.clone().requires_grad_()
        fused_linear_kd(hidden, w, teacher_hidden, teacher_weight, labels=labels, alpha=0.5,
                        temperature=2.0, chunk_size=8).backward()
        return w.grad

    one_call = head_gradient()
    monkeypatch.setattr(mixed_gemm, "addmm_t_", lambda acc, a, b: False)
    two_steps = head_gradient()
    assert one_call.dtype == dtype
    # both sum float32; they differ by where the chunk's product is rounded (the two-step path
    # rounds it to the half dtype first), not by more than a unit of the result's precision
    torch.testing.assert_close(one_call.float(), two_steps.float(), rtol=2e-2, atol=2e-3)
