"""SIGTERM/SIGINT during a run: the step finishes, a checkpoint is written, status.json says
`interrupted`, the exit status is 128 + the signal; `--resume auto` then ends with the metrics and
weights of an uninterrupted run. A second signal stops at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kdplug
from kdplug.cli import cli
from kdplug.engine import distill
from kdplug.engine.checkpoint import load_checkpoint
from kdplug.engine.config import resolve_config
from kdplug.engine.interrupt import RunInterrupted
from run_helpers import without_timing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: A small run from ready objects, defined once for this process and the subprocesses.
SETUP = textwrap.dedent("""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from kdplug.data import DataSplits

    def data():
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(288, 8, generator=g), torch.randint(0, 3, (288,), generator=g)
        return DataSplits(train=TensorDataset(x[:256], y[:256]),
                          test=TensorDataset(x[256:], y[256:]), num_classes=3, input_shape=(8,))

    def mlp(hidden, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, hidden), nn.Dropout(0.1), nn.ReLU(),
                             nn.Linear(hidden, 3))

    RUN = dict(epochs=3, teacher_epochs=2, batch_size=32, quiet=True, seed=4, lr=0.01)

    def objects():
        return dict(teacher=mlp(32, 1), student=mlp(8, 2), data=data())
""")
SCOPE: dict = {}
exec(SETUP, SCOPE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    return distill(**SCOPE["objects"](), **SCOPE["RUN"],
                   out=str(tmp_path_factory.mktemp("reference")))


def signalled_run(out: Path, at, signals=1):
    """The run in a subprocess that signals itself (a real SIGTERM through the real handler)
    after the given (phase, epoch, step)."""
    code = SETUP + textwrap.dedent(f"""
        import os, signal, kdplug
        from kdplug.engine.interrupt import RunInterrupted
        torch.set_num_threads(1)

        class Signal:
            def on_step(self, phase, epoch, step, loss):
                if (phase, epoch, step) == {at!r}:
                    for _ in range({signals}):
                        os.kill(os.getpid(), signal.SIGTERM)

        try:
            kdplug.distill(**objects(), **RUN, out={str(out)!r}, callbacks=[Signal()])
        except RunInterrupted as exc:
            print(exc)
            raise SystemExit(exc.exit_status)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigterm_checkpoints_the_step_and_resume_auto_ends_as_if_never_stopped(tmp_path,
                                                                              reference):
    proc = signalled_run(tmp_path, ("student", 2, 3))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGTERM received: finishing the current step" in proc.stderr
    assert "Interrupted by SIGTERM: the student phase stopped after step 3 of 8 in epoch 2" \
        in proc.stdout and "--resume auto" in proc.stdout
    saved = load_checkpoint(tmp_path / "checkpoints" / "student.pt")
    assert (saved["epoch"], saved["step"], saved["done"]) == (1, 3, False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and "student.pt" in status["detail"]
    assert not (tmp_path / "report.json").exists()

    resumed = distill(**SCOPE["objects"](), **SCOPE["RUN"], out=str(tmp_path), resume="auto")
    for phase in ("teacher", "student"):
        got, want = getattr(resumed, phase), getattr(reference, phase)
        assert without_timing(got.history) == without_timing(want.history), phase
        for key, value in want.model.state_dict().items():
            assert torch.equal(got.model.state_dict()[key], value), (phase, key)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"


def test_a_signal_in_the_last_step_of_an_epoch_stops_after_its_evaluation(tmp_path):
    proc = signalled_run(tmp_path, ("teacher", 1, 8))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "the teacher phase stopped after epoch 1 of 2" in proc.stdout
    saved = load_checkpoint(tmp_path / "checkpoints" / "teacher.pt")
    assert (saved["epoch"], saved["step"], len(saved["history"])) == (1, 0, 1)
    assert not (tmp_path / "checkpoints" / "student.pt").exists()


def test_a_signal_in_a_phases_last_step_stops_before_the_next_phase(tmp_path):
    proc = signalled_run(tmp_path, ("teacher", 2, 8))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "the student phase stopped before its first step" in proc.stdout
    assert load_checkpoint(tmp_path / "checkpoints" / "teacher.pt")["done"]
    assert not (tmp_path / "checkpoints" / "student.pt").exists()


def test_a_second_signal_stops_at_once(tmp_path):
    proc = signalled_run(tmp_path, ("student", 1, 2), signals=2)
    assert proc.returncode == -signal.SIGTERM, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "running"
    assert not (tmp_path / "checkpoints" / "student.pt").exists()  # no step finished after it


def test_ctrl_c_on_the_cli_saves_says_how_to_resume_and_exits_130(tmp_path):
    """SIGINT from outside, to a real `kdplug distill` (digits), once training has begun."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdplug", "distill", "--teacher", "cnn-teacher", "--student",
         "cnn-student", "--data", "digits", "--data-option", "train_size=128", "--epochs", "200",
         "--teacher-epochs", "0", "--batch-size", "16", "--device", "cpu", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # an epoch has ended: training is on
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Aborted!" not in stderr
    assert "Interrupted by SIGINT: the student phase stopped" in stderr
    assert "--resume auto" in stderr and str(out / "checkpoints" / "student.pt") in stderr
    assert load_checkpoint(out / "checkpoints" / "student.pt")["identity"]["epochs"] == 200
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"


def test_resume_auto_starts_fresh_where_there_is_no_checkpoint_and_resume_needs_one(tmp_path):
    fresh = distill(**SCOPE["objects"](), **{**SCOPE["RUN"], "epochs": 1, "teacher_epochs": 0},
                    out=str(tmp_path / "a"), resume="auto")
    assert len(fresh.student.history) == 1
    with pytest.raises(kdplug.KdplugError, match=r"--resume: .*b holds no checkpoint to "
                                                 r"continue; --resume auto starts a fresh run"):
        distill(**SCOPE["objects"](), **SCOPE["RUN"], out=str(tmp_path / "b"), resume=True)
    assert not (tmp_path / "b").exists()


def test_resume_takes_true_false_and_auto_from_the_cli_and_toml(tmp_path):
    command = cli.commands["distill"]
    for args, want in ((["--resume"], "true"), (["--resume", "auto"], "auto"),
                       (["--resume", "--quiet"], "true"), ([], None)):
        assert command.make_context("distill", list(args)).params["resume"] == want
    assert resolve_config(resume="true").resume is True
    assert resolve_config(resume="auto").resume == "auto"
    toml = tmp_path / "run.toml"
    toml.write_text('resume = "auto"\nout = "x"\n')
    assert resolve_config(toml).resume == "auto"
    with pytest.raises(kdplug.KdplugError, match=r"resume.*expected true, false or one of true, "
                                                 r"auto, false, got 'maybe'"):
        toml.write_text('resume = "maybe"\n')
        resolve_config(toml)


def test_run_interrupted_exit_status():
    assert RunInterrupted("x", signal.SIGINT).exit_status == 130
    assert RunInterrupted("x", signal.SIGTERM).exit_status == 143
