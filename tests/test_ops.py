"""kd_kl_div: the native kernels and the PyTorch fallback against a float64 reference."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kdplug import _ext
from kdplug.ops import kd_kl_div, kd_kl_div_reference

NATIVE = _ext.native_status().available
needs_native = pytest.mark.skipif(not NATIVE, reason=f"native op missing: {_ext.native_status().reason}")
# Every device test runs on the CPU too; the CUDA copies skip only where there is no GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]
LOW_PRECISION = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Each test runs under every CPU capability of this machine (default, avx2, avx512).
pytestmark = pytest.mark.usefixtures("cpu_capability")


def reference(student, teacher, temperature, reduction="batchmean", mask=None):
    """Textbook float64 KD loss, T²·Σ p (log p − log q), with 0·log 0 = 0 (torch's kl_div
    agrees in value, but its target gradient is NaN where p underflows to 0)."""
    s, t = student.double(), teacher.double()
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    p = log_p.exp()
    zero = torch.zeros((), dtype=torch.float64)
    safe = p > 0  # where() on the logs themselves, so no 0·inf reaches the gradient either
    log_ratio = torch.where(safe, log_p, zero) - torch.where(safe, log_q, zero)
    rows = (p * log_ratio).sum(-1) * temperature ** 2
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros((), dtype=rows.dtype))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = rows.numel() if mask is None else max(int(mask.sum()), 1)
    return rows.sum() / count


def reference_grads(student, teacher, temperature, reduction, mask, grad_out):
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = reference(s, t, temperature, reduction, mask)
    gs, gt = torch.autograd.grad(loss, (s, t), grad_out.double())
    return loss.detach(), gs, gt


def assert_grad_close(actual, expected, dtype):
    expected = expected.to(actual.device)
    scale = expected.abs().max().item() or 1.0
    tol = LOW_PRECISION.get(dtype, 2e-5)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def assert_loss_close(actual, expected, dtype):
    expected = expected.to(actual.device)
    tol = 1e-4 if dtype in LOW_PRECISION else 2e-5
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def make_logits(shape, dtype, device, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * spread).to(dtype)
    t = (torch.randn(shape, generator=g) * spread).to(dtype)
    return s.to(device), t.to(device)


def run(student, teacher, temperature, reduction, mask, backend, grad_seed=1):
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_()
    loss = kd_kl_div(student, teacher, temperature, reduction=reduction, mask=mask, backend=backend)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed),
                           dtype=loss.dtype).to(loss.device) * 0.7 + 0.2
    gs, gt = torch.autograd.grad(loss, (student, teacher), grad_out)
    return loss, gs, gt, grad_out


SHAPES = [(1, 1), (7, 2), (41, 1271), (3, 17, 1000), (4, 32000), (1, 128256)]
BACKENDS = ["torch"] + (["native"] if NATIVE else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
def test_matches_float64_reference(device, backend, shape, dtype):
    s, t = make_logits(shape, dtype, device)
    for reduction in ("batchmean", "none"):
        loss, gs, gt, grad_out = run(s, t, 2.0, reduction, None, backend)
        ref_loss, ref_gs, ref_gt = reference_grads(s.cpu(), t.cpu(), 2.0, reduction, None,
                                                   grad_out.cpu())
        assert loss.dtype == torch.float32 and gs.dtype == dtype and gt.dtype == dtype
        assert loss.shape == ref_loss.shape
        assert_loss_close(loss, ref_loss, dtype)
        assert_grad_close(gs, ref_gs, dtype)
        assert_grad_close(gt, ref_gt, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("spread", [3.0, 1e4])
def test_temperatures_and_huge_logits(device, backend, temperature, spread):
    s, t = make_logits((9, 301), torch.float32, device, spread=spread)
    s = s.clamp(-1e4, 1e4)
    t = t.clamp(-1e4, 1e4)
    loss, gs, gt, grad_out = run(s, t, temperature, "none", None, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    ref_loss, ref_gs, ref_gt = reference_grads(s.cpu(), t.cpu(), temperature, "none", None,
                                               grad_out.cpu())
    # s/T is rounded to float32 before the exps: at |s/T| = 2e5 that is 0.008 in log space.
    rel = 2e-5 if spread / temperature < 1e3 else 1e-3
    # loss/T² = Σp(y−x) − lse(y) + lse(x) is a difference of float32 terms of size
    # log C + max|x|; near-equal distributions at large T lose that much absolute precision.
    floor = temperature ** 2 * 2e-7 * (math.log(301) + s.abs().max().item() / temperature)
    torch.testing.assert_close(loss.double(), ref_loss.to(device), rtol=rel,
                               atol=rel * ref_loss.abs().max().item() + floor)
    for got, want in ((gs, ref_gs), (gt, ref_gt)):
        torch.testing.assert_close(got.double(), want.to(device), rtol=rel,
                                   atol=rel * want.abs().max().item() + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 2), (41, 1271), (3, 17, 1000), (5, 20000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mask_excludes_rows(device, backend, shape):
    s, t = make_logits(shape, torch.float32, device)
    mask = (torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)) > 0.4).to(device)
    mask.view(-1)[0] = True
    for reduction in ("none", "sum", "batchmean"):
        loss, gs, gt, grad_out = run(s, t, 1.5, reduction, mask, backend)
        ref_loss, ref_gs, ref_gt = reference_grads(s.cpu(), t.cpu(), 1.5, reduction, mask.cpu(),
                                                   grad_out.cpu())
        assert_loss_close(loss, ref_loss, torch.float32)
        assert_grad_close(gs, ref_gs, torch.float32)
        assert_grad_close(gt, ref_gt, torch.float32)
        assert (gs[~mask] == 0).all() and (gt[~mask] == 0).all()
    # Masked rows may hold anything, NaN included: they are never read.
    s_bad = s.clone()
    s_bad[~mask] = float("nan")
    loss_bad, gs_bad, _, _ = run(s_bad, t, 1.5, "batchmean", mask, backend)
    loss_ok, gs_ok, _, _ = run(s, t, 1.5, "batchmean", mask, backend)
    torch.testing.assert_close(loss_bad, loss_ok)
    torch.testing.assert_close(gs_bad, gs_ok)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_gives_zero_not_nan(backend):
    s, t = make_logits((4, 10), torch.float32, "cpu")
    mask = torch.zeros(4, dtype=torch.bool)
    loss, gs, _, _ = run(s, t, 2.0, "batchmean", mask, backend)
    assert loss.item() == 0.0 and (gs == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 50), (3, 20000), (1, 128256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_teacher_minus_inf_is_probability_zero(device, backend, shape):
    s, t = make_logits(shape, torch.float32, device)
    t[:, ::3] = float("-inf")  # e.g. a masked vocabulary
    t[:, 4096:12288] = float("-inf")  # whole stretches of a long row, where kernels split it
    loss, gs, gt, grad_out = run(s, t, 2.0, "none", None, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    ref_loss, ref_gs, _ = reference_grads(s.cpu(), t.cpu(), 2.0, "none", None, grad_out.cpu())
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(gs, ref_gs, torch.float32)
    assert (gt[t == float("-inf")] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_row(device, backend):
    s, t = make_logits((3, 40), torch.float32, device)
    s[1, 7] = float("nan")
    loss, gs, _, _ = run(s, t, 2.0, "none", None, backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(gs[1]).any() and torch.isfinite(gs[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    base_s, base_t = make_logits((12, 2 * 333), torch.float32, device)
    s, t = base_s[::2, ::2], base_t.t().contiguous().t()[::2, ::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    loss, gs, gt, grad_out = run(s, t, 3.0, "batchmean", None, backend)
    ref_loss, ref_gs, ref_gt = reference_grads(s.cpu(), t.cpu(), 3.0, "batchmean", None,
                                               grad_out.cpu())
    assert_loss_close(loss, ref_loss, torch.float32)
    assert_grad_close(gs, ref_gs, torch.float32)
    assert_grad_close(gt, ref_gt, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_grad_gets_none_and_student_still_right(backend):
    s, t = make_logits((5, 64), torch.float32, "cpu")
    student = s.clone().requires_grad_()
    loss = kd_kl_div(student, t, 2.0, backend=backend)
    loss.backward()
    _, ref_gs, _ = reference_grads(s, t, 2.0, "batchmean", None, torch.tensor(1.0))
    assert t.grad is None
    assert_grad_close(student.grad, ref_gs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_with_retain_graph(backend):
    s, t = make_logits((5, 64), torch.float32, "cpu")
    student = s.clone().requires_grad_()
    loss = kd_kl_div(student, t, 2.0, backend=backend)
    (g1,) = torch.autograd.grad(loss, student, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, student, torch.tensor(3.0))
    torch.testing.assert_close(g2, 3 * g1)


@needs_native
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_gradcheck_float64(reduction):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(6, 9, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.tensor([True, False, True, True, True, False])
    for m in (None, mask):
        fn = lambda a, b: kd_kl_div(a, b, 0.7, reduction=reduction, mask=m, backend="native")
        assert torch.autograd.gradcheck(fn, (s, t))


@needs_native
def test_torch_compile_fullgraph():
    s, t = make_logits((8, 100), torch.float32, "cpu")
    fn = torch.compile(lambda a, b: kd_kl_div(a, b, 2.0) * 0.5, fullgraph=True)
    student = s.clone().requires_grad_()
    loss = fn(student, t)
    loss.backward()
    _, ref_gs, _ = reference_grads(s, t, 2.0, "batchmean", None, torch.tensor(0.5))
    assert_loss_close(loss, reference(s, t, 2.0) * 0.5, torch.float32)
    assert_grad_close(student.grad, ref_gs, torch.float32)


@needs_native
def test_reused_gradient_buffer_is_never_shared_with_a_live_gradient():
    """Large CPU gradients reuse one buffer; a gradient the caller still holds must survive."""
    s, t = make_logits((64, 70000), torch.float32, "cpu")  # 17.9 MB: above the reuse threshold
    first = s.clone().requires_grad_()
    kd_kl_div(first, t, 2.0).backward()
    kept = first.grad.clone()
    second = (s * 0.5).requires_grad_()
    kd_kl_div(second, t, 2.0).backward()
    torch.testing.assert_close(first.grad, kept)
    _, ref_gs, _ = reference_grads(s * 0.5, t, 2.0, "batchmean", None, torch.tensor(1.0))
    assert_grad_close(second.grad, ref_gs, torch.float32)


# ----------------------------------------------------------------------------- bad input

def _ok():
    return torch.randn(3, 5), torch.randn(3, 5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("call, error, message", [
    (lambda s, t, b: kd_kl_div(s, t[:, :4], backend=b), ValueError, r"student_logits \(3, 5\) and teacher_logits \(3, 4\)"),
    (lambda s, t, b: kd_kl_div(s.long(), t.long(), backend=b), TypeError, r"floating-point logits.*torch.int64"),
    (lambda s, t, b: kd_kl_div(s, t.double(), backend=b), TypeError, r"same dtype"),
    (lambda s, t, b: kd_kl_div(s, t, 0.0, backend=b), ValueError, r"temperature must be finite and > 0, got 0.0"),
    (lambda s, t, b: kd_kl_div(s, t, -1, backend=b), ValueError, r"temperature must be finite and > 0, got -1.0"),
    (lambda s, t, b: kd_kl_div(s, t, float("nan"), backend=b), ValueError, r"got nan"),
    (lambda s, t, b: kd_kl_div(s, t, float("inf"), backend=b), ValueError, r"got inf"),
    (lambda s, t, b: kd_kl_div(s, t, "2", backend=b), TypeError, r"temperature must be a number, got str"),
    (lambda s, t, b: kd_kl_div(s, t, reduction="mean", backend=b), ValueError, r"reduction must be one of .*'mean'"),
    (lambda s, t, b: kd_kl_div(s, t, mask=torch.ones(3), backend=b), TypeError, r"mask must have dtype torch.bool"),
    (lambda s, t, b: kd_kl_div(s, t, mask=torch.ones(4, dtype=torch.bool), backend=b), ValueError, r"mask must have the logits' leading shape \(3,\), got \(4,\)"),
    (lambda s, t, b: kd_kl_div(s[:0], t[:0], backend=b), ValueError, r"at least one row and one class"),
    (lambda s, t, b: kd_kl_div(s[:, :0], t[:, :0], backend=b), ValueError, r"at least one row and one class"),
    (lambda s, t, b: kd_kl_div(s.numpy(), t, backend=b), TypeError, r"student_logits must be a torch.Tensor, got ndarray"),
    (lambda s, t, b: kd_kl_div(s, t, backend="cuda"), ValueError, r"backend must be one of"),
], ids=["shape", "int", "dtype-mix", "T0", "Tneg", "Tnan", "Tinf", "Tstr", "reduction",
        "mask-dtype", "mask-shape", "no-rows", "no-classes", "not-tensor", "backend"])
def test_bad_input_is_a_clear_error(backend, call, error, message):
    s, t = _ok()
    with pytest.raises(error, match=message):
        call(s, t, backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_devices_differ_is_a_clear_error():
    s, t = _ok()
    with pytest.raises(ValueError, match="same device"):
        kd_kl_div(s, t.cuda())


def test_devices_differ_is_a_clear_error_on_cpu_too():
    s, t = _ok()
    with pytest.raises(ValueError, match=r"student_logits on cpu and teacher_logits on meta"):
        kd_kl_div(s, t.to("meta"))


# ----------------------------------------------------------------------------- backends

def test_force_torch_env_uses_fallback_and_native_refuses(monkeypatch):
    monkeypatch.setenv("KDPLUG_FORCE_TORCH", "1")
    s, t = _ok()
    torch.testing.assert_close(kd_kl_div(s, t, 2.0), kd_kl_div_reference(s, t, 2.0))
    with pytest.raises(RuntimeError, match="KDPLUG_FORCE_TORCH=1"):
        kd_kl_div(s, t, backend="native")


def test_missing_native_warns_once_and_native_backend_raises(monkeypatch):
    missing = _ext.NativeStatus(False, "missing", "prebuilt kdplug._C not importable (test)")
    monkeypatch.setattr(_ext, "_status", missing)
    monkeypatch.setattr(_ext, "_warned", False)
    s, t = _ok()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = kd_kl_div(s, t, 2.0)
        kd_kl_div(s, t, 2.0)
    fallback_warnings = [w for w in caught if "PyTorch fallback" in str(w.message)]
    assert len(fallback_warnings) == 1 and "not importable (test)" in str(fallback_warnings[0].message)
    torch.testing.assert_close(a, kd_kl_div_reference(s, t, 2.0))
    with pytest.raises(RuntimeError, match=r"backend='native' is not available: prebuilt"):
        kd_kl_div(s, t, backend="native")


def test_backend_status_reports_the_choice():
    from kdplug.ops import backend_status

    status = backend_status()
    assert status["backend"] in ("native", "torch")
    assert status["native_available"] == NATIVE
    if NATIVE:
        assert "cpu" in status["native_devices"]
    assert status["reason"]
