"""--resume after an interruption ends with exactly the metrics of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kdplug
from kdplug.engine import distill
from kdplug.engine.checkpoint import load_checkpoint
from run_helpers import CrashAt, Interrupt, metrics_records, without_timing

# digits with random shifts: data order, augmentation and dropout all draw random numbers
RUN = dict(teacher="cnn-teacher", student="cnn-student", data="digits",
           data_options={"train_size": 128, "augment": 1}, student_options={"dropout": 0.2},
           epochs=2, teacher_epochs=2, batch_size=32, baseline=True, quiet=True,
           checkpoint_every=3, seed=3)


class NoTraining:
    def on_step(self, **_):
        raise AssertionError("a finished run trained again on --resume")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess below runs with one thread too: same arithmetic
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return distill(**RUN, out=str(tmp_path_factory.mktemp("reference")))


def assert_same_run(result, reference):
    for phase in ("teacher", "student", "scratch"):
        got, want = getattr(result, phase), getattr(reference, phase)
        assert (got.accuracy, got.loss) == (want.accuracy, want.loss), phase
        assert without_timing(got.history) == without_timing(want.history), phase
        for key, value in want.model.state_dict().items():
            assert torch.equal(got.model.state_dict()[key], value), (phase, key)
    assert metrics_records(result.out) == metrics_records(reference.out)


def test_resume_mid_epoch_after_a_crash(tmp_path, reference):
    with pytest.raises(Interrupt):
        distill(**RUN, out=str(tmp_path), callbacks=[CrashAt("student", 2, 2)])
    saved = load_checkpoint(tmp_path / "checkpoints" / "student.pt")
    assert (saved["epoch"], saved["step"], saved["done"]) == (1, 2, False)  # step 6 = 4 + 2
    assert load_checkpoint(tmp_path / "checkpoints" / "teacher.pt")["done"]
    assert not (tmp_path / "report.json").exists()
    resumed = distill(**RUN, out=str(tmp_path), resume=True)
    assert_same_run(resumed, reference)
    # a finished run resumes to the same report without training
    again = distill(**RUN, out=str(tmp_path), resume=True, callbacks=[NoTraining()])
    assert again.report["student"]["accuracy"] == reference.student.accuracy


def test_resume_after_sigkill(tmp_path, reference):
    """The process is killed (SIGKILL: no cleanup) right after a mid-epoch checkpoint."""
    code = textwrap.dedent(f"""
        import os, signal, torch, kdplug
        torch.set_num_threads(1)

        class Kill:
            def on_step(self, phase, epoch, step, loss):
                if (phase, epoch, step) == ("scratch", 1, 3):
                    os.kill(os.getpid(), signal.SIGKILL)

        kdplug.distill(**{RUN!r}, out={str(tmp_path)!r}, callbacks=[Kill()])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "checkpoints" / "scratch.pt")["step"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no torn temp files left
    resumed = distill(**RUN, out=str(tmp_path), resume=True)
    assert_same_run(resumed, reference)


def test_resume_with_other_settings_names_them(tmp_path):
    small = {**RUN, "epochs": 1, "teacher_epochs": 1, "baseline": False}
    distill(**small, out=str(tmp_path))
    with pytest.raises(kdplug.KdplugError, match=r"--resume: .*teacher.pt was written with other "
                                                 r"settings \(temperature: 4.0 then, 2.0 now\)"):
        distill(**small, out=str(tmp_path), resume=True, temperature=2.0)
