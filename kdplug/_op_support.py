"""What kdplug's fused ops share: argument checks, the backend choice, the reduction of rows and
the scaling of a gradient the forward already computed."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch

from . import _ext, hyperparameters

REDUCTIONS = {"none": 0, "sum": 1, "batchmean": 2}
BACKENDS = ("auto", "native", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Codes shared with csrc/kd_math.h.
DIVERGENCES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "tvd": 3, "skew_kl": 4, "skew_reverse_kl": 5}
BETA_DIVERGENCES = ("jsd", "skew_kl", "skew_reverse_kl")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_tensor(op: str, name: str, value, dtypes=FLOAT_DTYPES, what="floating-point logits"):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must hold {what} ({names}), got {value.dtype}")


def check_rows(op: str, name: str, value: torch.Tensor) -> None:
    if value.dim() == 0 or value.numel() == 0:
        raise ValueError(f"{op}: {name} must have at least one row and one class, got shape "
                         f"{tuple(value.shape)}")


def check_same_device(op: str, name: str, value: torch.Tensor, other_name: str,
                      other: torch.Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{op}: {name} on {value.device} and {other_name} on {other.device}: "
                         f"both must be on the same device")


def check_temperature(op: str, temperature) -> float:
    """T as a float (a one-element tensor is read as its number), checked by the rule every
    part of kdplug shares (kdplug.hyperparameters)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"{op}: temperature must be a number, got a tensor of shape "
                             f"{tuple(temperature.shape)}")
        temperature = temperature.item()
    return hyperparameters.check_temperature(temperature, prefix=f"{op}: ")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {sorted(choices)}, got {value!r}")


def check_number(op: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def check_divergence(op: str, divergence, beta) -> float:
    """The divergence's name and β: β must lie strictly inside (0, 1) where it is used."""
    check_choice(op, "divergence", divergence, DIVERGENCES)
    beta = check_number(op, "beta", beta)
    if divergence in BETA_DIVERGENCES and not 0.0 < beta < 1.0:
        raise ValueError(f"{op}: beta must be in (0, 1) for divergence={divergence!r} (its "
                         f"mixing weight: m = beta*p + (1-beta)*q), got {beta}")
    return beta


def check_labels(op: str, labels, alpha, rows_shape, device, classes: int, ignore_index,
                 mask, values: bool = True) -> float:
    """α in [0, 1]; labels (class indices shaped like the rows) when α < 1; with ``values``,
    their values too (:func:`check_label_values`)."""
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    alpha = hyperparameters.check_alpha(alpha, prefix=f"{op}: ")
    if labels is None:
        if alpha < 1.0:
            raise ValueError(f"{op}: alpha={alpha} < 1 weighs a hard-label cross-entropy term: "
                             f"pass labels=")
        return alpha
    check_tensor(op, "labels", labels, LABEL_DTYPES, "class indices")
    if labels.shape != rows_shape:
        raise ValueError(f"{op}: labels must have the logits' leading shape {tuple(rows_shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{op}: labels on {labels.device} but logits on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if values:
        check_label_values(op, labels, alpha, classes, ignore_index, mask)
    return alpha


def check_label_values(op: str, labels, alpha: float, classes: int, ignore_index, mask) -> None:
    """In eager mode, when the hard-label term counts: a class or ignore_index in every counted
    row (a read of the labels: a device sync on a GPU)."""
    if labels is None or alpha >= 1.0 or not is_plain_eager(labels):
        return
    counted = labels if mask is None else labels[mask]
    bad = (counted != ignore_index) & ((counted < 0) | (counted >= classes))
    if bool(bad.any()):
        value = int(counted[bad][0])
        raise ValueError(f"{op}: labels must be classes in [0, {classes}) or ignore_index "
                         f"({ignore_index}), found {value}")


_deferral = threading.local()


@contextlib.contextmanager
def deferred_value_checks() -> Iterator[None]:
    """Within it (this thread), op calls that run the native CUDA kernel skip the value checks
    that read their tensors (label and top-k index ranges, repeated indices, the bucket's mass):
    each read would make the host wait for the GPU at every step. The kernels record such faults
    on the device instead; :func:`check_kernel_faults` (or a later op call) raises them. Nothing
    changes on the CPU (its kernels raise at once) or on the pure-PyTorch path."""
    depth = getattr(_deferral, "depth", 0)
    _deferral.depth = depth + 1
    try:
        yield
    finally:
        _deferral.depth = depth


def checks_values(native: bool, device: torch.device) -> bool:
    """Whether an op call reads its inputs' values to check them: yes, unless
    :func:`deferred_value_checks` holds and the native CUDA kernel (which records faults) runs."""
    return not (native and device.type == "cuda" and getattr(_deferral, "depth", 0) > 0)


def check_kernel_faults(wait: bool = True) -> None:
    """Raises (RuntimeError, the CPU kernels' message) the first bad top-k index or label a CUDA
    kernel recorded since the last check, and clears it. ``wait=True`` waits for every kernel
    queued on the GPUs first (a device sync); ``wait=False`` only looks at what has already
    reached the host. Costs nothing where no CUDA kernel of kdplug ran."""
    if not torch.cuda.is_initialized():
        return
    status = _ext._status  # loaded already if any kernel of kdplug ran
    if status is None or not status.available:
        return
    torch.ops.kdplug.check_kernel_faults(wait)


def check_mask(op: str, mask: Optional[torch.Tensor], rows_shape, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must have dtype torch.bool (True = row counts), "
                        f"got {mask.dtype}")
    if mask.shape != rows_shape:
        raise ValueError(f"{op}: mask must have the logits' leading shape {tuple(rows_shape)}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: mask on {mask.device} but logits on {device}")


def reduce_rows(loss_rows: torch.Tensor, reduction: str, mask: Optional[torch.Tensor]):
    """The reductions of the pure-PyTorch paths; loss_rows holds the counted rows only."""
    if reduction == "none":
        if mask is None:
            return loss_rows
        return torch.zeros(mask.shape, dtype=loss_rows.dtype, device=mask.device).masked_scatter(
            mask, loss_rows)
    if reduction == "sum":
        return loss_rows.sum()
    count = loss_rows.numel() if mask is None else mask.sum().clamp_min(1)
    return loss_rows.sum() / count


def is_plain_eager(t: torch.Tensor) -> bool:
    """A real tensor outside any tracer (dynamo, AOT autograd's fake/functional tensors)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


#: Marks a gradient tensor that is exactly 1 (set by backward_with_unit_gradient).
UNIT_GRADIENT = "_kdplug_unit_gradient"


def backward_with_unit_gradient(loss: torch.Tensor) -> None:
    """``loss.backward()``, with its gradient of 1 marked as such: an op whose output is the
    loss itself then knows it without reading the value (which would wait for the GPU)."""
    one = torch.ones_like(loss)
    setattr(one, UNIT_GRADIENT, True)
    loss.backward(one)


def scaled_grad(saved_grad: torch.Tensor, grad_loss: torch.Tensor, per_row: bool):
    """The saved d(loss)/d(logits) times the incoming gradient.

    The forward already folded the reduction into the saved gradient, so with an incoming
    gradient of exactly 1 the saved tensor is the answer and backward moves no memory at all.
    That is known without a device sync when the caller marked it
    (:func:`backward_with_unit_gradient`), or by reading the number on the CPU, where a read
    waits for nothing; on a GPU an unmarked gradient is multiplied in. Never while tracing
    (torch.compile, opcheck), where the multiply fuses anyway.
    """
    if per_row:
        return scaled_rows(saved_grad, grad_loss)
    if is_plain_eager(grad_loss) and (
            getattr(grad_loss, UNIT_GRADIENT, False)
            or (grad_loss.device.type == "cpu" and grad_loss.item() == 1.0)):
        return saved_grad
    return (saved_grad * grad_loss).to(saved_grad.dtype)


#: Bound on the float32 temporary of scaled_rows (bytes).
ROW_CHUNK_BYTES = 16 << 20


def scaled_rows(saved_grad: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """saved_grad [rows, C] times grad_rows [rows] (reduction="none"), rounded once into the
    logits' dtype. grad_rows is float32 while the logits may be bf16/fp16, and the product in one
    expression would be a float32 [rows, C] temporary (4 GB at 8192×128256); here it goes by
    stretches of rows whose float32 product stays under ROW_CHUNK_BYTES. While tracing, the
    one expression is fused anyway."""
    factors = grad_rows.unsqueeze(-1)
    if (saved_grad.dtype == torch.promote_types(saved_grad.dtype, grad_rows.dtype)
            or not is_plain_eager(saved_grad)):
        return (saved_grad * factors).to(saved_grad.dtype)
    out = torch.empty_like(saved_grad)
    row_bytes = max(saved_grad[0].numel(), 1) * grad_rows.element_size()
    step = max(ROW_CHUNK_BYTES // row_bytes, 1)
    for start in range(0, saved_grad.shape[0], step):
        end = start + step
        out[start:end].copy_(saved_grad[start:end] * factors[start:end])
    return out


# Dispatch below the Autograd keys (torch.library's own redispatch uses it): private, so absent
# from a torch that dropped it, where the op goes through its registered autograd kernel instead.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


class _EagerFusedLoss(torch.autograd.Function):
    """Eager autograd of the fused ops: the op runs once in forward, writing the gradients that
    are wanted, and backward only scales them (as the op's registered autograd does, which
    torch.compile and opcheck use). From here the op is called below autograd, which skips
    torch.library's per-call bookkeeping: without grad mode its registered autograd kernel would
    still run, only to redispatch (about 10 us a call, most of a small batch's op time)."""

    @staticmethod
    def forward(ctx, op, per_row, *inputs):
        with _below_autograd():
            loss, *grads = op(*inputs)
        ctx.per_row = per_row
        ctx.inputs = len(inputs)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # an empty saved gradient is one the forward was told nobody wants
        grads = [scaled_grad(g, grad_loss, ctx.per_row) if g.numel() else None
                 for g in ctx.saved_tensors]
        return (None, None, *grads, *([None] * (ctx.inputs - len(grads))))


def eager_op(op: str):
    """The C++ autograd twin of `kdplug::op` (kdplug::<op>_eager), or None where the extension
    has none (a build from before it)."""
    if op not in _eager_ops:
        name = f"{op}_eager"
        if not torch._C._dispatch_has_kernel(f"kdplug::{name}"):
            # remembered only once the extension has loaded: asked before, it may come yet
            if _ext._status is not None:
                _eager_ops[op] = None
            return None
        _eager_ops[op] = getattr(torch.ops.kdplug, name).default
    return _eager_ops[op]


_eager_ops: dict = {}


def call_fused(op, per_row: bool, wants_grad: bool, *inputs):
    """The loss of `op(*inputs)` (loss first, then the gradients of the leading inputs, as the
    kd_loss ops return them), with autograd when a gradient is wanted."""
    if not wants_grad:
        return op(*inputs)[0]
    if torch.compiler.is_compiling():  # the op's registered autograd, which the tracer knows
        return op(*inputs)[0]
    if not per_row and inputs[0].device.type == "cpu":
        # autograd in C++ (csrc/kd_loss_eager.cpp): the Python node below costs more than the
        # kernel on small batches. On a GPU the Python node stays, for its unit-gradient mark.
        eager = eager_op(op.name().split("::", 1)[1])
        if eager is not None:
            return eager(*inputs)
    return _EagerFusedLoss.apply(op, per_row, *inputs)


# op name -> a function registering its fake kernel and autograd; run once, when the compiled op
# is first found (registering them needs the op's schema, which only the extension provides).
_python_parts: dict = {}
_python_parts_done: set = set()


def python_parts(op: str):
    """Decorator: `fn` registers the Python parts of `kdplug::op`."""
    def decorate(fn):
        _python_parts[op] = fn
        return fn
    return decorate


def native_available(op: str, device_type: str) -> bool:
    """Whether `kdplug::op` has a native kernel for this device type."""
    status = _ext.native_status()
    if not status.available or device_type not in ("cpu", "cuda"):
        return False
    if op not in _python_parts_done:
        _python_parts[op]()
        _python_parts_done.add(op)
    key = (op, device_type)
    if key not in _has_kernel:  # asked at every call: the registrations do not change
        _has_kernel[key] = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"kdplug::{op}", "CUDA" if device_type == "cuda" else "CPU")
    return _has_kernel[key]


_has_kernel: dict = {}


def assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (2-4 s of
    start-up for every command that imports the ops): that decorator only sets this flag, which
    dynamo reads when it traces a call (tests/test_startup.py checks it still sets just this)."""
    fn._dynamo_marked_constant = True
    return fn


# torch.compile runs the choice once while tracing and keeps the answer as a constant, instead
# of tracing the extension loader (locks, imports, a possible JIT build).
@assume_constant_result
def choose_backend(api: str, op: str, backend: str, device_type: str, supported: bool) -> str:
    """"native" or "torch" for one call; `supported` is False for inputs the kernel lacks."""
    if backend == "torch" or _ext._env_flag(_ext.FORCE_TORCH_ENV):
        if backend == "native":
            raise RuntimeError(f"{api}: backend='native' but {_ext.FORCE_TORCH_ENV}=1 is set")
        return "torch"
    if supported and native_available(op, device_type):
        return "native"
    status = _ext.native_status()
    why = (status.reason if not status.available
           else f"no native kernel of kdplug::{op} for these {device_type} tensors")
    if backend == "native":
        raise RuntimeError(f"{api}: backend='native' is not available: {why}")
    if not status.available:
        _ext.warn_fallback_once(status)
    return "torch"
