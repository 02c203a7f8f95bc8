"""fused_linear_kd: kd_loss on ``hidden @ headᵀ`` computed chunk by chunk of tokens, so neither the
student's nor the teacher's [tokens, vocabulary] logits are ever held whole.

Per chunk of rows: both heads' logits by torch matmuls, the per-row op (kdplug::kd_loss_fwd or
kd_loss_topk_fwd, given the whole batch's reduction factors) for the chunk's loss and the gradient
of its logits, folded at once into the student's hidden-state gradient (that chunk's rows) and
head weight/bias gradients (accumulated). Backward only scales what the forward computed. Peak
extra memory: a chunk's logits and their gradient plus the head's gradient, whatever the number
of tokens. Liger-Kernel's fused linear JSD follows the same plan on GPUs (Triton); this one adds
T², every divergence of kd_loss, the fused cross-entropy, a top-k teacher and a CPU path.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _mixed_gemm as mixed_gemm
from . import _op_support as support
from ._dense_op import OP as DENSE_OP
from ._dense_op import kd_loss
from ._divergences import hard_label_rows
from ._op_support import DIVERGENCES
from ._topk_op import INDEX_DTYPES, OP as TOPK_OP, REST_MODES, check_data, kd_loss_topk

API = "fused_linear_kd"
REDUCTIONS = ("batchmean", "sum")
# the logits of one chunk, per side. At V = 128256 (fp32, 2048 x 256) chunks of 128, 256 and
# 512 rows ran within noise of each other (bench_fused_linear.py --chunk-sizes), so the
# smallest memory wins.
CHUNK_BYTES = 64 * 2**20


def default_chunk_size(vocab: int, hidden: int, itemsize: int = 4) -> int:
    """Rows per chunk: one side's logits and hidden rows (itemsize bytes per element: 4 for
    float32, 2 for bf16) within CHUNK_BYTES, a multiple of 8 rows (matmul-friendly) when more
    than 8 fit."""
    rows = max(1, CHUNK_BYTES // (itemsize * (vocab + hidden)))
    return rows if rows < 8 else rows - rows % 8


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _check_head(name: str, hidden: torch.Tensor, weight, bias) -> None:
    support.check_tensor(API, f"{name}_weight", weight, what="floating-point weights")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{API}: {name}_weight must be [vocabulary, {hidden.shape[-1]}] (as "
                         f"nn.Linear.weight for hidden states [..., {hidden.shape[-1]}]), got "
                         f"{tuple(weight.shape)}")
    support.check_same_device(API, f"{name}_hidden", hidden, f"{name}_weight", weight)
    if bias is not None:
        support.check_tensor(API, f"{name}_bias", bias, what="floating-point biases")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{API}: {name}_bias must be [{weight.shape[0]}], got "
                             f"{tuple(bias.shape)}")
        support.check_same_device(API, f"{name}_hidden", hidden, f"{name}_bias", bias)


def _check_vocabulary(student_vocab: int, teacher_vocab: int) -> None:
    """The prefix rule: a teacher may have more classes (its vocabulary extends the student's,
    as Qwen2.5 72B's 152,064 does 3B's 151,936); its extra classes are dropped and its softmax
    renormalized over the shared ones. Fewer teacher classes is an error."""
    if teacher_vocab < student_vocab:
        raise ValueError(f"{API}: the teacher has {teacher_vocab} classes but the student has "
                         f"{student_vocab}; the teacher's vocabulary must equal the student's or "
                         f"extend it (the student's is then taken as its prefix)")


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                  teacher_topk, labels, temperature, alpha, divergence, beta, student_bias,
                  teacher_bias, ignore_index, mask, rest, reduction, chunk_size, backend):
    support.check_tensor(API, "student_hidden", student_hidden, what="floating-point hidden "
                         "states")
    support.check_rows(API, "student_hidden", student_hidden)
    _check_head("student", student_hidden, student_weight, student_bias)
    rows_shape, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    support.check_mask(API, mask, rows_shape, student_hidden.device)
    forms = [teacher_hidden is not None or teacher_weight is not None,
             teacher_logits is not None, teacher_topk is not None]
    if sum(forms) != 1:
        raise ValueError(f"{API}: give the teacher in exactly one form: teacher_hidden with "
                         f"teacher_weight, teacher_logits, or teacher_topk=(indices, logprobs); "
                         f"got {sum(forms)}")
    if forms[0]:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"{API}: teacher_hidden and teacher_weight go together")
        support.check_tensor(API, "teacher_hidden", teacher_hidden,
                             what="floating-point hidden states")
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        teacher_rows, teacher_vocab = teacher_hidden.shape[:-1], teacher_weight.shape[0]
    elif forms[1]:
        support.check_tensor(API, "teacher_logits", teacher_logits)
        teacher_rows, teacher_vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    else:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError(f"{API}: teacher_topk must be a pair (indices, logprobs), got "
                            f"{type(teacher_topk).__name__}")
        indices, logprobs = teacher_topk
        support.check_tensor(API, "teacher_topk indices", indices, INDEX_DTYPES, "class indices")
        support.check_tensor(API, "teacher_topk logprobs", logprobs, support.FLOAT_DTYPES[:3],
                             "log-probabilities")
        if indices.shape != logprobs.shape or not 1 <= indices.shape[-1] <= vocab:
            raise ValueError(f"{API}: teacher_topk indices {tuple(indices.shape)} and logprobs "
                             f"{tuple(logprobs.shape)} must both be [..., k], 1 <= k <= {vocab}")
        teacher_rows, teacher_vocab = indices.shape[:-1], vocab
    if teacher_rows != rows_shape:
        raise ValueError(f"{API}: the teacher's rows {tuple(teacher_rows)} differ from the "
                         f"student's {tuple(rows_shape)}")
    _check_vocabulary(vocab, teacher_vocab)
    if forms[2] and divergence == "reverse_kl" and rest == "renormalize":
        raise ValueError(f"{API}: divergence='reverse_kl' against a renormalized top-k teacher "
                         f"is infinite (the student has mass outside the teacher's k classes); "
                         f"use rest='bucket'")
    if teacher_bias is not None and not forms[0]:
        raise ValueError(f"{API}: teacher_bias goes with teacher_hidden and teacher_weight")
    temperature = support.check_temperature(API, temperature)
    beta = support.check_divergence(API, divergence, beta)
    support.check_choice(API, "reduction", reduction, REDUCTIONS)
    support.check_choice(API, "rest", rest, REST_MODES)
    support.check_choice(API, "backend", backend, support.BACKENDS)
    alpha = support.check_labels(API, labels, alpha, rows_shape, student_hidden.device, vocab,
                                 ignore_index, mask, values=False)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{API}: chunk_size must be a positive int (rows per chunk) or None, "
                         f"got {chunk_size!r}")
    return temperature, beta, alpha


def _term_scales(rows: int, labels, mask, alpha, ignore_index, reduction, device, dtype):
    """(kd factor, ce factor) of the whole batch, as the op takes them: for batchmean 1/counted
    rows and 1/counted labelled rows. Counted on the device (no host sync)."""
    if reduction == "sum":
        return torch.ones(2, dtype=dtype, device=device)
    counted = (torch.full((), rows, device=device) if mask is None else mask.sum())
    labelled = counted
    if labels is not None and alpha < 1:
        keep = labels != ignore_index
        labelled = (keep if mask is None else keep & mask).sum()
    return 1.0 / torch.stack([counted, labelled]).clamp_min(1).to(dtype)


class _Teacher:
    """The teacher's logits for a slice of rows, in whichever form it was given."""

    def __init__(self, hidden, weight, bias, logits, topk, vocab: int, dtype) -> None:
        self.dtype, self.topk = dtype, None
        self.hidden = self.weight = self.bias = self.logits = self.buffer = None
        if hidden is not None:  # prefix rule: the extra classes are never computed
            self.hidden, self.weight = _rows(hidden).detach(), weight.detach()[:vocab].to(dtype)
            self.bias = None if bias is None else bias.detach()[:vocab].to(dtype)
        elif logits is not None:
            self.logits = _rows(logits).detach()[:, :vocab]
        else:
            indices, logprobs = topk
            self.topk = (_rows(indices).to(torch.int64), _rows(logprobs).detach().float())

    def logits_of(self, rows: slice) -> torch.Tensor:
        if self.hidden is not None:
            if self.buffer is None:  # one buffer for every chunk (see _linear_into)
                self.buffer = self.hidden.new_empty((rows.stop - rows.start, self.weight.shape[0]),
                                                    dtype=self.dtype)
            return _linear_into(self.buffer, self.hidden[rows].to(self.dtype), self.weight,
                                self.bias)
        return self.logits[rows].to(self.dtype).contiguous()


def _linear_into(buffer: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    """F.linear(h, w, b) written into the first rows of a buffer reused by every chunk: on the
    CPU a fresh [chunk, V] tensor per chunk would be page-faulted in again each time."""
    out = buffer[:h.shape[0]]
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def _chunk_native(student, teacher: _Teacher, rows, args, scales, need_grad):
    """(loss of the chunk, d loss / d student logits) from the op's forward, without autograd."""
    T, divergence, beta, labels, alpha, ignore_index, mask, rest = args
    labels = None if labels is None else labels[rows]
    mask = None if mask is None else mask[rows]
    if teacher.topk is None:
        loss, grad, _ = torch.ops.kdplug.kd_loss_fwd.default(
            student, teacher.logits_of(rows), T, DIVERGENCES[divergence], beta,
            labels, alpha, ignore_index, mask, 1, scales, need_grad, False)
        return loss, grad
    indices, logprobs = teacher.topk
    return torch.ops.kdplug.kd_loss_topk_fwd.default(
        student, indices[rows].contiguous(), logprobs[rows].contiguous(), T,
        DIVERGENCES[divergence], beta, labels, alpha, ignore_index, mask, 1, rest == "bucket",
        scales, need_grad)


def _chunk_torch(student, teacher: _Teacher, rows, args, scales, need_grad):
    """The same through kdplug's pure-PyTorch reference ops and autograd on the chunk alone."""
    T, divergence, beta, labels, alpha, ignore_index, mask, rest = args
    mask = None if mask is None else mask[rows]
    with torch.set_grad_enabled(need_grad):
        logits = student.detach().requires_grad_()
        options = dict(divergence=divergence, beta=beta, reduction="none", mask=mask,
                       backend="torch")
        if teacher.topk is None:
            kd_rows = kd_loss(logits, teacher.logits_of(rows), T, **options)
        else:
            indices, logprobs = teacher.topk
            kd_rows = kd_loss_topk(logits, indices[rows], logprobs[rows], T, rest=rest,
                                   **options)
        loss = alpha * scales[0] * kd_rows.sum()
        if labels is not None and alpha < 1:
            ce_rows = hard_label_rows(logits, labels[rows], ignore_index, kd_rows.dtype)
            if mask is not None:
                ce_rows = torch.where(mask, ce_rows, torch.zeros_like(ce_rows))
            loss = loss + (1 - alpha) * scales[1] * ce_rows.sum()
        grad = torch.autograd.grad(loss, logits)[0] if need_grad else None
    return loss.detach(), grad


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, args, reduction, chunk_size, native,
                compute_dtype, grad_enabled):
        _, _, _, labels, alpha, ignore_index, mask, _ = args
        rows = hidden.shape[0]
        acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
        scales = _term_scales(rows, labels, mask, alpha, ignore_index, reduction, hidden.device,
                              acc)
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        want = ctx.needs_input_grad[:3] if grad_enabled else (False,) * 3
        grad_hidden = torch.empty_like(hidden) if want[0] else None
        # the head's gradient sums over every chunk: kept in float32 (float64) whatever w holds
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want[1] else None
        grad_bias = (torch.zeros(bias.shape, dtype=acc, device=bias.device)
                     if bias is not None and want[2] else None)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        chunk_loss = _chunk_native if native else _chunk_torch
        buffer = hidden.new_empty((min(chunk_size, rows), weight.shape[0]), dtype=compute_dtype)
        head_buffer = None
        for start in range(0, rows, chunk_size):
            part = slice(start, min(start + chunk_size, rows))
            h = hidden[part].to(compute_dtype)
            loss, grad = chunk_loss(_linear_into(buffer, h, w, b), teacher, part, args, scales,
                                    any(want))
            total += loss
            if grad_hidden is not None:
                if grad_hidden.dtype == compute_dtype:
                    torch.mm(grad, w, out=grad_hidden[part])
                else:
                    grad_hidden[part] = grad @ w
            if grad_weight is not None:
                if grad_weight.dtype == compute_dtype:
                    grad_weight.addmm_(grad.t(), h)
                elif not mixed_gemm.addmm_t_(grad_weight, grad, h):
                    # no bf16/fp16-in, float32-out GEMM here: the product into one reused
                    # buffer, summed in float32
                    if head_buffer is None:
                        head_buffer = torch.empty_like(w)
                    grad_weight.add_(torch.mm(grad.t(), h, out=head_buffer))
            if grad_bias is not None:
                grad_bias.add_(grad.sum(0))
            del grad  # lets the op reuse its gradient buffer for the next chunk
        ctx.save_for_backward(*(g if g is not None else torch.empty(0)
                                for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        grads = []
        for saved, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(support.scaled_grad(saved, grad_loss, False).to(dtype)
                         if saved.numel() and dtype is not None else None)
        return (*grads, None, None, None, None, None, None, None)


def _drop_uncounted_rows(hidden, teacher_hidden, teacher_topk, labels, mask):
    """The rows the mask leaves out (an LM batch's padding, often a quarter of it) add nothing to
    the loss nor the gradients, so on the CPU they are dropped before any matmul; their hidden
    states get a zero gradient through index_select. Not on CUDA (finding them would wait for
    the device), nor while compiling (a data-dependent shape), nor with ready teacher_logits
    (dropping rows would copy them whole). Returns (hidden, teacher_hidden, teacher_topk,
    labels, mask), mask None when rows were dropped."""
    if (mask is None or hidden.device.type != "cpu" or torch.compiler.is_compiling()
            or not (teacher_hidden is not None or teacher_topk is not None)):
        return hidden, teacher_hidden, teacher_topk, labels, mask
    kept = mask.reshape(-1).nonzero().squeeze(1)
    if not 0 < kept.numel() < mask.numel():
        return hidden, teacher_hidden, teacher_topk, labels, mask
    pick = lambda t: None if t is None else _rows(t).index_select(0, kept)  # noqa: E731
    if teacher_topk is not None:
        teacher_topk = tuple(pick(t) for t in teacher_topk)
    labels = None if labels is None else labels.reshape(-1).index_select(0, kept)
    return pick(hidden), pick(teacher_hidden), teacher_topk, labels, None


def _compute_dtype(hidden: torch.Tensor) -> Tuple[torch.dtype, bool]:
    """The dtype the matmuls and the op run in: autocast's where it is on (the loss as eager
    autocast would compute F.linear's logits), else the hidden states'."""
    device = hidden.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device), True
    return hidden.dtype, False


def fused_linear_kd(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                    teacher_hidden: Optional[torch.Tensor] = None,
                    teacher_weight: Optional[torch.Tensor] = None, *,
                    teacher_logits: Optional[torch.Tensor] = None,
                    teacher_topk: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                    labels: Optional[torch.Tensor] = None, temperature: float = 1.0,
                    alpha: float = 1.0, divergence: str = "kl", beta: float = 0.5,
                    student_bias: Optional[torch.Tensor] = None,
                    teacher_bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                    mask: Optional[torch.Tensor] = None, rest: str = "renormalize",
                    reduction: str = "batchmean", chunk_size: Optional[int] = None,
                    backend: str = "auto") -> torch.Tensor:
    """``kd_loss(student_hidden @ student_weightᵀ + student_bias, teacher logits, ...)`` without
    ever holding the [tokens, vocabulary] logits: computed chunk_size tokens at a time.

    Args:
        student_hidden: [..., H] final hidden states; leading dimensions are tokens (rows).
        student_weight, student_bias: the student's output head, [V, H] and [V] as in nn.Linear.
        The teacher, in exactly one form (it gets no gradient and costs no autograd memory):
            teacher_hidden [..., H_t] with teacher_weight [V_t, H_t] (and teacher_bias): its
                logits are computed per chunk too;
            teacher_logits [..., V_t]: ready logits;
            teacher_topk (indices, logprobs) [..., k]: a top-k teacher (a teacher cache's), as
                kd_loss_topk takes it, with ``rest`` "renormalize" or "bucket".
            A teacher with more classes (V_t > V) must extend the student's vocabulary: its
            first V classes are the student's, the others are dropped and its softmax is
            renormalized over the shared classes (for hidden+head, those rows of its head are
            never multiplied). V_t < V is an error.
        labels, alpha, temperature, divergence, beta, ignore_index, mask: as in kd_loss.
        reduction: "batchmean" (per counted token, CE per labelled token, as kd_loss) or "sum".
            ("none" would need the head's gradient per token, which is what this avoids.)
        chunk_size: tokens per chunk; default default_chunk_size(V, H, itemsize) (~64 MiB of
            logits per side in the compute dtype: 120 tokens at V = 128256, H = 4096, float32).
        On the CPU, rows the mask leaves out are dropped before the matmuls (teacher as
        hidden+head or top-k): padding costs nothing.
        backend: "auto" (the native per-chunk op when built, else PyTorch), "native", "torch".

    Under autocast the matmuls and the op run in autocast's dtype, as F.linear's logits would;
    the head's gradient is accumulated over chunks in float32. Returns the float32 loss
    (float64 for float64 inputs); gradients reach student_hidden, student_weight, student_bias.
    """
    temperature, beta, alpha = _check_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
        teacher_topk, labels, temperature, alpha, divergence, beta, student_bias, teacher_bias,
        ignore_index, mask, rest, reduction, chunk_size, backend)
    vocab, width = student_weight.shape
    student_hidden, teacher_hidden, teacher_topk, labels, mask = _drop_uncounted_rows(
        student_hidden, teacher_hidden, teacher_topk, labels, mask)
    compute_dtype, autocast = _compute_dtype(student_hidden)
    device_type = student_hidden.device.type
    op = DENSE_OP if teacher_topk is None else TOPK_OP
    supported = not (compute_dtype == torch.float64 and (device_type != "cpu" or teacher_topk))
    native = support.choose_backend(API, op, backend, device_type, supported) == "native"
    check_data(API, native, student_hidden, labels, alpha, vocab, ignore_index, mask,
               teacher_topk, rest)
    if teacher_topk is not None and compute_dtype == torch.float64:
        raise TypeError(f"{API}: a top-k teacher takes float32, float16 or bfloat16 student "
                        f"weights and hidden states, got float64")
    with_ce = labels is not None and alpha < 1
    args = (temperature, divergence, beta,
            labels.reshape(-1).long() if with_ce else None,
            alpha if with_ce else 1.0, ignore_index,
            None if mask is None else mask.reshape(-1).contiguous(), rest)
    teacher = _Teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk,
                       vocab, compute_dtype)
    chunk = chunk_size or default_chunk_size(vocab, width, compute_dtype.itemsize)
    no_autocast = (torch.autocast(device_type, enabled=False) if autocast
                   else contextlib.nullcontext())
    with no_autocast:
        return _FusedLinearKD.apply(_rows(student_hidden), student_weight, student_bias, teacher,
                                    args, reduction, chunk, native, compute_dtype,
                                    torch.is_grad_enabled())


def fused_linear_kd_reference(student_hidden, student_weight, teacher_hidden=None,
                              teacher_weight=None, **options) -> torch.Tensor:
    """The pure-PyTorch chunked path (same numerics, always available)."""
    return fused_linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           **{**options, "backend": "torch"})
