"""kd_loss_topk and kd_kl_div_topk: a teacher known on its top-k classes, through
kdplug::kd_loss_topk_fwd or pure PyTorch. The semantics are spelled out in csrc/kd_math.h and in
kd_loss_topk's docstring."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _op_support as support
from ._divergences import combine_rows, divergence_rows, hard_label_rows
from ._op_support import DIVERGENCES, REDUCTIONS

API = "kd_loss_topk"
OP = "kd_loss_topk_fwd"
REST_MODES = ("renormalize", "bucket")
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
MIN_REST = 1e-30  # a student rest mass below this is taken as this (as the kernels do)


def check_inputs(api, student, indices, logprobs, temperature, divergence, beta, labels, alpha,
                 ignore_index, reduction, mask, rest, backend):
    support.check_tensor(api, "student_logits", student)
    support.check_tensor(api, "teacher_indices", indices, INDEX_DTYPES, "class indices")
    support.check_tensor(api, "teacher_logprobs", logprobs, support.FLOAT_DTYPES[:3],
                         "log-probabilities")
    support.check_rows(api, "student_logits", student)
    if indices.shape != logprobs.shape:
        raise ValueError(f"{api}: teacher_indices {tuple(indices.shape)} and teacher_logprobs "
                         f"{tuple(logprobs.shape)} must have the same shape [..., k]")
    if indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"{api}: the teacher's rows {tuple(indices.shape[:-1])} differ from the "
                         f"student's {tuple(student.shape[:-1])}")
    k, classes = indices.shape[-1], student.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"{api}: k = {k} teacher classes per row, expected 1 <= k <= {classes}")
    support.check_same_device(api, "student_logits", student, "teacher_indices", indices)
    support.check_same_device(api, "student_logits", student, "teacher_logprobs", logprobs)
    temperature = support.check_temperature(api, temperature)
    beta = support.check_divergence(api, divergence, beta)
    support.check_choice(api, "reduction", reduction, REDUCTIONS)
    support.check_choice(api, "rest", rest, REST_MODES)
    support.check_choice(api, "backend", backend, support.BACKENDS)
    support.check_mask(api, mask, student.shape[:-1], student.device)
    alpha = support.check_labels(api, labels, alpha, student.shape[:-1], student.device, classes,
                                 ignore_index, mask, values=False)
    if divergence == "reverse_kl" and rest == "renormalize":
        raise ValueError(f"{api}: divergence='reverse_kl' against a renormalized top-k teacher "
                         f"is infinite (the student always has mass outside the teacher's k "
                         f"classes, where the teacher has none); use rest='bucket'")
    if logprobs.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{api}: the top-k path gives no gradient to the teacher; pass "
                         f"teacher_logprobs.detach() (or use kd_loss with dense logits)")
    return temperature, beta, alpha


def check_data(api, native, student, labels, alpha, classes, ignore_index, mask, topk, rest):
    """The checks that read the labels' and the top-k pair's values (device syncs on a GPU), once
    the backend is known: skipped where support.checks_values defers them to the CUDA kernel.
    ``topk``: (indices, logprobs), or None for a teacher given otherwise."""
    if not (support.is_plain_eager(student) and support.checks_values(native, student.device)):
        return
    support.check_label_values(api, labels, alpha, classes, ignore_index, mask)
    if topk is not None and support.is_plain_eager(topk[0]):
        _check_values(api, *topk, classes, mask, rest)


def _check_values(api, indices, logprobs, classes, mask, rest):
    """Data checks (eager only: each reads the tensors, a device sync on a GPU)."""
    if mask is not None:
        indices, logprobs = indices[mask], logprobs[mask]
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= classes:
        raise ValueError(f"{api}: teacher_indices must lie in [0, {classes}), found "
                         f"{low if low < 0 else high}")
    flat = indices.reshape(-1, indices.shape[-1]).sort(-1).values
    repeats = (flat[:, 1:] == flat[:, :-1]).any(-1)
    if bool(repeats.any()):
        row = int(repeats.nonzero()[0, 0])
        raise ValueError(f"{api}: teacher_indices must be distinct within a row; counted row "
                         f"{row} repeats a class: {flat[row].tolist()[:16]}")
    if rest == "bucket":
        mass = logprobs.float().exp().sum(-1)
        worst = float(mass.max())
        if worst > 1.0 + 1e-3:
            raise ValueError(f"{api}: rest='bucket' needs teacher_logprobs to be log-probabilities "
                             f"at T = 1, but their exp sums to {worst:.4g} > 1 in some row")


def torch_path(student, indices, logprobs, temperature, divergence, beta, labels, alpha,
               ignore_index, reduction, mask, rest):
    """The divergence over k + 1 bins (the teacher's classes and the rest), as kd_math.h."""
    with_ce = labels is not None and alpha < 1
    if mask is not None:
        student, indices, logprobs = student[mask], indices[mask], logprobs[mask]
        labels = labels[mask] if with_ce else labels
    inv_t = 1.0 / temperature
    indices = indices.long()
    log_q = F.log_softmax(student.float() * inv_t, dim=-1)
    values = logprobs.float()
    log_p_k = F.log_softmax(values * inv_t, dim=-1)
    teacher_rest = torch.zeros(values.shape[:-1], dtype=torch.float32, device=student.device)
    if rest == "bucket":
        # in float64: 1 − Σ exp cancels (as in the kernels)
        teacher_rest = (1 - logprobs.double().exp().sum(-1)).clamp_min(0).float()
        log_p_k = log_p_k + torch.log1p(-teacher_rest).unsqueeze(-1)
    # The student's mass outside the top-k, summed over those classes (1 − Σ q_k would be all
    # rounding when it is small); its log is floored as the kernels do.
    log_q_rest = torch.logsumexp(log_q.scatter(-1, indices, float("-inf")), -1)
    log_p = torch.cat([log_p_k, teacher_rest.log().unsqueeze(-1)], -1)
    log_q_bins = torch.cat([log_q.gather(-1, indices),
                            log_q_rest.clamp_min(math.log(MIN_REST)).unsqueeze(-1)], -1)
    q = torch.cat([log_q.gather(-1, indices).exp(), log_q_rest.exp().unsqueeze(-1)], -1)
    kd_rows = divergence_rows(log_p.exp(), q, log_p, log_q_bins, divergence, beta)
    kd_rows = kd_rows * (temperature * temperature)
    ce_rows = hard_label_rows(student, labels, ignore_index, torch.float32) if with_ce else None
    return combine_rows(kd_rows, ce_rows, labels, alpha, ignore_index, reduction, mask)


@support.python_parts(OP)
def _register() -> None:
    @torch.library.register_fake(f"kdplug::{OP}")
    def _(student, indices, values, temperature, divergence, beta, labels, alpha, ignore_index,
          mask, reduction, rest_bucket, scales, student_grad):
        loss_shape = (student.shape[0],) if reduction == REDUCTIONS["none"] else ()
        grad = (torch.empty_like(student, memory_format=torch.contiguous_format)
                if student_grad else student.new_empty((0,)))
        return student.new_empty(loss_shape, dtype=torch.float32), grad

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.per_row = inputs[10] == REDUCTIONS["none"]
        ctx.student_grad = inputs[13]
        ctx.save_for_backward(output[1] if ctx.student_grad else None)

    def backward(ctx, grad_loss, _grad_student):
        if grad_loss is None or not ctx.student_grad:
            return (None,) * 14
        (grad_student,) = ctx.saved_tensors
        return (support.scaled_grad(grad_student, grad_loss, ctx.per_row),) + (None,) * 13

    torch.library.register_autograd(f"kdplug::{OP}", backward, setup_context=setup_context)


def native_path(student, indices, logprobs, temperature, divergence, beta, labels, alpha,
                ignore_index, reduction, mask, rest):
    classes, k = student.shape[-1], indices.shape[-1]
    with_ce = labels is not None and alpha < 1
    student_grad = student.requires_grad and torch.is_grad_enabled()
    loss = support.call_fused(
        torch.ops.kdplug.kd_loss_topk_fwd.default, reduction == "none", student_grad,
        student.reshape(-1, classes).contiguous(),
        indices.reshape(-1, k).to(torch.int64).contiguous(),
        logprobs.reshape(-1, k).to(torch.float32).contiguous(), temperature,
        DIVERGENCES[divergence], beta, labels.reshape(-1).long().contiguous() if with_ce else None,
        alpha if with_ce else 1.0, ignore_index,
        None if mask is None else mask.reshape(-1).contiguous(), REDUCTIONS[reduction],
        rest == "bucket", None, student_grad)
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss


def _run(api, student, indices, logprobs, temperature, divergence, beta, labels, alpha,
         ignore_index, reduction, mask, rest, backend):
    temperature, beta, alpha = check_inputs(api, student, indices, logprobs, temperature,
                                            divergence, beta, labels, alpha, ignore_index,
                                            reduction, mask, rest, backend)
    device_type = student.device.type
    supported = student.dtype != torch.float64
    native = support.choose_backend(api, OP, backend, device_type, supported) == "native"
    check_data(api, native, student, labels, alpha, student.shape[-1], ignore_index, mask,
               (indices, logprobs), rest)
    path = native_path if native else torch_path
    return path(student, indices, logprobs, temperature, divergence, beta, labels, alpha,
                ignore_index, reduction, mask, rest)


def kd_loss_topk(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                 teacher_logprobs: torch.Tensor, temperature: float = 1.0, *,
                 divergence: str = "kl", beta: float = 0.5, labels: Optional[torch.Tensor] = None,
                 alpha: float = 1.0, ignore_index: int = -100, reduction: str = "batchmean",
                 mask: Optional[torch.Tensor] = None, rest: str = "renormalize",
                 backend: str = "auto") -> torch.Tensor:
    """kd_loss with the teacher known on its top-k classes per row (as a teacher cache stores
    large vocabularies).

    Args:
        student_logits: [..., C] raw logits (float32, float16, bfloat16).
        teacher_indices: [..., k] integer classes, distinct within a row.
        teacher_logprobs: [..., k] the teacher's log-probabilities at T = 1 on those classes
            (log_softmax of its logits, as `kdplug cache-teacher --top-k` stores them).
        temperature: T > 0. The teacher at T is softmax(teacher_logprobs / T) on its k classes
            (log-probabilities and logits differ by a constant per row, which T cannot change).
        divergence, beta: as in kd_loss, taken over k + 1 bins: the teacher's k classes and one
            rest bin holding every other class. The student's bins are its full softmax at the k
            classes and its summed mass elsewhere; the teacher's are set by ``rest``.
        rest: the teacher's mass outside its top-k:
            "renormalize": none; the teacher is its top-k, renormalized (exact at any T). Every
                divergence then equals the dense one with the teacher at −inf outside the top-k:
                the student is pushed to put no mass there (kl: gradient T·q_c on those classes).
                reverse_kl is infinite there and refused: use "bucket".
            "bucket": r = 1 − Σ exp(logprobs), the mass outside the top-k at T = 1, stays as the
                rest bin, the top-k share 1 − r; the student's rest bin is its mass outside the
                top-k. Exact at T = 1 on the k + 1 bins; at other T it keeps the tail's mass
                fixed, since top-k log-probabilities cannot tell how the tail would soften.
        labels, alpha, ignore_index, reduction, mask, backend: as in kd_loss.

    Returns the float32 loss. The gradient reaches the student only (detach the teacher).
    """
    return _run(API, student_logits, teacher_indices, teacher_logprobs, temperature, divergence,
                beta, labels, alpha, ignore_index, reduction, mask, rest, backend)


def kd_loss_topk_reference(student_logits, teacher_indices, teacher_logprobs, temperature=1.0,
                           *, divergence="kl", beta=0.5, labels=None, alpha=1.0,
                           ignore_index=-100, reduction="batchmean", mask=None,
                           rest="renormalize"):
    """The pure-PyTorch kd_loss_topk."""
    return _run(API, student_logits, teacher_indices, teacher_logprobs, temperature, divergence,
                beta, labels, alpha, ignore_index, reduction, mask, rest, "torch")


def kd_kl_div_topk(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                   teacher_logprobs: torch.Tensor, temperature: float = 1.0, *,
                   reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                   rest: str = "renormalize", backend: str = "auto") -> torch.Tensor:
    """T²·KL(teacher ‖ student) with the teacher known on its top-k classes per row:
    ``kd_loss_topk(..., divergence="kl")``; see kd_loss_topk for the arguments."""
    return _run("kd_kl_div_topk", student_logits, teacher_indices, teacher_logprobs, temperature,
                "kl", 0.5, None, 1.0, -100, reduction, mask, rest, backend)


def kd_kl_div_topk_reference(student_logits, teacher_indices, teacher_logprobs, temperature=1.0,
                             *, reduction="batchmean", mask=None, rest="renormalize"):
    """The pure-PyTorch kd_kl_div_topk."""
    return _run("kd_kl_div_topk", student_logits, teacher_indices, teacher_logprobs, temperature,
                "kl", 0.5, None, 1.0, -100, reduction, mask, rest, "torch")
