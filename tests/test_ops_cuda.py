"""The CUDA kernel's own paths (warp per row, block per row, rows split across blocks, vector and
scalar loads) against the CPU kernel and the float64 reference. Each case runs on the CPU as well,
where it checks the CPU kernel's matching path (rows split across threads, scalar tails)."""
from __future__ import annotations

import pytest
import torch

from kdplug import _ext
from kdplug.ops import kd_kl_div

from test_ops import assert_grad_close, assert_loss_close, make_logits, reference_grads

pytestmark = pytest.mark.skipif(not _ext.native_status().available,
                                reason="native op not built")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]

# (rows, classes): small C (a warp per row), C not a multiple of the vector width, large C with
# many rows (a block per row), and few rows of a huge C (each row split across blocks/threads).
PATH_SHAPES = [(3000, 10), (257, 33), (41, 1271), (1024, 4096), (130, 32000), (64, 128256),
               (2, 200003)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
def test_kernel_paths_match_reference(device, shape, dtype):
    s, t = make_logits(shape, dtype, device, seed=shape[1])
    t[:, 3::97] = float("-inf")
    mask = (torch.arange(shape[0]) % 7 != 3).to(device)
    student = s.clone().requires_grad_()
    teacher = t.clone().requires_grad_()
    loss = kd_kl_div(student, teacher, 1.3, reduction="none", mask=mask, backend="native")
    grad_out = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)) + 0.5).to(device)
    gs, gt = torch.autograd.grad(loss, (student, teacher), grad_out)
    ref_loss, ref_gs, ref_gt = reference_grads(s.cpu(), t.cpu(), 1.3, "none", mask.cpu(),
                                               grad_out.cpu())
    assert_loss_close(loss, ref_loss, dtype)
    assert_grad_close(gs, ref_gs, dtype)
    assert_grad_close(gt, ref_gt, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(8, 1000), (64, 128256)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_agrees_with_cpu_kernel_and_runs_on_the_current_stream(shape):
    s, t = make_logits(shape, torch.float32, "cpu")
    args = (2.0, 0, 0.5, None, 1.0, -100, None, 2, None, True, True)
    cpu = torch.ops.kdplug.kd_loss_fwd(s, t, *args)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cuda = torch.ops.kdplug.kd_loss_fwd(s.cuda(), t.cuda(), *args)
    stream.synchronize()
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_opcheck_and_compile():
    s, t = make_logits((16, 1000), torch.float32, "cuda")
    torch.library.opcheck(torch.ops.kdplug.kd_loss_fwd.default,
                          (s.clone().requires_grad_(), t, 2.0, 0, 0.5, None, 1.0, -100, None, 2,
                           None, True, False))
    fn = torch.compile(lambda a, b: kd_kl_div(a, b, 2.0), fullgraph=True)
    student = s.clone().requires_grad_()
    fn(student, t).backward()
    _, ref_gs, _ = reference_grads(s.cpu(), t.cpu(), 2.0, "batchmean", None, torch.tensor(1.0))
    assert_grad_close(student.grad, ref_gs, torch.float32)
