"""kd_kl_div_topk and kd_loss_topk: a teacher known on its top-k classes, against float64
references built independently of the op (the dense loss with the other classes at −inf, and an
explicit (k + 1)-class distribution for the rest bucket)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdplug import _ext
from kdplug.ops import kd_kl_div_topk, kd_kl_div_topk_reference

from test_ops import assert_grad_close, assert_loss_close, reference

NATIVE = _ext.native_status().available
# Each test runs under every CPU capability of this machine (default, avx2, avx512).
pytestmark = pytest.mark.usefixtures("cpu_capability")
BACKENDS = ["torch"] + (["native"] if NATIVE else [])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]
CASES = [((1, 1), 1), ((7, 2), 1), ((7, 2), 2), ((41, 1271), 8), ((3, 17, 1000), 32),
         ((4, 32000), 128)]


def topk_teacher(shape, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g) * 3
    teacher = torch.randn(shape, generator=g) * 3
    logprobs, indices = F.log_softmax(teacher, -1).topk(k, dim=-1)
    return student.to(device), indices.to(device), logprobs.to(device)


def dense_reference(student, indices, logprobs, temperature, reduction, mask):
    """renormalize: the dense loss with the teacher's other classes at −inf, in float64."""
    dense = torch.full(student.shape, float("-inf"), dtype=torch.float64)
    dense.scatter_(-1, indices.long().cpu(), logprobs.double().cpu())
    s = student.detach().double().cpu().requires_grad_()
    loss = reference(s, dense, temperature, reduction, None if mask is None else mask.cpu())
    return loss, s


def bucket_reference(student, indices, logprobs, temperature, reduction, mask):
    """bucket: KL over k + 1 classes (the top-k and one rest class), in float64."""
    s = student.detach().double().cpu().requires_grad_()
    values = logprobs.double().cpu()
    idx = indices.long().cpu()
    rest = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(0)
    p = torch.cat([(1 - rest) * F.softmax(values / temperature, -1), rest], -1)
    q_k = F.softmax(s / temperature, -1).gather(-1, idx)
    # the op's documented floor for the student's rest: with k = C it is exactly 0, while the
    # teacher's float32 log-probabilities leave it a rounding-sized rest
    q = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True)).clamp_min(1e-30)], -1)
    safe = p > 0
    zero = torch.zeros((), dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)  # logs of 1 where p = 0: no 0·inf in the gradient
    rows = (p * (torch.where(safe, p, one).log() - torch.where(safe, q, one).log())).sum(-1)
    rows = rows * temperature ** 2
    if mask is not None:
        rows = torch.where(mask.cpu(), rows, zero)
    if reduction == "none":
        return rows, s
    if reduction == "sum":
        return rows.sum(), s
    count = rows.numel() if mask is None else max(int(mask.sum()), 1)
    return rows.sum() / count, s


def run(student, indices, logprobs, temperature, reduction, mask, rest, backend, dtype):
    s = student.to(dtype).clone().requires_grad_()
    loss = kd_kl_div_topk(s, indices, logprobs, temperature, reduction=reduction, mask=mask,
                          rest=rest, backend=backend)
    grad_out = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)) + 0.5).to(
        loss.device)
    (grad,) = torch.autograd.grad(loss, s, grad_out)
    return loss, grad, grad_out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rest", ["renormalize", "bucket"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[-1])
def test_matches_float64_reference(device, backend, rest, case, dtype):
    shape, k = case
    student, indices, logprobs = topk_teacher(shape, k, device)
    student = student.to(dtype).float()  # the reference sees exactly the op's input values
    mask = None
    if len(shape) == 3:
        mask = (torch.arange(shape[0] * shape[1]) % 5 != 2).reshape(shape[:-1]).to(device)
    build = dense_reference if rest == "renormalize" else bucket_reference
    for temperature in (0.5, 1.0, 4.0):
        for reduction in ("batchmean", "none"):
            loss, grad, grad_out = run(student, indices, logprobs, temperature, reduction, mask,
                                       rest, backend, dtype)
            ref_loss, s = build(student, indices, logprobs, temperature, reduction, mask)
            (ref_grad,) = torch.autograd.grad(ref_loss, s, grad_out.double().cpu())
            assert loss.dtype == torch.float32 and grad.dtype == dtype
            assert_loss_close(loss, ref_loss.detach(), dtype)
            assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.skipif(not NATIVE, reason="native op not built")
@pytest.mark.parametrize("rest", ["renormalize", "bucket"])
def test_native_matches_fallback_with_mask_and_all_reductions(rest):
    student, indices, logprobs = topk_teacher((6, 11, 300), 16, "cpu", seed=3)
    mask = torch.rand(6, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    indices[~mask] = 0  # padding rows may hold anything, even repeated classes
    for reduction in ("none", "sum", "batchmean"):
        a, ga, _ = run(student, indices, logprobs, 2.0, reduction, mask, rest, "native",
                       torch.float32)
        b, gb, _ = run(student, indices, logprobs, 2.0, reduction, mask, rest, "torch",
                       torch.float32)
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(ga, gb, rtol=2e-5, atol=1e-7)
        assert (ga[~mask] == 0).all()


@pytest.mark.skipif(not NATIVE, reason="native op not built")
def test_full_topk_renormalized_equals_dense_loss():
    from kdplug.ops import kd_kl_div

    student, indices, logprobs = topk_teacher((5, 40), 40, "cpu")
    dense_teacher = torch.empty_like(student).scatter_(-1, indices, logprobs)
    torch.testing.assert_close(kd_kl_div_topk(student, indices, logprobs, 3.0),
                               kd_kl_div(student, dense_teacher, 3.0), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not NATIVE, reason="native op not built")
def test_opcheck_and_compile():
    student, indices, logprobs = topk_teacher((4, 50), 5, "cpu")
    op = torch.ops.kdplug.kd_loss_topk_fwd.default
    mask = torch.tensor([True, False, True, True])
    labels = torch.tensor([3, 0, -100, 49])
    torch.library.opcheck(op, (student.clone().requires_grad_(), indices, logprobs, 2.0, 0, 0.5,
                               None, 1.0, -100, None, 2, False, None, True))
    for code in (0, 1, 2):
        torch.library.opcheck(op, (student.clone().requires_grad_(), indices, logprobs, 0.7, code,
                                   0.3, labels, 0.6, -100, mask, 0, True, None, True))
    fn = torch.compile(lambda s: kd_kl_div_topk(s, indices, logprobs, 2.0, rest="bucket"),
                       fullgraph=True)
    s = student.clone().requires_grad_()
    fn(s).backward()
    ref = student.clone().requires_grad_()
    kd_kl_div_topk_reference(ref, indices, logprobs, 2.0, rest="bucket").backward()
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_input_is_a_clear_error(backend):
    student, indices, logprobs = topk_teacher((3, 10), 4, "cpu")

    def call(s=student, i=indices, v=logprobs, **kw):
        return kd_kl_div_topk(s, i, v, **{"backend": backend, **kw})

    cases = [
        (dict(i=indices.float()), TypeError, r"teacher_indices must hold class indices"),
        (dict(v=logprobs.long()), TypeError, r"teacher_logprobs must hold log-probabilities"),
        (dict(v=logprobs[:, :3]), ValueError, r"\(3, 4\) and teacher_logprobs \(3, 3\)"),
        (dict(i=indices[:2], v=logprobs[:2]), ValueError, r"teacher's rows \(2,\) differ"),
        (dict(i=indices.repeat(1, 3), v=logprobs.repeat(1, 3)), ValueError,
         r"k = 12 teacher classes per row, expected 1 <= k <= 10"),
        (dict(i=indices.clone().fill_(10)), ValueError, r"must lie in \[0, 10\), found 10"),
        (dict(i=indices.clone().fill_(-1)), ValueError, r"found -1"),
        (dict(i=torch.cat([indices[:, :1], indices[:, :3]], -1)), ValueError,
         r"distinct within a row; counted row 0 repeats"),
        (dict(v=logprobs + 2, rest="bucket"), ValueError, r"exp sums to .* > 1"),
        (dict(rest="drop"), ValueError, r"rest must be one of"),
        (dict(v=logprobs.clone().requires_grad_()), ValueError, r"no gradient to the teacher"),
        (dict(temperature=0), ValueError, r"temperature must be finite and > 0, got 0.0"),
        (dict(mask=torch.ones(2, dtype=torch.bool)), ValueError, r"leading shape \(3,\)"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            call(**kwargs)


@pytest.mark.skipif(not NATIVE, reason="native op not built")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bitmap", ["shared", "global"])
@pytest.mark.parametrize("shape, k", [((3, 16385), 40), ((1, 262145), 100)],
                         ids=["block-size-switch", "bitmap-beyond-shared"])
def test_large_rows_both_bitmaps(device, bitmap, shape, k, monkeypatch):
    """Where the CUDA kernel changes block size or keeps its top-k bitmap in global memory
    (KDPLUG_CUDA_TOPK_BITMAP); on the CPU the same shapes check the segmented outside sums."""
    monkeypatch.setenv("KDPLUG_CUDA_TOPK_BITMAP", bitmap)
    student, indices, logprobs = topk_teacher(shape, k, device, seed=7)
    for rest in ("renormalize", "bucket"):
        loss, grad, grad_out = run(student, indices, logprobs, 1.5, "none", None, rest, "native",
                                   torch.float16)
        build = dense_reference if rest == "renormalize" else bucket_reference
        ref_loss, s = build(student.half().float(), indices, logprobs, 1.5, "none", None)
        (ref_grad,) = torch.autograd.grad(ref_loss, s, grad_out.double().cpu())
        assert_loss_close(loss, ref_loss.detach(), torch.float16)
        assert_grad_close(grad, ref_grad, torch.float16)


# ----------------------------------------------------------------------------- other divergences

from test_ops_divergences import NAMES, divergence_reference  # noqa: E402
from test_ops_divergences import reference as dense_divergence_reference  # noqa: E402
from kdplug.ops import kd_loss_topk  # noqa: E402


def bins_reference(student, indices, logprobs, temperature, name, beta, rest, labels, alpha,
                   mask):
    """The divergence over k + 1 bins in float64 (teacher: (1 − r)·softmax(v/T) and r, r = 0 to
    renormalize; student: its softmax at the k classes and 1 − their sum, floored at 1e-30 inside
    the log), then α·T²·D + (1 − α)·CE with the batchmean of each term over its own rows."""
    s = student.detach().double().cpu().requires_grad_()
    values = logprobs.double().cpu()
    idx = indices.long().cpu()
    r = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(0)
    if rest == "renormalize":
        r = torch.zeros_like(r)
    p = torch.cat([(1 - r) * F.softmax(values / temperature, -1), r], -1)
    q_k = F.softmax(s / temperature, -1).gather(-1, idx)
    q_rest = 1 - q_k.sum(-1, keepdim=True)
    q = torch.cat([q_k, q_rest], -1)
    log_q = torch.cat([q_k.log(), q_rest.clamp_min(1e-30).log()], -1)
    rows = divergence_reference(p, q, p.log(), log_q, name, beta) * temperature ** 2
    keep = torch.ones(rows.shape, dtype=torch.bool) if mask is None else mask.cpu()
    zero = torch.zeros((), dtype=torch.float64)
    rows = torch.where(keep, rows, zero)
    loss = rows.sum() / max(int(keep.sum()), 1)
    if labels is not None and alpha < 1:
        flat = labels.cpu().reshape(-1)
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), flat.clamp_min(0), reduction="none")
        counted = keep.reshape(-1) & (flat != -100)
        ce = torch.where(counted, ce, zero)
        loss = alpha * loss + (1 - alpha) * ce.sum() / max(int(counted.sum()), 1)
    return loss, s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, rest", [(n, r) for n in NAMES for r in ("renormalize", "bucket")
                                        if (n, r) != ("reverse_kl", "renormalize")])  # refused
@pytest.mark.parametrize("case", [((7, 3), 2), ((41, 1271), 8), ((3, 17, 1000), 32)],
                         ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
def test_divergences_and_fused_ce_match_float64_bins(backend, name, rest, case):
    shape, k = case
    student, indices, logprobs = topk_teacher(shape, k, "cpu", seed=len(name))
    labels = torch.randint(0, shape[-1], shape[:-1], generator=torch.Generator().manual_seed(9))
    labels.view(-1)[::4] = -100
    mask = (torch.arange(labels.numel()) % 5 != 2).reshape(shape[:-1])
    for temperature, alpha, dtype in ((1.0, 0.3, torch.float32), (4.0, 1.0, torch.bfloat16),
                                      (0.5, 0.0, torch.float32)):
        s = student.to(dtype).clone().requires_grad_()
        loss = kd_loss_topk(s, indices, logprobs, temperature, divergence=name, beta=0.3,
                            labels=labels, alpha=alpha, mask=mask, rest=rest, backend=backend)
        loss.backward(torch.tensor(1.7))
        ref, ref_s = bins_reference(student.to(dtype).float(), indices, logprobs, temperature,
                                    name, 0.3, rest, labels, alpha, mask)
        (ref_grad,) = torch.autograd.grad(ref * 1.7, ref_s)
        assert_loss_close(loss, ref.detach(), dtype)
        assert_grad_close(s.grad, ref_grad, dtype)
        if rest == "renormalize" and alpha == 1.0:  # = the dense divergence, teacher -inf elsewhere
            dense = torch.full(shape, float("-inf"), dtype=torch.float64)
            dense.scatter_(-1, indices, logprobs.double())
            want = dense_divergence_reference(student.to(dtype).double(), dense, temperature,
                                              name, beta=0.3, mask=mask)
            assert_loss_close(loss, want, dtype)


def test_reverse_kl_against_a_renormalized_teacher_is_refused():
    student, indices, logprobs = topk_teacher((3, 10), 4, "cpu")
    with pytest.raises(ValueError, match=r"reverse_kl.*renormalized.*use rest='bucket'"):
        kd_loss_topk(student, indices, logprobs, divergence="reverse_kl")
