"""kd_loss: every divergence, optionally fused with the hard-label cross-entropy, on the native
kernels and the PyTorch fallback, against float64 references written from each formula."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdplug import _ext
from kdplug.ops import DIVERGENCES, kd_kl_div, kd_loss, kd_loss_reference

from test_ops import LOW_PRECISION

pytestmark = pytest.mark.usefixtures("cpu_capability")
NATIVE = _ext.native_status().available
needs_native = pytest.mark.skipif(not NATIVE, reason="native op not built")
BACKENDS = ["torch"] + (["native"] if NATIVE else [])
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]
NAMES = list(DIVERGENCES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_id = lambda d: str(d).split(".")[-1]  # noqa: E731
shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


# ----------------------------------------------------------------------------- float64 references

def kl(a, log_a, log_b):
    """KL(a ‖ b) = Σ a (log a − log b), 0·log 0 = 0 (the logs are replaced where a = 0, so no
    0·inf reaches the value or the gradient)."""
    zero = torch.zeros((), dtype=a.dtype)
    return (a * (torch.where(a > 0, log_a, zero) - torch.where(a > 0, log_b, zero))).sum(-1)


def safe_log(m):
    """log m where m > 0; 0 where m = 0 (only ever weighted by 0 there), so that no inf reaches
    the gradient through torch.where (where both p and q underflow even float64: T = 0.05)."""
    return torch.where(m > 0, m, torch.ones((), dtype=m.dtype)).log()


def divergence_reference(p, q, log_p, log_q, name, beta):
    """Each divergence from its definition, in the float64 tensors given."""
    if name == "kl":
        return kl(p, log_p, log_q)
    if name == "reverse_kl":  # KL(q ‖ p): not made safe where p = 0 — it is infinite there
        zero = torch.zeros((), dtype=q.dtype)
        return (q * (torch.where(q > 0, log_q, zero) - torch.where(q > 0, log_p, zero))).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, log_p, safe_log(m)) + (1 - beta) * kl(q, log_q, safe_log(m))
    if name == "skew_kl":
        return kl(p, log_p, safe_log(beta * p + (1 - beta) * q))
    if name == "skew_reverse_kl":
        return kl(q, log_q, safe_log(beta * q + (1 - beta) * p))
    raise AssertionError(name)


def reduce(rows, reduction, count):
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / max(count, 1)


def reference(student, teacher, temperature, name, beta=0.5, labels=None, alpha=1.0,
              reduction="batchmean", mask=None, ignore_index=-100):
    """α·T²·D + (1 − α)·CE in float64, each term reduced over its own rows (CE: F.cross_entropy
    at T = 1 over the counted rows whose label is not ignore_index)."""
    s, t = student.double(), teacher.double()
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    rows = divergence_reference(log_p.exp(), log_q.exp(), log_p, log_q, name, beta)
    rows = rows * temperature ** 2
    keep = torch.ones(rows.shape, dtype=torch.bool) if mask is None else mask.cpu()
    zero = torch.zeros((), dtype=torch.float64)
    rows = torch.where(keep, rows, zero)
    if labels is None or alpha == 1.0:
        return reduce(rows, reduction, int(keep.sum()))
    flat = labels.cpu().long().reshape(-1)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), flat.clamp_min(0), reduction="none")
    counted = keep.reshape(-1) & (flat != ignore_index)
    ce = torch.where(counted, ce, zero).reshape(rows.shape)
    if reduction == "none":
        return alpha * rows + (1 - alpha) * ce
    return (alpha * reduce(rows, reduction, int(keep.sum()))
            + (1 - alpha) * reduce(ce, reduction, int(counted.sum())))


def reference_grads(student, teacher, temperature, name, grad_out, **kw):
    s = student.detach().double().cpu().requires_grad_()
    t = teacher.detach().double().cpu().requires_grad_()
    loss = reference(s, t, temperature, name, **kw)
    gs, gt = torch.autograd.grad(loss, (s, t), grad_out.double().cpu())
    return loss.detach(), gs, gt


# ----------------------------------------------------------------------------- helpers

def make(shape, dtype, device, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * spread).to(dtype)
    t = (torch.randn(shape, generator=g) * spread).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return s.to(device), t.to(device), labels.to(device)


def float32_floor(temperature, classes, logits):
    """What float32 arithmetic can promise on a loss of size T²: log-probabilities carry an
    absolute error of about 1e-7·(log C + max|x|) (see the README's precision note)."""
    return temperature ** 2 * 4e-7 * (math.log(classes + 1) + logits.abs().max().item() / temperature)


def assert_close_scaled(actual, expected, rtol, floor=0.0):
    expected = expected.to(actual.device)
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale + floor)


def run(s, t, temperature, name, backend, teacher_grad, grad_seed=1, **kw):
    student = s.detach().clone().requires_grad_()
    teacher = t.detach().clone().requires_grad_(teacher_grad)
    loss = kd_loss(student, teacher, temperature, divergence=name, backend=backend, **kw)
    grad_out = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(grad_seed),
                           dtype=loss.dtype) * 0.8 + 0.6).to(loss.device)
    wrt = (student, teacher) if teacher_grad else (student,)
    grads = torch.autograd.grad(loss, wrt, grad_out)
    return loss, grads[0], grads[1] if teacher_grad else None, grad_out


# A covering set of the other dimensions (each value of each appears; the full product would be
# thousands of cases): temperature, mask, alpha, teacher −inf entries, teacher grad, reduction.
CONFIGS = [
    dict(temperature=0.05, mask=False, alpha=1.0, minus_inf=True, teacher_grad=True,
         reduction="batchmean"),
    dict(temperature=1.0, mask=True, alpha=0.3, minus_inf=False, teacher_grad=True,
         reduction="none"),
    dict(temperature=4.0, mask=True, alpha=0.0, minus_inf=True, teacher_grad=False,
         reduction="sum"),
    dict(temperature=100.0, mask=False, alpha=0.3, minus_inf=True, teacher_grad=True,
         reduction="batchmean"),
    dict(temperature=2.0, mask=True, alpha=1.0, minus_inf=False, teacher_grad=False,
         reduction="none"),
]
# 37 x 100: the small-class kernel's blocks of 16 rows that all count (no per-row bookkeeping)
# and a partial block, over tiles of 16 classes and a partial tile; 37 x 10: its ten-class
# blocks, which (float32, AVX-512, no mask) go by the permute network of kd_small_cpu.cpp.
SHAPES = [(1, 1), (7, 3), (37, 10), (37, 100), (41, 1271), (3, 17, 1000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(device, backend, shape, dtype, name):
    s, t, labels = make(shape, dtype, device, seed=len(name) + shape[-1])
    rows_shape = shape[:-1]
    for i, cfg in enumerate(CONFIGS):
        temperature = cfg["temperature"]
        teacher = t.clone()
        if cfg["minus_inf"] and shape[-1] > 1 and name != "reverse_kl":
            teacher[..., 1::3] = float("-inf")  # a masked vocabulary: probability 0
        mask = None
        if cfg["mask"]:
            mask = (torch.arange(math.prod(rows_shape)) % 4 != 1).reshape(rows_shape).to(device)
        y = labels.clone()
        y.view(-1)[::5] = -100  # ignore_index rows: they count for the divergence, not for CE
        kw = dict(beta=0.3 if name.startswith("skew") else 0.6, labels=y, alpha=cfg["alpha"],
                  reduction=cfg["reduction"], mask=mask)
        loss, gs, gt, grad_out = run(s, teacher, temperature, name, backend, cfg["teacher_grad"],
                                     grad_seed=i, **kw)
        ref_loss, ref_gs, ref_gt = reference_grads(s, teacher, temperature, name, grad_out, **kw)
        assert loss.dtype == torch.float32 and gs.dtype == dtype
        assert loss.shape == ref_loss.shape
        low = dtype in LOW_PRECISION
        floor = float32_floor(temperature, shape[-1], s.float())
        assert_close_scaled(loss, ref_loss, 1e-4 if low else 2e-5, floor)
        # T = 100 leaves gradients of size 1e-2·T that float32 log-ratios of size 1e-2 carry
        grad_tol = LOW_PRECISION.get(dtype, 2e-4 if temperature >= 100 else 2e-5)
        assert_close_scaled(gs, ref_gs, grad_tol, floor / temperature)
        if cfg["teacher_grad"]:
            assert gt.dtype == dtype
            assert_close_scaled(gt, ref_gt, grad_tol, floor / temperature)
            if cfg["minus_inf"] and shape[-1] > 1 and name != "reverse_kl":
                assert (gt[teacher == float("-inf")] == 0).all()
        if mask is not None:
            assert (gs[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_is_infinite_where_the_teacher_has_no_mass(device, backend):
    s, t, _ = make((4, 50), torch.float32, device)
    t[1, 7] = float("-inf")
    loss = kd_loss(s, t, 2.0, divergence="reverse_kl", reduction="none", backend=backend)
    assert loss[1] == float("inf") and torch.isfinite(loss[[0, 2, 3]]).all()
    ref = reference(s.cpu(), t.cpu(), 2.0, "reverse_kl", reduction="none")
    assert ref[1] == float("inf")
    assert_close_scaled(loss[[0, 2, 3]], ref[[0, 2, 3]], 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_fused_cross_entropy_equals_the_sum_of_its_terms(backend, name):
    """α·kd_loss + (1 − α)·F.cross_entropy, value and gradient, in float32."""
    s, t, labels = make((6, 9, 300), torch.float32, "cpu", seed=11)
    labels[0, :3] = -100
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(2)) > 0.2
    for alpha in (0.0, 0.3, 1.0):
        for temperature in (1.0, 3.0):
            a = s.clone().requires_grad_()
            fused = kd_loss(a, t, temperature, divergence=name, labels=labels, alpha=alpha,
                            mask=mask, backend=backend)
            fused.backward()
            b = s.clone().requires_grad_()
            soft = kd_loss(b, t, temperature, divergence=name, mask=mask, backend=backend)
            hard = F.cross_entropy(b[mask], labels[mask])
            separate = alpha * soft + (1 - alpha) * hard
            separate.backward()
            torch.testing.assert_close(fused, separate, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_hard_label_anywhere_in_a_long_row(backend, name, dtype):
    """The CPU's long-row kernel takes each row's hard-label -1 after its gradient sweep, in the
    label's vector once more: a label at the row's ends, at a vector's first and last lane, on
    both sides of the 4096-class stretch boundary and in the row's partial last vector."""
    classes = 4096 + 300  # two stretches, the second ending in a vector of 12
    positions = [0, 15, 16, 4095, 4096, 4096 + 290, classes - 1]
    s, t, _ = make((len(positions), classes), dtype, "cpu", seed=5)
    labels = torch.tensor(positions)
    for temperature in (1.0, 3.0):  # the hard-label softmax is q, or one of its own
        a = s.clone().requires_grad_()
        kd_loss(a, t, temperature, divergence=name, labels=labels, alpha=0.3,
                backend=backend).backward()
        b = s.float().clone().requires_grad_()
        soft = kd_loss(b, t.float(), temperature, divergence=name, backend="torch")
        (0.3 * soft + 0.7 * F.cross_entropy(b, labels)).backward()
        tol = LOW_PRECISION.get(dtype, 1e-5)
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_is_trl_and_liger_beta_at_t_1(backend, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (current form: the mixture in probability space,
    β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m) through F.kl_div) and Liger-Kernel's LigerJSD
    kernel (Σ β·P·log P + (1 − β)·Q·log Q − M·log M, M = β·P + (1 − β)·Q, P the teacher), each
    written from its published definition."""
    s, t, _ = make((5, 7, 50), torch.float32, "cpu", seed=4)
    student_log_probs = F.log_softmax(s.double(), -1)
    teacher_log_probs = F.log_softmax(t.double(), -1)
    b = torch.tensor(beta, dtype=torch.float64)
    mixture_log_probs = torch.logsumexp(torch.stack(
        [student_log_probs + torch.log(1 - b), teacher_log_probs + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    trl = (beta * kl_teacher + (1 - beta) * kl_student).sum(-1)
    P, Q = teacher_log_probs.exp(), student_log_probs.exp()
    M = beta * P + (1 - beta) * Q
    liger = (beta * P * teacher_log_probs + (1 - beta) * Q * student_log_probs
             - M * M.log()).sum(-1)
    ours = kd_loss(s, t, 1.0, divergence="jsd", beta=beta, reduction="none", backend=backend)
    torch.testing.assert_close(ours.double(), trl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.double(), liger, rtol=1e-5, atol=1e-7)
    # batchmean over tokens is TRL's batchmean with labels (sum / counted tokens)
    torch.testing.assert_close(kd_loss(s, t, 1.0, divergence="jsd", beta=beta, backend=backend)
                               .double(), trl.mean(), rtol=1e-5, atol=1e-7)


@needs_native
@pytest.mark.parametrize("name", ["jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("classes", [2, 300])  # the small-class kernel and the dense one
def test_mixture_log_holds_in_every_interval_of_its_table(name, classes):
    """The CPU kernels take log m from a 16-entry table picked by m's top mantissa bits
    (mixture_log, csrc/cpu/cpu_common.h). Rows whose first class has mixtures swept finely over
    (0, 1), with p and q far apart (a divergence of size ~0.1 to 1, where a wrong entry or
    a coarse polynomial would show), match float64 per row to 1e-5 (4e-6 absolute: the
    float32 log-probabilities' own rounding)."""
    rows = 4096
    p0 = torch.linspace(1e-3, 1 - 1e-3, rows, dtype=torch.float64)
    q0 = (p0 * 2.3).remainder(1.0).clamp(1e-3, 1 - 1e-3)  # far from p0 in most rows
    t = torch.full((rows, classes), -12.0, dtype=torch.float64)
    s = t.clone()
    t[:, 0], t[:, 1] = p0.log(), (1 - p0).log()
    s[:, 0], s[:, 1] = q0.log(), (1 - q0).log()
    s, t = s.float(), t.float()
    for beta in (0.3, 0.5):
        ours = kd_loss(s, t, 1.0, divergence=name, beta=beta, reduction="none", backend="native")
        ref = reference(s, t, 1.0, name, beta=beta, reduction="none")
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=4e-6)


def test_kl_is_kd_kl_div_and_skews_reduce_to_kl():
    s, t, _ = make((8, 40), torch.float32, "cpu")
    torch.testing.assert_close(kd_loss(s, t, 2.0), kd_kl_div(s, t, 2.0))
    # the skews with a tiny β are nearly KL and reverse KL (β = 0 itself is outside their range)
    for skew, plain in (("skew_kl", "kl"), ("skew_reverse_kl", "reverse_kl")):
        torch.testing.assert_close(kd_loss(s, t, 2.0, divergence=skew, beta=1e-6),
                                   kd_loss(s, t, 2.0, divergence=plain), rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([1, -100, 8, 0, 3])
    mask = torch.tensor([True, False, True, True, True])
    for reduction, m, y, alpha in (("none", None, None, 1.0), ("batchmean", mask, labels, 0.3),
                                   ("sum", mask, labels, 0.0)):
        fn = lambda a, b: kd_loss(a, b, 0.7, divergence=name, beta=0.4, labels=y, alpha=alpha,  # noqa: E731
                                  reduction=reduction, mask=m, backend="native")
        assert torch.autograd.gradcheck(fn, (s, t))


@needs_native
def test_opcheck():
    s, t, labels = make((4, 33), torch.float32, "cpu")
    mask = torch.tensor([True, False, True, True])
    op = torch.ops.kdplug.kd_loss_fwd.default
    for code in DIVERGENCES.values():
        torch.library.opcheck(op, (s.clone().requires_grad_(), t.clone().requires_grad_(), 0.5,
                                   code, 0.3, labels, 0.4, -100, mask, 0, None, True, True))
    torch.library.opcheck(op, (s.clone().requires_grad_(), t, 2.0, 2, 0.5, None, 1.0, -100, None,
                               2, None, True, False))
    torch.library.opcheck(op, (s.bfloat16().requires_grad_(), t.bfloat16(), 2.0, 3, 0.5, labels,
                               0.5, 0, mask, 1, torch.tensor([0.5, 0.25]), True, False))


@needs_native
def test_torch_compile_fullgraph():
    s, t, labels = make((2, 8, 100), torch.float32, "cpu")
    labels[0, 0] = -100
    fn = torch.compile(lambda a, b, y: kd_loss(a, b, 2.0, divergence="jsd", beta=0.3, labels=y,
                                               alpha=0.6) * 0.5, fullgraph=True)
    student = s.clone().requires_grad_()
    loss = fn(student, t, labels)
    loss.backward()
    kw = dict(beta=0.3, labels=labels, alpha=0.6)
    ref_loss, ref_gs, _ = reference_grads(s, t, 2.0, "jsd", torch.tensor(0.5), **kw)
    assert_close_scaled(loss, ref_loss * 0.5, 2e-5)
    assert_close_scaled(student.grad, ref_gs, 2e-5)


@needs_native
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(33, 10), (5, 128), (7, 129), (9, 1271), (1, 20000)],
                         ids=shape_id)
def test_portable_kernel_runs_the_gpu_arithmetic_correctly(name, shape):
    """kd_loss_fwd_portable is the scalar kd_math.h path the CUDA kernel runs; the CPU's vector
    kernels (lanes as rows for C <= 128, vectors over classes above, rows split across threads
    for one long row) must agree with it."""
    s, t, labels = make(shape, torch.float32, "cpu", seed=shape[-1])
    if name != "reverse_kl":  # infinite there
        t[:, 1::5] = float("-inf")
        t[:, 4096:12288] = float("-inf")  # whole stretches of a long row
    mask = torch.ones(shape[0], dtype=torch.bool)
    mask[-1] = shape[0] == 1
    labels[::3] = -100
    for temperature, reduction, alpha in ((1.7, 0, 0.4), (1.0, 2, 0.7), (0.5, 1, 1.0)):
        args = (s, t, temperature, DIVERGENCES[name], 0.35, labels, alpha, -100, mask, reduction,
                None, True, True)
        fast = torch.ops.kdplug.kd_loss_fwd(*args)
        portable = torch.ops.kdplug.kd_loss_fwd_portable(*args)
        # the baseline build's exp/log differ from the portable path's libm by a few ulps, which
        # log-ratios of size ~10 (reverse_kl) lift to a few 1e-6 of the largest gradient
        for a, b in zip(fast, portable):
            assert_close_scaled(a, b.double(), 5e-5, floor=2e-6)


@needs_native
def test_gradients_not_wanted_are_not_written():
    s, t, _ = make((6, 300), torch.float32, "cpu")
    loss, gs, gt = torch.ops.kdplug.kd_loss_fwd(s, t, 2.0, 2, 0.5, None, 1.0, -100, None, 2, None,
                                                False, False)
    assert gs.numel() == 0 and gt.numel() == 0
    torch.testing.assert_close(loss, kd_loss(s, t, 2.0, divergence="jsd"))
    with torch.no_grad():  # the Python API asks for none in evaluation
        torch.testing.assert_close(kd_loss(s.requires_grad_(), t, 2.0, divergence="tvd"),
                                   kd_loss_reference(s, t, 2.0, divergence="tvd"))


@needs_native
def test_explicit_scales_let_a_caller_sum_chunks_of_a_batch():
    """What a chunked caller (a fused linear head) does: each chunk with the whole batch's factors,
    so the chunks' losses and gradients add up to the batch's."""
    s, t, labels = make((10, 77), torch.float32, "cpu")
    labels[3] = -100
    whole, gs, gt = torch.ops.kdplug.kd_loss_fwd(s, t, 2.0, 4, 0.2, labels, 0.3, -100, None, 2,
                                                 None, True, True)
    scales = torch.tensor([1 / 10, 1 / 9])
    parts = [torch.ops.kdplug.kd_loss_fwd(s[a:b], t[a:b], 2.0, 4, 0.2, labels[a:b], 0.3, -100,
                                          None, 1, scales, True, True) for a, b in ((0, 4), (4, 10))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), gs)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]]), gt)


# ----------------------------------------------------------------------------- bad input

def _ok():
    s, t, labels = make((3, 5), torch.float32, "cpu")
    return s, t, labels


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(divergence="js"), ValueError, r"divergence must be one of \['jsd', 'kl', 'reverse_kl', "
                                        r"'skew_kl', 'skew_reverse_kl', 'tvd'\], got 'js'"),
    (dict(divergence="jsd", beta=1.0), ValueError, r"beta must be in \(0, 1\) for divergence='jsd'.*got 1.0"),
    (dict(divergence="skew_kl", beta=0), ValueError, r"beta must be in \(0, 1\) for divergence='skew_kl'"),
    (dict(divergence="jsd", beta="x"), TypeError, r"beta must be a number, got str"),
    (dict(alpha=0.5), ValueError, r"alpha=0.5 < 1 weighs a hard-label cross-entropy term: pass labels"),
    (dict(alpha=1.5, labels="ok"), ValueError, r"kd_loss: alpha must be in \[0, 1\], got 1.5"),
    (dict(alpha=0.5, labels="float"), TypeError, r"labels must hold class indices"),
    (dict(alpha=0.5, labels="short"), ValueError, r"labels must have the logits' leading shape \(3,\), got \(2,\)"),
    (dict(alpha=0.5, labels="out"), ValueError, r"labels must be classes in \[0, 5\) or ignore_index \(-100\), found 5"),
    (dict(alpha=0.5, labels="ok", ignore_index=1.5), TypeError, r"ignore_index must be an int"),
], ids=["divergence", "beta-jsd", "beta-skew", "beta-type", "alpha-no-labels", "alpha-range",
        "labels-dtype", "labels-shape", "labels-range", "ignore-index"])
def test_bad_input_is_a_clear_error(backend, kwargs, error, message):
    s, t, labels = _ok()
    kwargs = dict(kwargs)
    choice = kwargs.get("labels")
    if choice is not None:
        kwargs["labels"] = {"ok": labels, "float": labels.float(), "short": labels[:2],
                            "out": torch.tensor([0, 5, 1])}[choice]
    with pytest.raises(error, match=message):
        kd_loss(s, t, 2.0, backend=backend, **kwargs)


def test_masked_rows_labels_are_not_checked():
    s, t, _ = _ok()
    labels = torch.tensor([1, 99, 2])  # the row holding 99 is padding
    mask = torch.tensor([True, False, True])
    got = kd_loss(s, t, 2.0, labels=labels, alpha=0.5, mask=mask)
    want = reference(s, t, 2.0, "kl", labels=labels.clamp_max(4), alpha=0.5, mask=mask)
    assert_close_scaled(got, want, 2e-5)


@needs_native
def test_kernel_rejects_labels_out_of_range():
    s, t, _ = _ok()
    with pytest.raises(RuntimeError, match=r"label 7 of row 1 is out of range \[0, 5\)"):
        torch.ops.kdplug.kd_loss_fwd(s, t, 2.0, 0, 0.5, torch.tensor([0, 7, 1]), 0.5, -100, None,
                                     2, None, True, False)


@needs_native
@pytest.mark.parametrize("classes", [10, 129, 1271])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_misaligned_rows_give_what_aligned_copies_give(classes, dtype):
    """Inputs whose rows start off the vector width (a storage offset of one element, as in
    logits[1:] or a slice of a larger buffer) are read correctly, gradients included."""
    rows = 9
    big_s, big_t, labels = make((rows + 1, classes), dtype, "cpu", seed=classes)
    s = big_s.view(-1)[1:1 + rows * classes].view(rows, classes)
    t = big_t.view(-1)[3:3 + rows * classes].view(rows, classes)
    assert s.data_ptr() % 16 and t.data_ptr() % 16
    labels = labels[:rows]
    kw = dict(divergence="jsd", beta=0.4, labels=labels, alpha=0.7, backend="native",
              mask=torch.arange(rows) % 3 != 1)
    results = []
    for a, b in ((s, t), (s.clone(), t.clone())):
        student, teacher = a.detach().requires_grad_(), b.detach().requires_grad_()
        loss = kd_loss(student, teacher, 1.5, **kw)
        results.append((loss, *torch.autograd.grad(loss, (student, teacher))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,classes", [(20, 10), (17, 100), (3, 1000), (3, 9000), (1, 9000)],
                         ids=["small-rows", "small-tiles", "one-stretch", "stretches",
                              "split-row"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_a_nan_anywhere_in_a_row_makes_that_row_nan(device, backend, rows, classes, side):
    # The CPU kernels' maxima may pass over a NaN (the row kernel's and the small kernel's, rows
    # of at most 128 classes, alike); the sums after them must still catch it, at the first
    # class, the middle, the last vector's tail or the last class.
    for div in NAMES:
        for at in (0, classes // 2, classes - 5, classes - 1):
            g = torch.Generator().manual_seed(at)
            s = torch.randn(rows, classes, generator=g).to(device).requires_grad_()
            t = torch.randn(rows, classes, generator=g).to(device)
            (s if side == "student" else t).data[0, at] = float("nan")
            loss = kd_loss(s, t, 2.0, divergence=div, reduction="none", backend=backend)
            loss.sum().backward()
            assert torch.isnan(loss[0]), (div, at)
            # (the PyTorch path's autograd drops a NaN teacher class at its torch.where guards)
            if side == "student" or backend == "native":
                assert torch.isnan(s.grad[0]).any(), (div, at)
            assert torch.isfinite(loss[1:]).all() and torch.isfinite(s.grad[1:]).all(), (div, at)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_denormals_flushed_inside_the_kernels_only(threads):
    """The CPU kernels flush denormals to zero while they run (an assist of ~100 cycles each
    otherwise, many at low temperatures): the caller's threads must get their own setting back,
    and a row full of them must still match the reference."""
    from kdplug.ops import kd_loss_topk

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        # T = 0.05 spreads these logits over ~1e3 nats: most probabilities underflow
        for shape in [(40, 10), (40, 100), (6, 3000)]:
            s = (torch.randn(shape, generator=g) * 4).requires_grad_()
            t = torch.randn(shape, generator=g) * 4
            loss = kd_loss(s, t, 0.05, divergence="jsd", beta=0.4, backend="native")
            loss.backward()
            ref_s = s.detach().clone().requires_grad_()
            ref = reference(ref_s, t, 0.05, "jsd", 0.4)
            ref.backward()
            assert_close_scaled(loss, ref.detach(), 2e-5)
            assert_close_scaled(s.grad, ref_s.grad.double(), 2e-4, 1e-6)
        logprobs, indices = F.log_softmax(torch.randn(6, 3000, generator=g), -1).topk(8, -1)
        kd_loss_topk(torch.randn(6, 3000, generator=g).requires_grad_(), indices, logprobs, 0.05,
                     backend="native").backward()
        tiny = torch.full((1 << 20,), 1e-38)  # large enough to run on every intra-op thread
        assert ((tiny * 1e-3) > 0).all(), "a kernel left flush-to-zero on for its caller"
    finally:
        torch.set_num_threads(before)
