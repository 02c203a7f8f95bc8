"""The CPU op's reuse of large gradient buffers: one buffer, bounded, and released on request
(issue #13, item 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdplug import _ext
from kdplug.ops import kd_loss, release_buffers

needs_native = pytest.mark.skipif(not _ext.native_status().available,
                                  reason=f"native op missing: {_ext.native_status().reason}")
ROWS, CLASSES = 1100, 4000  # a float32 gradient of 17.6 MB: above the 16 MiB where reuse starts
GRAD_BYTES = ROWS * CLASSES * 4


def one_step():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(ROWS, CLASSES, generator=g).requires_grad_()
    teacher = torch.randn(ROWS, CLASSES, generator=g)
    kd_loss(student, teacher, 2.0, backend="native").backward()
    return student.grad.data_ptr()


@needs_native
def test_the_kept_buffer_is_reused_then_released():
    release_buffers()
    first = one_step()  # the step is over: nobody holds its gradient any more
    assert one_step() == first  # the same memory, handed out again
    assert release_buffers() >= GRAD_BYTES
    assert release_buffers() == 0  # nothing kept any more


def _released_after_a_step(env: dict) -> int:
    code = ("import json, torch, test_grad_buffers as t; from kdplug.ops import release_buffers;"
            "t.one_step(); print(json.dumps(release_buffers()))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         cwd=os.path.dirname(__file__), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_native
def test_gradients_above_the_bound_or_with_reuse_off_are_never_kept():
    assert _released_after_a_step({"KDPLUG_CPU_GRAD_CACHE_MAX_MB": "64"}) >= GRAD_BYTES
    assert _released_after_a_step({"KDPLUG_CPU_GRAD_CACHE_MAX_MB": "16"}) == 0  # 16.8 MiB > 16
    assert _released_after_a_step({"KDPLUG_CPU_GRAD_CACHE": "0"}) == 0


def test_release_without_the_op_loaded_is_a_no_op(monkeypatch):
    monkeypatch.setattr(_ext, "_status", None)
    assert release_buffers() == 0
