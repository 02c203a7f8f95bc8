"""The fused knowledge-distillation loss: temperature softmax + KL divergence in one pass.

`kd_kl_div(student_logits, teacher_logits, T)` is, per row of logits shaped [..., C],

    T² · Σ_c p_c (log p_c − log q_c),   p = softmax(teacher/T), q = softmax(student/T)

reduced by `reduction`. The native kernel (csrc/) writes the student's gradient while it computes
the loss, so forward and backward together read each input once and write the gradient once. The
pure-PyTorch path below has the same signature and numerics, runs wherever the compiled op is
missing, and is the test oracle.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _ext

__all__ = ["kd_kl_div", "kd_kl_div_reference", "REDUCTIONS", "BACKENDS", "backend_status"]

REDUCTIONS = {"none": 0, "sum": 1, "batchmean": 2}
BACKENDS = ("auto", "native", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------- validation

def _check_inputs(student, teacher, temperature, reduction, mask, backend) -> float:
    for name, value in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"kd_kl_div: {name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"kd_kl_div: {name} must hold floating-point logits (float32, float16, "
                            f"bfloat16 or float64), got {value.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"kd_kl_div: student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape [..., classes]")
    if student.dtype != teacher.dtype:
        raise TypeError(f"kd_kl_div: student_logits ({student.dtype}) and teacher_logits "
                        f"({teacher.dtype}) must have the same dtype")
    if student.device != teacher.device:
        raise ValueError(f"kd_kl_div: student_logits on {student.device} and teacher_logits on "
                         f"{teacher.device}: both must be on the same device")
    if student.dim() == 0 or student.numel() == 0:
        raise ValueError(f"kd_kl_div: logits must have at least one row and one class, got shape "
                         f"{tuple(student.shape)}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"kd_kl_div: temperature must be a number, got a tensor of shape "
                             f"{tuple(temperature.shape)}")
        temperature = temperature.item()
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"kd_kl_div: temperature must be a number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"kd_kl_div: temperature must be finite and > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_kl_div: reduction must be one of {sorted(REDUCTIONS)}, "
                         f"got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"kd_kl_div: backend must be one of {list(BACKENDS)}, got {backend!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"kd_kl_div: mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"kd_kl_div: mask must have dtype torch.bool (True = row counts), "
                            f"got {mask.dtype}")
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"kd_kl_div: mask must have the logits' leading shape "
                             f"{tuple(student.shape[:-1])}, got {tuple(mask.shape)}")
        if mask.device != student.device:
            raise ValueError(f"kd_kl_div: mask on {mask.device} but logits on {student.device}")
    return temperature


# ----------------------------------------------------------------------------- pure PyTorch

def _kd_kl_div_torch(student, teacher, temperature, reduction, mask):
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
    loss_rows = term.sum(-1) * (temperature * temperature)
    if mask is not None and reduction == "none":
        loss_rows = torch.zeros(mask.shape, dtype=acc, device=mask.device).masked_scatter(
            mask, loss_rows)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    count = loss_rows.numel() if mask is None else mask.sum().clamp_min(1)
    return loss_rows.sum() / count


def kd_kl_div_reference(student_logits, teacher_logits, temperature=1.0, *,
                        reduction="batchmean", mask=None):
    """The pure-PyTorch kd_kl_div (always available; autograd through ordinary ops)."""
    temperature = _check_inputs(student_logits, teacher_logits, temperature, reduction, mask,
                                "torch")
    return _kd_kl_div_torch(student_logits, teacher_logits, temperature, reduction, mask)


# ----------------------------------------------------------------------------- native op

def _native_op():
    return torch.ops.kdplug.kd_kl_fwd.default


def _register_python_parts() -> None:
    """Fake kernel (shapes for torch.compile / meta) and autograd for the C++ op."""

    @torch.library.register_fake("kdplug::kd_kl_fwd")
    def _(student, teacher, temperature, mask, reduction, teacher_grad):
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss_shape = (student.shape[0],) if reduction == REDUCTIONS["none"] else ()
        loss = student.new_empty(loss_shape, dtype=acc)
        grad_teacher = (torch.empty_like(teacher, memory_format=torch.contiguous_format)
                        if teacher_grad else student.new_empty((0,)))
        return loss, torch.empty_like(student, memory_format=torch.contiguous_format), grad_teacher

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
        scale = grad_loss.unsqueeze(-1) if ctx.per_row else grad_loss
        return (_scaled(grad_student, scale, ctx.per_row),
                _scaled(grad_teacher, scale, ctx.per_row) if ctx.teacher_grad else None,
                None, None, None, None)

    torch.library.register_autograd("kdplug::kd_kl_fwd", backward, setup_context=setup_context)


def _scaled(saved_grad, scale, per_row):
    """The saved d(loss)/d(logits) times the incoming gradient.

    The forward already folded the reduction into the saved gradient, so with the usual incoming
    gradient of exactly 1 (`loss.backward()`) the saved tensor is the answer and backward moves no
    memory at all. That check reads one number (a device sync on a GPU, as Liger-Kernel does); it
    is skipped while tracing (torch.compile, opcheck), where the multiply fuses anyway.
    """
    if not per_row and _is_plain_eager(scale) and scale.item() == 1.0:
        return saved_grad
    return (saved_grad * scale).to(saved_grad.dtype)


def _is_plain_eager(t: torch.Tensor) -> bool:
    """A real tensor outside any tracer (dynamo, AOT autograd's fake/functional tensors)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


_python_parts_registered = False


def _native_available(device: torch.device) -> bool:
    global _python_parts_registered
    status = _ext.native_status()
    if not status.available:
        return False
    if not _python_parts_registered:
        _register_python_parts()
        _python_parts_registered = True
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdplug::kd_kl_fwd", "CUDA" if device.type == "cuda" else "CPU") and device.type in (
        "cpu", "cuda")


def _kd_kl_div_native(student, teacher, temperature, reduction, mask):
    classes = student.shape[-1]
    rows_shape = student.shape[:-1]
    teacher_grad = teacher.requires_grad and torch.is_grad_enabled()
    loss, _, _ = _native_op()(
        student.reshape(-1, classes).contiguous(), teacher.reshape(-1, classes).contiguous(),
        temperature, None if mask is None else mask.reshape(-1).contiguous(),
        REDUCTIONS[reduction], teacher_grad)
    return loss.reshape(rows_shape) if reduction == "none" else loss


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return _choose_backend(backend, device.type, dtype)


# torch.compile runs the choice once while tracing and keeps the answer as a constant, instead
# of tracing the extension loader (locks, imports, a possible JIT build).
@torch.compiler.assume_constant_result
def _choose_backend(backend: str, device_type: str, dtype: torch.dtype) -> str:
    device = torch.device(device_type)
    if backend == "torch" or _ext._env_flag(_ext.FORCE_TORCH_ENV):
        if backend == "native":
            raise RuntimeError(f"kd_kl_div: backend='native' but {_ext.FORCE_TORCH_ENV}=1 is set")
        return "torch"
    if _native_available(device) and not (dtype == torch.float64 and device.type != "cpu"):
        return "native"
    status = _ext.native_status()
    why = (status.reason if not status.available
           else f"no native kernel for {device.type} tensors of {dtype}")
    if backend == "native":
        raise RuntimeError(f"kd_kl_div: backend='native' is not available: {why}")
    if not status.available:
        _ext.warn_fallback_once(status)
    return "torch"


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
    temperature = _check_inputs(student_logits, teacher_logits, temperature, reduction, mask,
                                backend)
    chosen = _resolve_backend(backend, student_logits.device, student_logits.dtype)
    if chosen == "native":
        return _kd_kl_div_native(student_logits, teacher_logits, temperature, reduction, mask)
    return _kd_kl_div_torch(student_logits, teacher_logits, temperature, reduction, mask)


def backend_status() -> dict:
    """Which backend `kd_kl_div(backend="auto")` uses, and why; for `kdplug doctor`."""
    status = _ext.native_status()
    forced = _ext._env_flag(_ext.FORCE_TORCH_ENV)
    return {
        "backend": "native" if status.available and not forced else "torch",
        "native_available": status.available,
        "native_source": status.source,
        "native_devices": status.devices,
        "reason": status.reason,
        "force_torch_env": _ext.FORCE_TORCH_ENV,
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env_overrides": {k: v for k, v in os.environ.items()
                          if k in (_ext.FORCE_TORCH_ENV, _ext.NO_JIT_ENV, "KDPLUG_CPU_GRAD_CACHE")},
    }
