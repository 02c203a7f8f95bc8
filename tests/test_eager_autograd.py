"""The C++ autograd of eager CPU calls (csrc/kd_loss_eager.cpp) and kd_loss's fast path to it:
the same numbers as the reference, the gradient handed over without a copy, and every bad input
raising exactly the error of the full Python path."""
from __future__ import annotations

import pytest
import torch

from kdplug import _dense_op, _ext
from kdplug import _op_support as support
from kdplug.ops import kd_kl_div, kd_loss, kd_loss_reference

needs_native = pytest.mark.skipif(not _ext.native_status().available,
                                  reason=f"native op missing: {_ext.native_status().reason}")

CPP_NODE = "KdLossEager"


def logits(rows=41, classes=1271, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    return student, (3 * torch.randn(rows, classes, generator=g)).to(dtype)


def grads_of(loss_fn, student, teacher, student_grad=True, teacher_grad=False, scale=1.0):
    s = student.detach().clone().requires_grad_(student_grad)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = loss_fn(s, t)
    (scale * loss).backward()
    return loss, s.grad, t.grad, loss.grad_fn


@needs_native
@pytest.mark.parametrize("shape", [(41, 1271), (7, 3), (64, 10), (3, 17, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "reverse_kl"])
@pytest.mark.parametrize("wants", [(True, False), (True, True), (False, True)])
def test_cpu_calls_take_the_cpp_node_and_match_the_float64_reference(cpu_capability, shape,
                                                                     dtype, divergence, wants):
    student, teacher = logits(shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1], dtype)
    student, teacher = student.reshape(shape), teacher.reshape(shape)
    for reduction in ("batchmean", "sum"):
        def native(s, t):
            return kd_loss(s, t, 2.0, divergence=divergence, reduction=reduction, backend="native")

        def reference(s, t):
            return kd_loss_reference(s.double(), t.double(), 2.0, divergence=divergence,
                                     reduction=reduction)

        loss, gs, gt, node = grads_of(native, student, teacher, *wants, scale=0.3)
        ref, rgs, rgt, _ = grads_of(reference, student, teacher, *wants, scale=0.3)
        assert CPP_NODE in node.name()
        tol = dict(rtol=2e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-4,
                                                                                atol=1e-6)
        torch.testing.assert_close(loss.double(), ref, **tol)
        for got, want in ((gs, rgs), (gt, rgt)):
            assert (got is None) == (want is None)
            if got is not None:
                assert got.dtype == dtype
                torch.testing.assert_close(got.double(), want.to(torch.float64), **tol)


@needs_native
def test_labels_and_masks_go_through_the_cpp_node_too(cpu_capability):
    student, teacher = logits(12, 37)
    labels = torch.arange(12) % 37
    labels[3] = -100
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    for kwargs in (dict(labels=labels, alpha=0.3), dict(mask=mask),
                   dict(labels=labels, alpha=0.0, mask=mask)):
        loss, gs, _, node = grads_of(lambda s, t: kd_loss(s, t, 4.0, **kwargs), student, teacher,
                                     scale=2.5)
        ref, rgs, _, _ = grads_of(lambda s, t: kd_loss_reference(s.double(), t.double(), 4.0,
                                                                  **kwargs),
                                  student, teacher, scale=2.5)
        assert CPP_NODE in node.name()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gs.double(), rgs.double(), rtol=1e-4, atol=1e-6)


@needs_native
def test_per_row_losses_keep_the_python_node(cpu_capability):
    student, teacher = logits(5, 9)
    loss, gs, _, node = grads_of(lambda s, t: kd_loss(s, t, reduction="none").sum(), student,
                                 teacher)
    assert CPP_NODE not in node.next_functions[0][0].name()
    ref, rgs, _, _ = grads_of(lambda s, t: kd_loss_reference(s.double(), t.double(),
                                                             reduction="none").sum(),
                              student, teacher)
    torch.testing.assert_close(gs.double(), rgs.double(), rtol=1e-4, atol=1e-6)


@needs_native
def test_a_unit_gradient_is_handed_over_without_a_copy(cpu_capability):
    student, teacher = logits(64, 10)
    s = student.clone().requires_grad_()
    arrived = []
    s.register_hook(lambda g: arrived.append(g.data_ptr()))
    kd_kl_div(s, teacher, 2.0).backward()
    assert arrived == [s.grad.data_ptr()]
    # another gradient than 1 is a product, written once
    s.grad = None
    (3.0 * kd_kl_div(s, teacher, 2.0)).backward()
    s2 = student.clone().requires_grad_()
    kd_kl_div(s2, teacher, 2.0).backward()
    torch.testing.assert_close(s.grad, 3.0 * s2.grad)


@needs_native
def test_a_retained_graph_gives_the_same_gradient_twice(cpu_capability):
    student, teacher = logits(9, 11)
    s = student.clone().requires_grad_()
    loss = kd_kl_div(s, teacher, 2.0)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


@needs_native
def test_without_grad_there_is_no_node_and_the_same_loss(cpu_capability):
    student, teacher = logits(9, 11)
    s = student.clone().requires_grad_()
    with torch.no_grad():
        loss = kd_kl_div(s, teacher, 2.0)
    assert loss.grad_fn is None
    assert torch.equal(loss, kd_kl_div(student, teacher, 2.0))


@needs_native
@pytest.mark.parametrize("kwargs", [
    dict(divergence="jsd", beta=0.3),
    dict(labels=torch.arange(33) % 100, alpha=0.4, ignore_index=7, reduction="sum"),
    dict(mask=torch.arange(33) % 3 > 0, divergence="reverse_kl"),
    dict(labels=torch.arange(33) % 100, alpha=1.0, mask=torch.arange(33) % 2 > 0),
])
def test_the_fast_path_gives_the_full_paths_numbers_bit_for_bit(cpu_capability, monkeypatch,
                                                               kwargs):
    student, teacher = logits(33, 100)
    taken = []
    fast_path = _dense_op._fast_path

    def spy(*args):
        taken.append(fast_path(*args))
        return taken[-1]

    monkeypatch.setattr(_dense_op, "_fast_path", spy)
    fast = grads_of(lambda s, t: kd_loss(s, t, 3.0, **kwargs), student, teacher, True, True)
    assert taken[-1] is not None  # the call went the fast way
    monkeypatch.setattr(_dense_op, "_fast_path", lambda *args: None)
    full = grads_of(lambda s, t: kd_loss(s, t, 3.0, **kwargs), student, teacher, True, True)
    for a, b in zip(fast[:3], full[:3]):
        assert torch.equal(a, b)


def _error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type and message are what is compared
        return type(error), str(error)
    return None


BAD_CALLS = {
    "temperature 0": lambda s, t: kd_kl_div(s, t, 0.0),
    "temperature nan": lambda s, t: kd_kl_div(s, t, float("nan")),
    "temperature str": lambda s, t: kd_kl_div(s, t, "2"),
    "int logits": lambda s, t: kd_kl_div(s.long(), t.long()),
    "shapes differ": lambda s, t: kd_kl_div(s, t[:, :4]),
    "dtypes differ": lambda s, t: kd_kl_div(s, t.double()),
    "teacher on meta": lambda s, t: kd_kl_div(s, t.to("meta")),
    "no classes": lambda s, t: kd_kl_div(s[:, :0], t[:, :0]),
    "unknown divergence": lambda s, t: kd_loss(s, t, divergence="kld"),
    "beta out of range": lambda s, t: kd_loss(s, t, divergence="jsd", beta=1.5),
    "beta str": lambda s, t: kd_loss(s, t, beta="0.5"),
    "unknown reduction": lambda s, t: kd_kl_div(s, t, reduction="mean"),
    "unknown backend": lambda s, t: kd_kl_div(s, t, backend="cuda"),
    "alpha without labels": lambda s, t: kd_loss(s, t, alpha=0.5),
    "alpha 1.5": lambda s, t: kd_loss(s, t, labels=torch.zeros(3, dtype=torch.long), alpha=1.5),
    "alpha nan": lambda s, t: kd_loss(s, t, labels=torch.zeros(3, dtype=torch.long),
                                      alpha=float("nan")),
    "label past the classes": lambda s, t: kd_loss(s, t, labels=torch.tensor([0, 5, 1]),
                                                   alpha=0.5),
    "negative label": lambda s, t: kd_loss(s, t, labels=torch.tensor([0, -1, 1]), alpha=0.5),
    "labels shaped wrong": lambda s, t: kd_loss(s, t, labels=torch.zeros(4, dtype=torch.long),
                                                alpha=0.5),
    "labels of floats": lambda s, t: kd_loss(s, t, labels=torch.zeros(3), alpha=0.5),
    "labels on meta": lambda s, t: kd_loss(s, t, labels=torch.zeros(3, dtype=torch.long,
                                                                    device="meta"), alpha=0.5),
    "ignore_index str": lambda s, t: kd_loss(s, t, labels=torch.zeros(3, dtype=torch.long),
                                             alpha=0.5, ignore_index="-100"),
    "mask of ints": lambda s, t: kd_kl_div(s, t, mask=torch.ones(3, dtype=torch.long)),
    "mask shaped wrong": lambda s, t: kd_kl_div(s, t, mask=torch.ones(2, dtype=torch.bool)),
    "mask not a tensor": lambda s, t: kd_kl_div(s, t, mask=[True, True, True]),
    "mask on meta": lambda s, t: kd_kl_div(s, t, mask=torch.ones(3, dtype=torch.bool,
                                                                 device="meta")),
}


@needs_native
@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_inputs_raise_exactly_the_full_paths_error(name, monkeypatch):
    student, teacher = logits(3, 5)
    student.requires_grad_()
    call = BAD_CALLS[name]
    fast = _error_of(lambda: call(student, teacher))
    monkeypatch.setattr(_dense_op, "_fast_path", lambda *args: None)
    assert fast is not None and fast == _error_of(lambda: call(student, teacher))


@needs_native
def test_the_cpp_op_refuses_per_row_losses():
    student, teacher = logits(3, 5)
    eager = support.eager_op("kd_loss_fwd")
    with pytest.raises(RuntimeError, match="expected a reduced loss"):
        eager(student, teacher, 1.0, 0, 0.5, None, 1.0, -100, None, 0, None, False, False)


@needs_native
@pytest.mark.parametrize("dtype, divergence, with_labels, wants", [
    (torch.float32, 0, False, (True, True)),
    (torch.bfloat16, 2, True, (True, False)),
    (torch.float64, 1, False, (False, True)),
])
def test_opcheck_the_cpp_op(dtype, divergence, with_labels, wants):
    student, teacher = logits(5, 7, dtype)
    labels = torch.tensor([1, 2, -100, 3, 4]) if with_labels else None
    mask = torch.tensor([True, True, False, True, True])
    args = (student.requires_grad_(wants[0]), teacher.requires_grad_(wants[1]), 2.0,
            divergence, 0.5, labels, 0.3 if with_labels else 1.0, -100, mask, 2, None, *wants)
    torch.library.opcheck(support.eager_op("kd_loss_fwd"), args)


@needs_native
def test_eager_op_asked_before_the_extension_loads_is_found_once_it_has(monkeypatch):
    # Before the extension has loaded, the C++ op is not registered yet: that absence must not
    # be remembered, or every later call would take the slower Python node.
    has_kernel = torch._C._dispatch_has_kernel
    monkeypatch.setattr(support, "_eager_ops", {})
    monkeypatch.setattr(_ext, "_status", None)
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel", lambda name: False)
    assert support.eager_op("kd_loss_fwd") is None
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel", has_kernel)
    assert support.eager_op("kd_loss_fwd") is torch.ops.kdplug.kd_loss_fwd_eager.default
    # Once it has loaded, an op it lacks (an older build) is remembered as absent.
    monkeypatch.setattr(_ext, "_status", _ext.native_status())
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel", lambda name: False)
    assert support.eager_op("kd_loss_topk_fwd") is None
    assert support._eager_ops == {"kd_loss_fwd": torch.ops.kdplug.kd_loss_fwd_eager.default,
                                  "kd_loss_topk_fwd": None}
