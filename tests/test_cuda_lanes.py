"""The CUDA kd_loss_fwd kernel's thread layouts, run lane by lane on the host (issue #17 item 14).

cuda_lane_sim.cpp compiles csrc/cuda/kd_loss_thread.cuh (the kernel's per-thread code, unchanged)
and plan_kd_loss_fwd with the host C++ compiler, replays kd_loss_kernel.cu's butterflies and block
merges lane by lane, and writes each row's loss and gradients; they are checked here against the
float64 reference. This covers the group, block and split layouts without a GPU: misaligned row
starts, scalar heads and tails, −inf teacher stretches, chunk boundaries and the merge order.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdplug.ops import kd_loss_reference

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cuda_lane_sim.cpp"
FAULT_BYTES = 6 * 8  # the fault record at the end of the output (kd_faults.h)
CSRC = HERE.parent / "csrc"
CUDA_HEADERS = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")

DIVERGENCES = ["kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]  # kd_math.h's codes
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATHS = {"auto": 0, "group": 1, "block": 2, "split": 3}
SMS = 132  # an H100's SM count, for the plan's automatic choice


def _cuda_include_candidates():
    from torch.utils import cpp_extension
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a link: torch then guesses /usr/local
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    homes += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    dirs = [os.path.join(h, "include") for h in homes if h]
    try:  # the CUDA wheels torch depends on (nvidia/cu13/include, nvidia/cuda_runtime/include, ...)
        import nvidia
        dirs += sorted(glob.glob(os.path.join(next(iter(nvidia.__path__)), "*", "include")))
    except (ImportError, StopIteration):
        pass
    return dirs


def cuda_include_dir():
    """A folder with the CUDA headers the thread code includes, or None."""
    for d in _cuda_include_candidates():
        if all(os.path.exists(os.path.join(d, h)) for h in CUDA_HEADERS):
            return d
    return None


@pytest.fixture(scope="session")
def lane_sim(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    include = cuda_include_dir()
    if compiler is None:
        pytest.skip("no host C++ compiler (g++ or $CXX) to build the lane simulation")
    if include is None:
        pytest.skip(f"no CUDA headers ({', '.join(CUDA_HEADERS)}) under $CUDA_HOME/include, "
                    "/usr/local/cuda*/include or the nvidia wheels")
    exe = tmp_path_factory.mktemp("lane_sim") / "cuda_lane_sim"
    cmd = [compiler, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", f"-I{include}",
           str(SOURCE), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr}"
    return exe


def run_lanes(exe, tmp_path, s, t, *, temperature, divergence="kl", beta=0.5, alpha=1.0,
              labels=None, mask=None, path="auto", splits=0, base=0, teacher_grad=True):
    """Runs the simulated kernel on s, t (float32 values exactly representable in the dtype);
    returns the plan (path, threads, group, splits, chunk) and float64 loss, grad_s, grad_t."""
    rows, cols = s.shape
    dtype = s.dtype
    inputs = tmp_path / "in.bin"
    output = tmp_path / "out.bin"
    with open(inputs, "wb") as f:
        f.write(s.float().numpy().tobytes())
        f.write(t.float().numpy().tobytes())
        f.write((labels if labels is not None else torch.full((rows,), -100)).numpy().tobytes())
        f.write((mask if mask is not None else torch.ones(rows, dtype=torch.bool))
                .to(torch.uint8).numpy().tobytes())
    flags = (labels is not None) | (mask is not None) << 1 | teacher_grad << 2
    args = [DTYPES[dtype], rows, cols, base, DIVERGENCES.index(divergence), repr(temperature),
            repr(beta), repr(alpha), PATHS[path], splits, SMS, flags, inputs, output]
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    assert done.returncode != 3, "a write landed outside the arrays"
    assert done.returncode != 4, "a segment misses part of its range or has misaligned vectors"
    assert done.returncode == 0, done.stderr
    raw = output.read_bytes()
    plan = tuple(np.frombuffer(raw[:40], dtype=np.int64).tolist())
    values = np.frombuffer(raw[40:-FAULT_BYTES], dtype=np.float32)
    values = torch.from_numpy(values.copy()).double()
    n = rows * cols
    grad_s = values[rows:rows + n].view(rows, cols)
    grad_t = values[rows + n:].view(rows, cols)
    return plan, values[:rows], grad_s, grad_t


def reference(s, t, temperature, divergence, beta, alpha, labels, mask):
    """float64 per-row loss and the gradients of their sum (the kernel's gradients at scale 1)."""
    student = s.double().requires_grad_()
    teacher = t.double().requires_grad_()
    loss = kd_loss_reference(student, teacher, temperature, divergence=divergence, beta=beta,
                             labels=labels, alpha=alpha if labels is not None else 1.0,
                             reduction="none", mask=mask)
    gs, gt = torch.autograd.grad(loss.sum(), (student, teacher))
    return loss.detach(), gs, gt


def make_inputs(rows, cols, dtype, seed, inf_stretches):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    t = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    if inf_stretches and cols > 1:
        t[0, :min(cols - 1, 5)] = float("-inf")               # the scalar head and first vector
        if cols > 40:
            t[1 % rows, cols // 3:cols // 3 + 37] = float("-inf")  # across vectors mid-row
        keep = cols // 2
        t[2 % rows, :keep] = float("-inf")                      # a one-hot teacher
        t[2 % rows, keep + 1:] = float("-inf")
    return s, t


# (dtype, cols, path, splits, expected plan (path, threads, group, splits, chunk) or None)
GROUP, BLOCK, SPLIT = 1, 2, 3
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
LAYOUTS = [
    (F32, 1, "auto", 0, (GROUP, 256, 8, 1, 0)),
    (F32, 3, "auto", 0, (GROUP, 256, 8, 1, 0)),
    (F32, 31, "auto", 0, (GROUP, 256, 8, 1, 0)),
    (F32, 32, "auto", 0, (GROUP, 256, 8, 1, 0)),
    (F32, 33, "auto", 0, (GROUP, 256, 8, 1, 0)),
    (F32, 1000, "auto", 0, (GROUP, 256, 32, 1, 0)),
    (F32, 1271, "auto", 0, (BLOCK, 256, 0, 1, 0)),
    (F32, 40000, "auto", 0, (SPLIT, 256, 0, 9, 4448)),
    (F32, 33, "block", 0, (BLOCK, 256, 0, 1, 0)),
    (F32, 40000, "block", 0, (BLOCK, 512, 0, 1, 0)),
    (F32, 1271, "group", 0, (GROUP, 256, 32, 1, 0)),
    (F32, 33, "split", 7, (SPLIT, 256, 0, 5, 8)),
    (F32, 1271, "split", 3, (SPLIT, 256, 0, 3, 424)),
    (F32, 3, "split", 7, (SPLIT, 256, 0, 1, 4)),
    (BF16, 33, "auto", 0, (GROUP, 256, 8, 1, 0)),
    (BF16, 1271, "auto", 0, (GROUP, 256, 32, 1, 0)),
    (BF16, 40000, "auto", 0, (SPLIT, 256, 0, 4, 10000)),
    (BF16, 1271, "split", 5, (SPLIT, 256, 0, 5, 256)),
    (F16, 1271, "block", 0, (BLOCK, 256, 0, 1, 0)),
]


def vector_width(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def check(exe, tmp_path, dtype, cols, path, splits, expected_plan, *, base, divergence="kl",
          temperature=1.3, beta=0.5, alpha=1.0, labels=None, mask=None, rows=3,
          inf_stretches=True, seed=0):
    s, t = make_inputs(rows, cols, dtype, seed + cols, inf_stretches)
    plan, loss, gs, gt = run_lanes(exe, tmp_path, s, t, temperature=temperature,
                                   divergence=divergence, beta=beta, alpha=alpha, labels=labels,
                                   mask=mask, path=path, splits=splits, base=base)
    if expected_plan is not None:
        assert plan == expected_plan
    ref_loss, ref_gs, ref_gt = reference(s, t, temperature, divergence, beta, alpha, labels, mask)
    # The loss is float32 arithmetic on the dtype's values; the gradients are stored in the dtype.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5 * temperature ** 2)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for got, want in ((gs, ref_gs), (gt, ref_gt)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale + 1e-30)


@pytest.mark.parametrize("dtype,cols,path,splits,expected_plan", LAYOUTS,
                         ids=[f"{str(d).split('.')[-1]}-{c}-{p}{k or ''}"
                              for d, c, p, k, _ in LAYOUTS])
def test_layouts_match_float64_reference(lane_sim, tmp_path, dtype, cols, path, splits,
                                         expected_plan):
    # Every start offset within a 16-byte vector: with odd C the rows' offsets differ too.
    for base in sorted({0, 1, vector_width(dtype) - 1}):
        check(lane_sim, tmp_path, dtype, cols, path, splits, expected_plan, base=base)


# (divergence, dtype, cols, path, splits): every divergence on the three layouts.
DIVERGENCE_CASES = [
    ("reverse_kl", F32, 33, "auto", 0),
    ("reverse_kl", F32, 1271, "split", 4),
    ("jsd", F32, 1271, "auto", 0),
    ("jsd", BF16, 40000, "auto", 0),
    ("tvd", F32, 31, "auto", 0),
    ("tvd", F32, 1271, "split", 3),
    ("skew_kl", BF16, 1271, "block", 0),
    ("skew_reverse_kl", F32, 1000, "auto", 0),
    ("skew_reverse_kl", F32, 5000, "split", 2),
]


@pytest.mark.parametrize("divergence,dtype,cols,path,splits", DIVERGENCE_CASES,
                         ids=[f"{v}-{str(d).split('.')[-1]}-{c}-{p}{k or ''}"
                              for v, d, c, p, k in DIVERGENCE_CASES])
def test_divergences_match_float64_reference(lane_sim, tmp_path, divergence, dtype, cols, path,
                                             splits):
    # reverse_kl is infinite where the teacher is -inf and the student is not.
    check(lane_sim, tmp_path, dtype, cols, path, splits, None, base=1, divergence=divergence,
          beta=0.3, inf_stretches=divergence != "reverse_kl")


@pytest.mark.parametrize("path,splits", [("group", 0), ("block", 0), ("split", 3)])
def test_hard_labels_and_masked_rows(lane_sim, tmp_path, path, splits):
    # The fused hard-label term at T != 1 (its own log-sum-exp), an ignored label, a masked row.
    labels = torch.tensor([7, -100, 1270, 0])
    mask = torch.tensor([True, True, False, True])
    check(lane_sim, tmp_path, torch.float32, 1271, path, splits, None, base=2, temperature=2.0,
          alpha=0.6, labels=labels, mask=mask, rows=4)


def fault_record(tmp_path):
    """The fault record of the last run_lanes: (code, op, row, value, cols, ignore_index)."""
    raw = (tmp_path / "out.bin").read_bytes()
    return tuple(np.frombuffer(raw[-FAULT_BYTES:], dtype=np.int64).tolist())


# kd_faults.h: kFaultLabelOutOfRange, kFaultOpKdLoss
LABEL_OUT_OF_RANGE, OP_KD_LOSS = 3, 0


@pytest.mark.parametrize("path,splits", [("group", 0), ("block", 0), ("split", 3)])
def test_out_of_range_label_makes_its_row_nan_and_is_recorded(lane_sim, tmp_path, path, splits):
    s, t = make_inputs(3, 40, torch.float32, 5, inf_stretches=False)
    _, loss, gs, gt = run_lanes(lane_sim, tmp_path, s, t, temperature=1.0, path=path,
                                splits=splits, labels=torch.tensor([3, 40, -7]), alpha=0.5)
    assert torch.isfinite(loss[0]) and torch.isfinite(gs[0]).all() and torch.isfinite(gt[0]).all()
    for row in (1, 2):
        assert torch.isnan(loss[row]) and torch.isnan(gs[row]).all()
        assert torch.isnan(gt[row]).all()
    # one record, whole: the first fault wins (which row comes first is the layout's order)
    assert fault_record(tmp_path) in {(LABEL_OUT_OF_RANGE, OP_KD_LOSS, 1, 40, 40, -100),
                                      (LABEL_OUT_OF_RANGE, OP_KD_LOSS, 2, -7, 40, -100)}


def test_good_labels_record_no_fault(lane_sim, tmp_path):
    s, t = make_inputs(2, 40, torch.float32, 5, inf_stretches=False)
    run_lanes(lane_sim, tmp_path, s, t, temperature=2.0, labels=torch.tensor([3, -100]),
              alpha=0.5)
    assert fault_record(tmp_path)[0] == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
