"""The native kernels check what a silent wrong answer would come from — top-k indices out of
range or repeated, labels out of range — themselves, so the checks hold under torch.compile,
where the Python checks do not run (issue #13, item 1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdplug import _ext
from kdplug.ops import kd_loss, kd_loss_topk

pytestmark = [pytest.mark.usefixtures("cpu_capability"),
              pytest.mark.skipif(not _ext.native_status().available,
                                 reason="native op not built")]


def topk_inputs(rows=4, classes=20, k=3):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(rows, classes, generator=g)
    logprobs, indices = F.log_softmax(torch.randn(rows, classes, generator=g), -1).topk(k, -1)
    return student, indices, logprobs


def compiled_topk(student, indices, logprobs, **kw):
    torch._dynamo.reset()
    fn = torch.compile(lambda s, i, v: kd_loss_topk(s, i, v, 2.0, backend="native", **kw),
                       fullgraph=True)
    return fn(student, indices, logprobs)


@pytest.mark.parametrize("index, message", [
    (1, r"index 1 repeats in row 2 \(a row's top-k classes must be distinct\)"),
    (20, r"index 20 of row 2 out of range \[0, 20\)"),
    (-3, r"index -3 of row 2 out of range \[0, 20\)"),
])
def test_bad_topk_indices_raise_under_torch_compile(index, message):
    student, indices, logprobs = topk_inputs()
    indices[2, 0], indices[2, 1] = 1, index  # index 1 twice when index == 1
    with pytest.raises(RuntimeError, match=message):
        compiled_topk(student.requires_grad_(), indices, logprobs)


def test_a_masked_row_is_not_checked_and_distinct_rows_pass():
    student, indices, logprobs = topk_inputs()
    indices[2, :] = 5  # padding: never read
    mask = torch.tensor([True, True, False, True])
    loss = compiled_topk(student, indices, logprobs, mask=mask)
    assert torch.isfinite(loss)
    # the same class in different rows is no repeat
    same = torch.arange(3).expand(4, 3).contiguous()
    assert torch.isfinite(compiled_topk(student, same, logprobs))


def test_labels_out_of_range_raise_under_torch_compile():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    labels = torch.tensor([0, 7, -100])
    torch._dynamo.reset()
    fn = torch.compile(lambda s, t, y: kd_loss(s, t, 2.0, labels=y, alpha=0.5, backend="native"),
                       fullgraph=True)
    with pytest.raises(RuntimeError, match=r"label 7 of row 1 is out of range \[0, 7\)"):
        fn(student, teacher, labels)
    student, indices, logprobs = topk_inputs(3, 7)
    with pytest.raises(RuntimeError, match=r"label 7 of row 1 is out of range \[0, 7\)"):
        compiled_topk(student, indices, logprobs, labels=labels, alpha=0.5)
