"""Bad top-k indices and labels on a GPU: the CUDA kernels record the fault on the device and the
host raises the CPU kernel's very message later, without a sync per call; the engine runs the
ops without their syncing Python checks on CUDA only (issue #13 item 1, issue #11). The CUDA
tests skip without a GPU; each has its CPU twin here."""
from __future__ import annotations

import pytest
import torch

from kdplug import _ext
from kdplug import _op_support as support
from kdplug.engine.loop import defers_value_checks
from kdplug.ops import check_kernel_faults, kd_loss, kd_loss_topk
from test_op_kernel_checks import compiled_topk, topk_inputs

pytestmark = [pytest.mark.usefixtures("cpu_capability"),
              pytest.mark.skipif(not _ext.native_status().available,
                                 reason="native op not built")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# csrc/kd_faults.h
INDEX_OUT_OF_RANGE, INDEX_REPEATS, LABEL_OUT_OF_RANGE = 1, 2, 3
OP_KD_LOSS, OP_KD_LOSS_TOPK = 0, 1


def cpu_kernel_error(fn) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


def raw_topk(student, indices, logprobs, labels=None, alpha=1.0):
    """The op itself, below kdplug.ops' Python checks (reduction none)."""
    return torch.ops.kdplug.kd_loss_topk_fwd(student, indices, logprobs, 2.0, 0, 0.5, labels,
                                             alpha, -100, None, 0, False, None, False)[0]


def raw_dense(student, teacher, labels):
    return torch.ops.kdplug.kd_loss_fwd(student, teacher, 2.0, 0, 0.5, labels, 0.5, -100, None,
                                        0, None, False, False)[0]


def bad_topk(case):
    """Top-k inputs with one fault in row 2 and the record a CUDA kernel writes for it."""
    student, indices, logprobs = topk_inputs()
    labels = None
    if case == "repeat":
        indices[2, 0], indices[2, 1] = 4, 4
        record = [INDEX_REPEATS, OP_KD_LOSS_TOPK, 2, 4, 20, -100]
    elif case == "out_of_range":
        indices[2, 1] = 20
        record = [INDEX_OUT_OF_RANGE, OP_KD_LOSS_TOPK, 2, 20, 20, -100]
    else:  # a label
        labels = torch.tensor([0, 1, 25, -100])
        record = [LABEL_OUT_OF_RANGE, OP_KD_LOSS_TOPK, 2, 25, 20, -100]
    return student, indices, logprobs, labels, record


def bad_dense():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    return student, teacher, torch.tensor([0, -5, -100]), [LABEL_OUT_OF_RANGE, OP_KD_LOSS, 1, -5,
                                                            7, -100]


@pytest.fixture
def no_fault_left():
    """A CUDA test leaves no recorded fault behind for the next one."""
    yield
    try:
        check_kernel_faults()
    except RuntimeError:
        pass


# ---- the shared message text (the CUDA host raises through the op raise_kernel_fault's code) ---

@pytest.mark.parametrize("case", ["repeat", "out_of_range", "label"])
def test_a_fault_record_reads_exactly_as_the_cpu_kernel_error(case):
    student, indices, logprobs, labels, record = bad_topk(case)
    alpha = 1.0 if labels is None else 0.5
    expected = cpu_kernel_error(lambda: raw_topk(student, indices, logprobs, labels, alpha))
    assert cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record)) == expected


def test_a_dense_label_fault_record_reads_exactly_as_the_cpu_kernel_error():
    student, teacher, labels, record = bad_dense()
    expected = cpu_kernel_error(lambda: raw_dense(student, teacher, labels))
    assert "kd_loss_fwd: label -5 of row 1 is out of range [0, 7)" in expected
    assert cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record)) == expected


def test_raise_kernel_fault_rejects_a_malformed_record():
    with pytest.raises(RuntimeError, match="expected 6 fields"):
        torch.ops.kdplug.raise_kernel_fault([2, 1, 0])
    with pytest.raises(RuntimeError, match="code 0 is no fault"):
        torch.ops.kdplug.raise_kernel_fault([0, 1, 0, 0, 5, -100])


# ---- who defers the checks ---------------------------------------------------------------------

def test_the_engine_defers_value_checks_on_cuda_only():
    assert defers_value_checks(torch.device("cuda"))
    assert defers_value_checks(torch.device("cuda", 1))
    assert not defers_value_checks(torch.device("cpu"))
    assert not defers_value_checks(torch.device("meta"))


def test_deferral_skips_reads_only_for_the_native_cuda_kernel():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert support.checks_values(True, cuda)  # outside the context: checked
    with support.deferred_value_checks():
        assert not support.checks_values(True, cuda)
        assert support.checks_values(False, cuda)  # the pure-PyTorch path records nothing
        assert support.checks_values(True, cpu)
        with support.deferred_value_checks():
            assert not support.checks_values(True, cuda)
        assert not support.checks_values(True, cuda)  # nesting restores the outer state
    assert support.checks_values(True, cuda)


# ---- CPU: deferral changes nothing, the kernel raises at once ----------------------------------

@pytest.mark.parametrize("case", ["repeat", "out_of_range", "label"])
def test_deferred_checks_on_the_cpu_still_raise_eager_and_compiled(case):
    student, indices, logprobs, labels, record = bad_topk(case)
    kw = {} if labels is None else {"labels": labels, "alpha": 0.5}
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    with support.deferred_value_checks():
        with pytest.raises(ValueError):  # eager: the Python check, kept on the CPU
            kd_loss_topk(student, indices, logprobs, 2.0, backend="native", **kw)
        with pytest.raises(RuntimeError) as info:  # compiled: the kernel
            compiled_topk(student, indices, logprobs, **kw)
    assert str(info.value).splitlines()[0] == expected.splitlines()[0]


def test_check_kernel_faults_without_a_cuda_kernel_is_a_no_op():
    student, teacher, labels, _ = bad_dense()
    with pytest.raises(RuntimeError):
        raw_dense(student, teacher, labels)  # the CPU kernel raised; nothing is recorded
    check_kernel_faults()
    check_kernel_faults(wait=False)
    torch.ops.kdplug.check_kernel_faults(True)


# ---- CUDA: the record, its timing, clearing -----------------------------------------------------

@needs_cuda
@pytest.mark.usefixtures("no_fault_left")
@pytest.mark.parametrize("case", ["repeat", "out_of_range", "label"])
def test_cuda_topk_fault_is_raised_at_check_kernel_faults(case):
    student, indices, logprobs, labels, record = bad_topk(case)
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    kw = {} if labels is None else {"labels": labels.cuda(), "alpha": 0.5}
    args = (student.cuda(), indices.cuda(), logprobs.cuda())
    check_kernel_faults()
    with support.deferred_value_checks():
        rows = kd_loss_topk(*args, 2.0, reduction="none", backend="native", **kw)
    torch.cuda.synchronize()
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    with pytest.raises(RuntimeError) as info:
        check_kernel_faults()
    assert str(info.value).splitlines()[0] == expected.splitlines()[0]
    check_kernel_faults()  # cleared by raising
    good = topk_inputs()
    loss = kd_loss_topk(*(t.cuda() for t in good), 2.0, backend="native")
    check_kernel_faults()
    torch.testing.assert_close(loss.cpu(), kd_loss_topk(*good, 2.0, backend="native"))


def test_cpu_twin_topk_faults_raise_at_the_call_and_leave_nothing():
    for case in ("repeat", "out_of_range", "label"):
        student, indices, logprobs, labels, record = bad_topk(case)
        alpha = 1.0 if labels is None else 0.5
        expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
        assert cpu_kernel_error(lambda: raw_topk(student, indices, logprobs, labels,
                                                 alpha)) == expected
        check_kernel_faults()
        good = topk_inputs()
        assert torch.isfinite(kd_loss_topk(*good, 2.0, backend="native"))


@needs_cuda
@pytest.mark.usefixtures("no_fault_left")
def test_cuda_dense_label_fault_surfaces_at_a_later_op_call():
    student, teacher, labels, record = bad_dense()
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    s, t, y = student.cuda(), teacher.cuda(), labels.cuda()
    check_kernel_faults()
    with support.deferred_value_checks():
        rows = kd_loss(s, t, 2.0, labels=y, alpha=0.5, reduction="none", backend="native")
        torch.cuda.synchronize()  # the copy behind the launch has arrived
        assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
        with pytest.raises(RuntimeError) as info:  # the next call looks without waiting
            kd_loss(s, t, 2.0, backend="native")
    assert str(info.value).splitlines()[0] == expected.splitlines()[0]
    check_kernel_faults()
    assert torch.isfinite(kd_loss(s, t, 2.0, labels=y.clamp_min(0), alpha=0.5,
                                  backend="native")).item()


def test_cpu_twin_dense_label_fault_raises_at_the_call():
    student, teacher, labels, record = bad_dense()
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    assert cpu_kernel_error(lambda: raw_dense(student, teacher, labels)) == expected
    with support.deferred_value_checks(), pytest.raises(ValueError, match="found -5"):
        kd_loss(student, teacher, 2.0, labels=labels, alpha=0.5, backend="native")
    assert torch.isfinite(kd_loss(student, teacher, 2.0, labels=labels.clamp_min(0), alpha=0.5,
                                  backend="native"))


@needs_cuda
@pytest.mark.usefixtures("no_fault_left")
def test_cuda_fault_under_torch_compile_and_eager_default_checks():
    student, indices, logprobs, _, record = bad_topk("repeat")
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    args = (student.cuda(), indices.cuda(), logprobs.cuda())
    check_kernel_faults()
    loss = compiled_topk(*args)
    assert torch.isnan(loss).item()
    with pytest.raises(RuntimeError) as info:
        check_kernel_faults()
    assert str(info.value).splitlines()[0] == expected.splitlines()[0]
    # outside the deferral a direct user still gets the eager check at the call
    with pytest.raises(ValueError, match="distinct"):
        kd_loss_topk(*args, 2.0, backend="native")


def test_cpu_twin_fault_under_torch_compile_and_eager_default_checks():
    student, indices, logprobs, _, record = bad_topk("repeat")
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    with pytest.raises(RuntimeError) as info:
        compiled_topk(student, indices, logprobs)
    assert str(info.value).splitlines()[0] == expected.splitlines()[0]
    with pytest.raises(ValueError, match="distinct"):
        kd_loss_topk(student, indices, logprobs, 2.0, backend="native")



@pytest.mark.parametrize("case", ["repeat", "out_of_range", "label"])
def test_the_fused_linear_head_leaves_deferred_value_checks_to_the_kernel(monkeypatch, case):
    """fused_linear_kd reads label and top-k values only where checks_values says so (on CUDA
    under the engine's deferral it must not: each read is a device sync per step); then the
    kernel itself rejects the bad row, with its own message."""
    from kdplug.ops import fused_linear_kd

    student, indices, logprobs, labels, record = bad_topk(case)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(student.shape[0], 6, generator=g)
    weight = torch.randn(student.shape[1], 6, generator=g)
    kw = dict(teacher_topk=(indices, logprobs), temperature=2.0, backend="native")
    if labels is not None:
        kw.update(labels=labels, alpha=0.5)
    with pytest.raises(ValueError):  # checked in Python, as kd_loss_topk does
        fused_linear_kd(hidden, weight, **kw)
    asked = []
    monkeypatch.setattr(support, "checks_values",
                        lambda native, device: asked.append((native, device.type)) and False)
    expected = cpu_kernel_error(lambda: torch.ops.kdplug.raise_kernel_fault(record))
    with pytest.raises(RuntimeError) as info:  # no Python read: the kernel raises
        fused_linear_kd(hidden, weight, **kw)
    assert asked == [(True, "cpu")]
    assert str(info.value).splitlines()[0] == expected.splitlines()[0]
