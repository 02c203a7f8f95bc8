"""kd_loss and kd_kl_div: a dense teacher, through kdplug::kd_loss_fwd or pure PyTorch."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _ext
from . import _op_support as support
from ._divergences import combine_rows, divergence_rows, hard_label_rows
from ._op_support import DIVERGENCES, REDUCTIONS

API = "kd_loss"
OP = "kd_loss_fwd"


def check_inputs(api, student, teacher, temperature, divergence, beta, labels, alpha,
                 ignore_index, reduction, mask, backend):
    support.check_tensor(api, "student_logits", student)
    support.check_tensor(api, "teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"{api}: student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape [..., classes]")
    if student.dtype != teacher.dtype:
        raise TypeError(f"{api}: student_logits ({student.dtype}) and teacher_logits "
                        f"({teacher.dtype}) must have the same dtype")
    support.check_same_device(api, "student_logits", student, "teacher_logits", teacher)
    support.check_rows(api, "logits", student)
    temperature = support.check_temperature(api, temperature)
    beta = support.check_divergence(api, divergence, beta)
    support.check_choice(api, "reduction", reduction, REDUCTIONS)
    support.check_choice(api, "backend", backend, support.BACKENDS)
    support.check_mask(api, mask, student.shape[:-1], student.device)
    alpha = support.check_labels(api, labels, alpha, student.shape[:-1], student.device,
                                 student.shape[-1], ignore_index, mask, values=False)
    return temperature, beta, alpha


def torch_path(student, teacher, temperature, divergence, beta, labels, alpha, ignore_index,
               reduction, mask):
    """Same numerics as the kernel: float32 accumulation (float64 for float64), 0·log 0 = 0."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    with_ce = labels is not None and alpha < 1
    if mask is not None:  # only counted rows are computed: padding may hold anything, even NaN
        student, teacher = student[mask], teacher[mask]
        labels = labels[mask] if with_ce else labels
    # 1/T in double, then one multiply: 1/0.05 is exactly 20, 0.05 in float32 is not.
    inv_t = 1.0 / temperature
    log_q = F.log_softmax(student.to(acc) * inv_t, dim=-1)
    log_p = F.log_softmax(teacher.to(acc) * inv_t, dim=-1)
    kd_rows = divergence_rows(log_p.exp(), log_q.exp(), log_p, log_q, divergence, beta)
    kd_rows = kd_rows * (temperature * temperature)
    ce_rows = hard_label_rows(student, labels, ignore_index, acc) if with_ce else None
    return combine_rows(kd_rows, ce_rows, labels, alpha, ignore_index, reduction, mask)


@support.python_parts(OP)
def _register() -> None:
    @torch.library.register_fake(f"kdplug::{OP}")
    def _(student, teacher, temperature, divergence, beta, labels, alpha, ignore_index, mask,
          reduction, scales, student_grad, teacher_grad):
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss_shape = (student.shape[0],) if reduction == REDUCTIONS["none"] else ()
        grad = lambda like, wanted: (torch.empty_like(like, memory_format=torch.contiguous_format)
                                     if wanted else like.new_empty((0,)))
        return (student.new_empty(loss_shape, dtype=acc), grad(student, student_grad),
                grad(teacher, teacher_grad))

    def setup_context(ctx, inputs, output):
        reduction, student_grad, teacher_grad = inputs[9], inputs[11], inputs[12]
        _, grad_student, grad_teacher = output
        ctx.mark_non_differentiable(grad_student, grad_teacher)
        # Otherwise autograd fills N×C zeros as the "incoming gradients" of those two outputs.
        ctx.set_materialize_grads(False)
        ctx.per_row = reduction == REDUCTIONS["none"]
        ctx.wanted = (student_grad, teacher_grad)
        ctx.save_for_backward(grad_student if student_grad else None,
                              grad_teacher if teacher_grad else None)

    def backward(ctx, grad_loss, _grad_student, _grad_teacher):
        if grad_loss is None:
            return (None,) * 13
        saved = ctx.saved_tensors
        grads = tuple(support.scaled_grad(g, grad_loss, ctx.per_row) if wanted else None
                      for g, wanted in zip(saved, ctx.wanted))
        return grads + (None,) * 11

    torch.library.register_autograd(f"kdplug::{OP}", backward, setup_context=setup_context)


def _wants_grad(t: torch.Tensor) -> bool:
    return t.requires_grad and torch.is_grad_enabled()


def _rows(x: torch.Tensor, classes: int) -> torch.Tensor:
    """x as contiguous [rows, classes]; a 2-D contiguous x as is (a reshape would add a view to
    the autograd graph: a node in every backward, a sizeable share of a small batch's step)."""
    if x.dim() == 2 and x.is_contiguous():
        return x
    return x.reshape(-1, classes).contiguous()


def native_path(student, teacher, temperature, divergence, beta, labels, alpha, ignore_index,
                reduction, mask):
    classes = student.shape[-1]
    with_ce = labels is not None and alpha < 1
    student_grad, teacher_grad = _wants_grad(student), _wants_grad(teacher)
    loss = support.call_fused(
        torch.ops.kdplug.kd_loss_fwd.default, reduction == "none", student_grad or teacher_grad,
        _rows(student, classes), _rows(teacher, classes),
        temperature, DIVERGENCES[divergence], beta,
        labels.reshape(-1).long().contiguous() if with_ce else None, alpha if with_ce else 1.0,
        ignore_index, None if mask is None else mask.reshape(-1).contiguous(),
        REDUCTIONS[reduction], None, student_grad, teacher_grad)
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss


_FAST_REDUCTIONS = {"batchmean": REDUCTIONS["batchmean"], "sum": REDUCTIONS["sum"]}
_FAST_BACKENDS = ("auto", "native")
_NUMBERS = (float, int)
_Tensor = torch.Tensor
_int64 = torch.int64
_is_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_environ = os.environ

# (the extension status it was looked up under, kd_loss_fwd_eager's C++ callable or None)
_fast_op = (None, None)


def _native_cpu_op():
    """kd_loss_fwd_eager's C++ callable (the OpOverload's own, without its Python __call__)
    when the native op runs on the CPU in this process, else None. Looked up once per extension
    status: tests reset the status to load the op another way."""
    global _fast_op
    op = None
    if support.native_available(OP, "cpu"):  # loads the extension if nothing did yet
        eager = support.eager_op(OP)
        op = None if eager is None else eager._op
    _fast_op = (_ext._status, op)
    return op


def _fast_path(student, teacher, temperature, divergence, beta, labels, alpha, ignore_index,
               reduction, mask, backend):
    """The common eager CPU call (2-D contiguous logits, plain numbers, every tensor on the CPU
    (one elsewhere would pick another kernel), int64 labels if any, a reduced loss) straight to
    the op's C++ autograd (csrc/kd_loss_eager.cpp), whose checks stand in for check_inputs (the
    labels' values included: the CPU kernel checks them before it computes); None when the call
    is anything else. On a small batch the Python checks and dispatch above cost as much as the
    kernel, most of it in cold caches (as in a training step, where the model's work evicts
    them between calls), where every Python call, attribute and object touched costs a cache
    miss: so this path is one frame of plain checks, its answers looked up once."""
    if _is_compiling():  # first: the tracer sees nothing else here
        return None
    status, op = _fast_op
    if status is None or status is not _ext._status:
        op = _native_cpu_op()
    code = DIVERGENCES.get(divergence) if type(divergence) is str else None
    if (op is None or code is None or backend not in _FAST_BACKENDS
            or reduction not in _FAST_REDUCTIONS
            or type(student) is not _Tensor or type(teacher) is not _Tensor
            or not student.is_cpu or not teacher.is_cpu or student.dim() != 2
            or not student.is_contiguous() or not teacher.is_contiguous()
            or type(temperature) not in _NUMBERS or type(beta) not in _NUMBERS
            or type(alpha) not in _NUMBERS or type(ignore_index) is not int
            or not (labels is None or (type(labels) is _Tensor and labels.dtype == _int64
                                       and labels.is_cpu))
            or not (mask is None or (type(mask) is _Tensor and mask.is_cpu))
            or (_environ.get(_ext.FORCE_TORCH_ENV) and _ext._env_flag(_ext.FORCE_TORCH_ENV))):
        return None
    grad = _is_grad_enabled()
    return op(student, teacher, temperature, code, beta, labels, alpha, ignore_index, mask,
              _FAST_REDUCTIONS[reduction], None, grad and student.requires_grad,
              grad and teacher.requires_grad)


def _run(api, student, teacher, temperature, divergence, beta, labels, alpha, ignore_index,
         reduction, mask, backend):
    try:
        loss = _fast_path(student, teacher, temperature, divergence, beta, labels, alpha,
                          ignore_index, reduction, mask, backend)
    except (RuntimeError, ValueError, TypeError):
        loss = None  # the full path below raises its own error (or finds the call fine)
    if loss is not None:
        return loss
    temperature, beta, alpha = check_inputs(api, student, teacher, temperature, divergence, beta,
                                            labels, alpha, ignore_index, reduction, mask, backend)
    device_type = student.device.type
    supported = not (student.dtype == torch.float64 and device_type != "cpu")
    native = support.choose_backend(api, OP, backend, device_type, supported) == "native"
    if support.is_plain_eager(student) and support.checks_values(native, student.device):
        support.check_label_values(api, labels, alpha, student.shape[-1], ignore_index, mask)
    path = native_path if native else torch_path
    return path(student, teacher, temperature, divergence, beta, labels, alpha, ignore_index,
                reduction, mask)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0, *, divergence: str = "kl", beta: float = 0.5,
            labels: Optional[torch.Tensor] = None, alpha: float = 1.0, ignore_index: int = -100,
            reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
            backend: str = "auto") -> torch.Tensor:
    """Temperature-scaled divergence of the student from the teacher, T²·D(p, q) per row,
    optionally fused with the hard-label cross-entropy: α·T²·D + (1 − α)·CE(student, labels).

    With p = softmax(teacher/T) and q = softmax(student/T), ``divergence`` is
        "kl"               KL(p ‖ q), Hinton et al.'s distillation loss (= kd_kl_div);
        "reverse_kl"       KL(q ‖ p), mode-seeking (MiniLLM). A teacher probability of 0 (a logit
                           of −inf) where the student has mass makes it infinite, as it is;
        "jsd"              β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = β·p + (1 − β)·q, 0 < β < 1
                           (β = 0.5: the symmetric Jensen–Shannon divergence). β weighs the
                           teacher exactly as TRL's ``GKDTrainer.generalized_jsd_loss(beta=β)``
                           (its mixture in probability space) and Liger-Kernel's
                           ``LigerJSD(beta=β)`` do: at T = 1 the values are equal. (Both define
                           β = 0 and 1 as forward and reverse KL; here use "kl" and
                           "reverse_kl".)
        "tvd"              ½·Σ|p − q|, total variation (DistillKit, Liger's LigerTVDLoss);
        "skew_kl"          KL(p ‖ β·p + (1 − β)·q), DistiLLM's skew KL with skew α = β (0.1 in
                           their paper);
        "skew_reverse_kl"  KL(q ‖ β·q + (1 − β)·p), DistiLLM's skew reverse KL;
    each multiplied by T² (Hinton's scale argument; at T = 1 each is the peers' definition).

    Args:
        student_logits, teacher_logits: [..., C] raw logits (float32, float16, bfloat16; float64
            runs in float64 on the CPU). Leading dimensions are rows (e.g. batch × tokens).
        temperature: T > 0; both sides are softened by it and the divergence is scaled by T².
        divergence, beta: as above; beta is used by jsd and the skews only.
        labels, alpha, ignore_index: with labels (class indices shaped like the leading
            dimensions) and α < 1 the loss is α·T²·D + (1 − α)·CE, CE the student's
            cross-entropy at T = 1 averaged over the rows whose label is not ignore_index, and
            one gradient is written for both terms in the same pass. Without labels α must be 1.
        reduction: "none" (per row, shape [...]: α·T²·D_row + (1 − α)·CE_row), "sum", or
            "batchmean" (each term divided by its own count of rows: torch's batchmean for 2-D
            input, the per-token mean for sequences, and F.cross_entropy's mean for the CE term).
        mask: optional bool tensor shaped like the leading dimensions; False rows (padding) add
            nothing to either term or its count, get zero gradient, and are never read.
        backend: "auto" (native kernel when available, else PyTorch), "native" (raise if the
            kernel is missing) or "torch". KDPLUG_FORCE_TORCH=1 forces "torch".

    Returns the loss in float32 (float64 for float64 inputs). The gradient reaches the teacher's
    logits too when they require grad (on-policy and mutual distillation); otherwise no work is
    spent on it.
    """
    return _run(API, student_logits, teacher_logits, temperature, divergence, beta, labels,
                alpha, ignore_index, reduction, mask, backend)


def kd_loss_reference(student_logits, teacher_logits, temperature=1.0, *, divergence="kl",
                      beta=0.5, labels=None, alpha=1.0, ignore_index=-100, reduction="batchmean",
                      mask=None):
    """The pure-PyTorch kd_loss (always available; autograd through ordinary ops)."""
    return _run(API, student_logits, teacher_logits, temperature, divergence, beta, labels,
                alpha, ignore_index, reduction, mask, "torch")


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0, *, reduction: str = "batchmean",
              mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Temperature-scaled KL divergence of the student from the teacher, T²·KL(p ‖ q) per row:
    ``kd_loss(..., divergence="kl")``; see kd_loss for the arguments."""
    return _run("kd_kl_div", student_logits, teacher_logits, temperature, "kl", 0.5, None, 1.0,
                -100, reduction, mask, backend)


def kd_kl_div_reference(student_logits, teacher_logits, temperature=1.0, *,
                        reduction="batchmean", mask=None):
    """The pure-PyTorch kd_kl_div."""
    return _run("kd_kl_div", student_logits, teacher_logits, temperature, "kl", 0.5, None, 1.0,
                -100, reduction, mask, "torch")
