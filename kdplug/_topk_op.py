"""kd_kl_div_topk: a teacher known on its top-k classes, through kdplug::kd_kl_topk_fwd or pure
PyTorch. The semantics are spelled out in csrc/kd_math.h and in kd_kl_div_topk's docstring."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _op_support as support
from ._op_support import REDUCTIONS

API = "kd_kl_div_topk"
OP = "kd_kl_topk_fwd"
REST_MODES = ("renormalize", "bucket")
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
MIN_REST = 1e-30  # a student rest mass below this is taken as this (as the kernels do)


def check_inputs(student, indices, logprobs, temperature, reduction, mask, rest, backend):
    support.check_tensor(API, "student_logits", student)
    support.check_tensor(API, "teacher_indices", indices, INDEX_DTYPES, "class indices")
    support.check_tensor(API, "teacher_logprobs", logprobs, support.FLOAT_DTYPES[:3],
                         "log-probabilities")
    support.check_rows(API, "student_logits", student)
    if indices.shape != logprobs.shape:
        raise ValueError(f"{API}: teacher_indices {tuple(indices.shape)} and teacher_logprobs "
                         f"{tuple(logprobs.shape)} must have the same shape [..., k]")
    if indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"{API}: the teacher's rows {tuple(indices.shape[:-1])} differ from the "
                         f"student's {tuple(student.shape[:-1])}")
    k, classes = indices.shape[-1], student.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"{API}: k = {k} teacher classes per row, expected 1 <= k <= {classes}")
    support.check_same_device(API, "student_logits", student, "teacher_indices", indices)
    support.check_same_device(API, "student_logits", student, "teacher_logprobs", logprobs)
    temperature = support.check_temperature(API, temperature)
    support.check_choice(API, "reduction", reduction, REDUCTIONS)
    support.check_choice(API, "rest", rest, REST_MODES)
    support.check_choice(API, "backend", backend, support.BACKENDS)
    support.check_mask(API, mask, student.shape[:-1], student.device)
    if logprobs.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{API}: the top-k path gives no gradient to the teacher; pass "
                         f"teacher_logprobs.detach() (or use kd_kl_div with dense logits)")
    if support.is_plain_eager(indices):
        _check_values(indices, logprobs, classes, mask, rest)
    return temperature


def _check_values(indices, logprobs, classes, mask, rest):
    """Data checks (eager only: each reads the tensors, a device sync on a GPU)."""
    if mask is not None:
        indices, logprobs = indices[mask], logprobs[mask]
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= classes:
        raise ValueError(f"{API}: teacher_indices must lie in [0, {classes}), found "
                         f"{low if low < 0 else high}")
    flat = indices.reshape(-1, indices.shape[-1]).sort(-1).values
    repeats = (flat[:, 1:] == flat[:, :-1]).any(-1)
    if bool(repeats.any()):
        row = int(repeats.nonzero()[0, 0])
        raise ValueError(f"{API}: teacher_indices must be distinct within a row; counted row "
                         f"{row} repeats a class: {flat[row].tolist()[:16]}")
    if rest == "bucket":
        mass = logprobs.float().exp().sum(-1)
        worst = float(mass.max())
        if worst > 1.0 + 1e-3:
            raise ValueError(f"{API}: rest='bucket' needs teacher_logprobs to be log-probabilities "
                             f"at T = 1, but their exp sums to {worst:.4g} > 1 in some row")


def torch_path(student, indices, logprobs, temperature, reduction, mask, rest):
    if mask is not None:
        student, indices, logprobs = student[mask], indices[mask], logprobs[mask]
    inv_t = 1.0 / temperature
    log_q = F.log_softmax(student.float() * inv_t, dim=-1)
    log_q_k = log_q.gather(-1, indices.long())
    values = logprobs.float()
    log_p_k = F.log_softmax(values * inv_t, dim=-1)
    zero = torch.zeros((), dtype=torch.float32, device=student.device)
    term = torch.zeros(log_q_k.shape[:-1], dtype=torch.float32, device=student.device)
    if rest == "bucket":
        teacher_rest = (1 - values.exp().sum(-1)).clamp_min(0)
        log_p_k = log_p_k + torch.log1p(-teacher_rest).unsqueeze(-1)
        # The student's mass outside the top-k, summed over those classes (1 − Σ q_k would be
        # all rounding when it is small).
        log_q_outside = log_q.scatter(-1, indices.long(), float("-inf"))
        student_rest = torch.logsumexp(log_q_outside, -1).exp().clamp_min(MIN_REST)
        has_rest = teacher_rest > 0
        log_rest = torch.where(has_rest, teacher_rest, torch.ones_like(teacher_rest)).log()
        term = teacher_rest * (log_rest - student_rest.log())
    p_k = log_p_k.exp()
    has_mass = p_k > 0
    term = term + (p_k * (torch.where(has_mass, log_p_k, zero)
                          - torch.where(has_mass, log_q_k, zero))).sum(-1)
    return support.reduce_rows(term * (temperature * temperature), reduction, mask)


@support.python_parts(OP)
def _register() -> None:
    @torch.library.register_fake(f"kdplug::{OP}")
    def _(student, indices, values, temperature, mask, reduction, rest_bucket):
        loss_shape = (student.shape[0],) if reduction == REDUCTIONS["none"] else ()
        return (student.new_empty(loss_shape, dtype=torch.float32),
                torch.empty_like(student, memory_format=torch.contiguous_format))

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.per_row = inputs[5] == REDUCTIONS["none"]
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_student):
        if grad_loss is None:
            return (None,) * 7
        (grad_student,) = ctx.saved_tensors
        return (support.scaled_grad(grad_student, grad_loss, ctx.per_row),) + (None,) * 6

    torch.library.register_autograd(f"kdplug::{OP}", backward, setup_context=setup_context)


def native_path(student, indices, logprobs, temperature, reduction, mask, rest):
    classes, k = student.shape[-1], indices.shape[-1]
    loss, _ = torch.ops.kdplug.kd_kl_topk_fwd.default(
        student.reshape(-1, classes).contiguous(),
        indices.reshape(-1, k).to(torch.int64).contiguous(),
        logprobs.reshape(-1, k).to(torch.float32).contiguous(), temperature,
        None if mask is None else mask.reshape(-1).contiguous(), REDUCTIONS[reduction],
        rest == "bucket")
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss


def kd_kl_div_topk(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                   teacher_logprobs: torch.Tensor, temperature: float = 1.0, *,
                   reduction: str = "batchmean", mask: Optional[torch.Tensor] = None,
                   rest: str = "renormalize", backend: str = "auto") -> torch.Tensor:
    """T²·KL(teacher ‖ student) with the teacher known on its top-k classes per row.

    Args:
        student_logits: [..., C] raw logits (float32, float16, bfloat16).
        teacher_indices: [..., k] integer classes, distinct within a row.
        teacher_logprobs: [..., k] the teacher's log-probabilities at T = 1 on those classes
            (log_softmax of its logits, as `kdplug cache-teacher --top-k` stores them).
        temperature: T > 0. The teacher at T is softmax(teacher_logprobs / T) on its k classes
            (log-probabilities and logits differ by a constant per row, which T cannot change).
        rest: how the teacher's mass outside the top-k is treated:
            "renormalize": the teacher is its top-k, renormalized (exact at any T); the student's
                mass outside the top-k still gets its gradient (it should be 0).
            "bucket": the teacher's mass outside the top-k at T = 1, r = 1 − Σ exp(logprobs),
                stays as one class r, the top-k share 1 − r; the student is compared on the same
                k + 1 classes (its own rest is 1 − Σ q over the top-k). Exact at T = 1; at other T
                it keeps the tail's mass fixed, since top-k log-probabilities cannot tell how the
                tail would soften.
        reduction, mask, backend: as in kd_kl_div.

    Returns the float32 loss. The gradient reaches the student only (detach the teacher).
    """
    temperature = check_inputs(student_logits, teacher_indices, teacher_logprobs, temperature,
                               reduction, mask, rest, backend)
    device_type = student_logits.device.type
    supported = student_logits.dtype != torch.float64
    if support.choose_backend(API, OP, backend, device_type, supported) == "native":
        return native_path(student_logits, teacher_indices, teacher_logprobs, temperature,
                           reduction, mask, rest)
    return torch_path(student_logits, teacher_indices, teacher_logprobs, temperature, reduction,
                      mask, rest)


def kd_kl_div_topk_reference(student_logits, teacher_indices, teacher_logprobs, temperature=1.0,
                             *, reduction="batchmean", mask=None, rest="renormalize"):
    """The pure-PyTorch kd_kl_div_topk."""
    temperature = check_inputs(student_logits, teacher_indices, teacher_logprobs, temperature,
                               reduction, mask, rest, "torch")
    return torch_path(student_logits, teacher_indices, teacher_logprobs, temperature, reduction,
                      mask, rest)
