"""The fused ops' "incoming gradient is exactly 1" shortcut: known from a mark the engine puts on
the gradient, never by reading a device tensor's value."""
from __future__ import annotations

import pytest
import torch

from kdplug import _dense_op, _ext
from kdplug import _op_support as support
from kdplug.ops import kd_kl_div, kd_kl_div_reference

needs_native = pytest.mark.skipif(not _ext.native_status().available,
                                  reason=f"native op missing: {_ext.native_status().reason}")


def logits(rows=41, classes=1271, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, classes, generator=g)).requires_grad_()
    return student, 3 * torch.randn(rows, classes, generator=g)


def test_a_marked_unit_gradient_takes_the_saved_gradient_as_it_is():
    saved, one = torch.randn(4, 5), torch.ones(())
    assert support.scaled_grad(saved, one, per_row=False) is saved  # CPU: read for free
    on_meta = torch.empty(4, 5, device="meta")
    marked = torch.ones((), device="meta")
    setattr(marked, support.UNIT_GRADIENT, True)
    assert support.scaled_grad(on_meta, marked, per_row=False) is on_meta


def test_an_unmarked_gradient_off_the_cpu_is_multiplied_not_read():
    # a meta tensor has no value: reading it (.item(), what would sync a GPU) would raise
    saved, grad = torch.empty(4, 5, device="meta"), torch.empty((), device="meta")
    out = support.scaled_grad(saved, grad, per_row=False)
    assert out is not saved and out.shape == (4, 5) and out.device.type == "meta"


@needs_native
def test_backward_with_a_unit_gradient_gives_the_exact_gradients():
    for scale in (1.0, 0.3):  # 0.3: the op's output is not the loss; its gradient is not 1
        student, teacher = logits()
        loss = scale * kd_kl_div(student, teacher, 4.0, backend="native")
        support.backward_with_unit_gradient(loss)
        ref_student = student.detach().double().requires_grad_()
        (scale * kd_kl_div_reference(ref_student, teacher.double(), 4.0)).backward()
        torch.testing.assert_close(student.grad, ref_student.grad.float(), rtol=1e-4, atol=1e-6)


@needs_native
def test_the_mark_reaches_the_op_only_as_the_loss_itself(monkeypatch):
    seen = []
    original = support.scaled_grad

    def spy(saved, grad, per_row):
        seen.append(getattr(grad, support.UNIT_GRADIENT, False))
        return original(saved, grad, per_row)

    monkeypatch.setattr(support, "scaled_grad", spy)
    # the Python node, which GPUs use (CPU calls take the C++ one, which reads the value)
    monkeypatch.setitem(support._eager_ops, "kd_loss_fwd", None)
    monkeypatch.setattr(_dense_op, "_fast_path", lambda *args: None)
    student, teacher = logits(7, 3)
    support.backward_with_unit_gradient(kd_kl_div(student, teacher, 2.0, backend="native"))
    support.backward_with_unit_gradient(2 * kd_kl_div(student, teacher, 2.0, backend="native"))
    support.backward_with_unit_gradient(kd_kl_div(student, teacher, 2.0, backend="native")
                                        + student.sum())  # a sum passes the gradient on as is
    assert seen == [True, False, True]
