"""kd_kl_div: the dense teacher, through kdplug::kd_kl_fwd or pure PyTorch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _op_support as support
from ._op_support import REDUCTIONS

API = "kd_kl_div"
OP = "kd_kl_fwd"


def check_inputs(student, teacher, temperature, reduction, mask, backend) -> float:
    support.check_tensor(API, "student_logits", student)
    support.check_tensor(API, "teacher_logits", teacher)
    if student.shape != teacher.shape:
        raise ValueError(f"{API}: student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape [..., classes]")
    if student.dtype != teacher.dtype:
        raise TypeError(f"{API}: student_logits ({student.dtype}) and teacher_logits "
                        f"({teacher.dtype}) must have the same dtype")
    support.check_same_device(API, "student_logits", student, "teacher_logits", teacher)
    support.check_rows(API, "logits", student)
    temperature = support.check_temperature(API, temperature)
    support.check_choice(API, "reduction", reduction, REDUCTIONS)
    support.check_choice(API, "backend", backend, support.BACKENDS)
    support.check_mask(API, mask, student.shape[:-1], student.device)
    return temperature


def torch_path(student, teacher, temperature, reduction, mask):
    """Same numerics as the kernel: float32 accumulation (float64 for float64), 0·log 0 = 0."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    if mask is not None:  # only counted rows are computed: padding may hold anything, even NaN
        student, teacher = student[mask], teacher[mask]
    # 1/T in double, then one multiply: 1/0.05 is exactly 20, 0.05 in float32 is not.
    inv_t = 1.0 / temperature
    log_q = F.log_softmax(student.to(acc) * inv_t, dim=-1)
    log_p = F.log_softmax(teacher.to(acc) * inv_t, dim=-1)
    p = log_p.exp()
    # Where p = 0 the term is 0; the where() on both logs keeps -inf out of the gradient too.
    has_mass = p > 0
    zero = torch.zeros((), dtype=acc, device=student.device)
    term = p * (torch.where(has_mass, log_p, zero) - torch.where(has_mass, log_q, zero))
    return support.reduce_rows(term.sum(-1) * (temperature * temperature), reduction, mask)


@support.python_parts(OP)
def _register() -> None:
    @torch.library.register_fake(f"kdplug::{OP}")
    def _(student, teacher, temperature, mask, reduction, teacher_grad):
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss_shape = (student.shape[0],) if reduction == REDUCTIONS["none"] else ()
        grad_teacher = (torch.empty_like(teacher, memory_format=torch.contiguous_format)
                        if teacher_grad else student.new_empty((0,)))
        return (student.new_empty(loss_shape, dtype=acc),
                torch.empty_like(student, memory_format=torch.contiguous_format), grad_teacher)

    def setup_context(ctx, inputs, output):
        _, _, _, _, reduction, teacher_grad = inputs
        _, grad_student, grad_teacher = output
        ctx.mark_non_differentiable(grad_student, grad_teacher)
        # Otherwise autograd fills N×C zeros as the "incoming gradients" of those two outputs.
        ctx.set_materialize_grads(False)
        ctx.per_row = reduction == REDUCTIONS["none"]
        ctx.teacher_grad = teacher_grad
        ctx.save_for_backward(grad_student, grad_teacher if teacher_grad else None)

    def backward(ctx, grad_loss, _grad_student, _grad_teacher):
        if grad_loss is None:
            return None, None, None, None, None, None
        grad_student, grad_teacher = ctx.saved_tensors
        return (support.scaled_grad(grad_student, grad_loss, ctx.per_row),
                support.scaled_grad(grad_teacher, grad_loss, ctx.per_row)
                if ctx.teacher_grad else None,
                None, None, None, None)

    torch.library.register_autograd(f"kdplug::{OP}", backward, setup_context=setup_context)


def native_path(student, teacher, temperature, reduction, mask):
    classes = student.shape[-1]
    teacher_grad = teacher.requires_grad and torch.is_grad_enabled()
    loss, _, _ = torch.ops.kdplug.kd_kl_fwd.default(
        student.reshape(-1, classes).contiguous(), teacher.reshape(-1, classes).contiguous(),
        temperature, None if mask is None else mask.reshape(-1).contiguous(),
        REDUCTIONS[reduction], teacher_grad)
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss


def kd_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float = 1.0, *, reduction: str = "batchmean",
              mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Temperature-scaled KL divergence of the student from the teacher, T²·KL(p ‖ q) per row.

    Args:
        student_logits, teacher_logits: [..., C] raw logits (float32, float16, bfloat16; float64
            runs in float64 on the CPU). Leading dimensions are rows (e.g. batch × tokens).
        temperature: T > 0; both sides are softened by it and the loss is scaled by T².
        reduction: "none" (per row, shape [...]), "sum", or "batchmean" (sum / counted rows:
            torch's batchmean for 2-D input, the per-token mean for sequences).
        mask: optional bool tensor shaped like the leading dimensions; False rows (padding) add
            nothing to the loss or the count and get zero gradient.
        backend: "auto" (native kernel when available, else PyTorch), "native" (raise if the
            kernel is missing) or "torch". KDPLUG_FORCE_TORCH=1 forces "torch".

    Returns the loss in float32 (float64 for float64 inputs). The gradient reaches the teacher's
    logits too when they require grad (mutual distillation); otherwise no work is spent on it.
    """
    temperature = check_inputs(student_logits, teacher_logits, temperature, reduction, mask,
                               backend)
    device_type = student_logits.device.type
    supported = not (student_logits.dtype == torch.float64 and device_type != "cpu")
    if support.choose_backend(API, OP, backend, device_type, supported) == "native":
        return native_path(student_logits, teacher_logits, temperature, reduction, mask)
    return torch_path(student_logits, teacher_logits, temperature, reduction, mask)


def kd_kl_div_reference(student_logits, teacher_logits, temperature=1.0, *,
                        reduction="batchmean", mask=None):
    """The pure-PyTorch kd_kl_div (always available; autograd through ordinary ops)."""
    temperature = check_inputs(student_logits, teacher_logits, temperature, reduction, mask,
                               "torch")
    return torch_path(student_logits, teacher_logits, temperature, reduction, mask)
