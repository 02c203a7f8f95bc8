"""The fused ops' backward: what it allocates and what it reads (issue #17, items 9–11)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdplug import _ext
from kdplug import _op_support as support
from kdplug.ops import kd_loss, kd_loss_topk

needs_native = pytest.mark.skipif(not _ext.native_status().available,
                                  reason=f"native op missing: {_ext.native_status().reason}")


class LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def bf16_logits(rows=64, classes=1271, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, classes, generator=g)).bfloat16()
    teacher = (3 * torch.randn(rows, classes, generator=g)).bfloat16()
    return student, teacher


def dense_loss(student, teacher):
    return kd_loss(student, teacher, 2.0, divergence="jsd", reduction="none", backend="native")


def topk_loss(student, teacher):
    logprobs, indices = torch.log_softmax(teacher.float(), -1).topk(16, -1)
    return kd_loss_topk(student, indices, logprobs, 2.0, reduction="none", backend="native")


@needs_native
@pytest.mark.parametrize("loss_fn", [dense_loss, topk_loss], ids=["dense", "topk"])
def test_per_row_backward_of_bf16_logits_has_no_float32_temporary_of_full_size(
        loss_fn, monkeypatch):
    rows, classes, chunk_rows = 64, 1271, 8
    monkeypatch.setattr(support, "ROW_CHUNK_BYTES", chunk_rows * classes * 4)
    student, teacher = bf16_logits(rows, classes)
    # the saved gradient itself: an incoming gradient of ones leaves it as it is
    saved = torch.autograd.grad(loss_fn(student.requires_grad_(), teacher),
                                student, torch.ones(rows))[0]
    grad_rows = torch.rand(rows, generator=torch.Generator().manual_seed(1)) + 0.5
    loss = loss_fn(student, teacher)
    with LargestFloat32() as seen:
        (grad,) = torch.autograd.grad(loss, student, grad_rows)
    assert grad.dtype == torch.bfloat16
    assert 0 < seen.largest <= chunk_rows * classes < rows * classes
    # rounded once, from the float32 product: the same as the one-expression multiply
    torch.testing.assert_close(grad, (saved.float() * grad_rows[:, None]).bfloat16(),
                               rtol=0, atol=0)


def test_scaled_rows_keeps_float32_and_float64_in_one_multiply():
    saved = torch.randn(5, 7)
    rows = torch.rand(5)
    torch.testing.assert_close(support.scaled_rows(saved, rows), saved * rows[:, None])
    saved64 = saved.double()
    assert support.scaled_rows(saved64, rows.double()).dtype == torch.float64


class OpCalls(TorchDispatchMode):
    """Records each kdplug op call's schema arguments while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "kdplug":
            self.calls.append((func.__name__.split(".")[0], args, func(*args, **(kwargs or {}))))
            return self.calls[-1][2]
        return func(*args, **(kwargs or {}))


def gradients_asked(loss_fn, student, teacher):
    """The op's "student_grad" flag (and the teacher's, for the dense op) of one call, and the
    numel of the gradient buffers it returned."""
    with OpCalls() as seen:
        loss_fn(student, teacher)
    ((name, args, out),) = seen.calls
    flags = (args[11], args[12]) if name == "kd_loss_fwd" else (args[13],)
    return flags, [g.numel() for g in out[1:]]


@needs_native
@pytest.mark.parametrize("loss_fn", [dense_loss, topk_loss], ids=["dense", "topk"])
def test_no_gradient_is_written_when_none_is_wanted(loss_fn):
    student, teacher = bf16_logits(6, 300)
    flags, sizes = gradients_asked(loss_fn, student.clone().requires_grad_(), teacher)
    assert flags[0] is True and sizes[0] == 6 * 300  # the control: wanted, written
    with torch.no_grad():  # evaluation
        flags, sizes = gradients_asked(loss_fn, student.clone().requires_grad_(), teacher)
    assert not any(flags) and not any(sizes)
    flags, sizes = gradients_asked(loss_fn, student, teacher)  # a student without grad
    assert not any(flags) and not any(sizes)
