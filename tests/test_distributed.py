"""The same command under `torchrun --nproc_per_node=2` (gloo on CPU) matches one process.

The models here have no BatchNorm (whose batch statistics are per process by design), so two
processes splitting each global batch compute the single process's gradients up to float
rounding: the runs must agree closely, not just roughly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PLUGIN = '''
"""Test plugin: BatchNorm-free MLPs and generated data, installed as a real distribution."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdplug
from kdplug.data import DataSplits


def mlp(hidden, in_features=64, num_classes=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def data(n=320):
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 64, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, 64, generator=g)
    return DataSplits(train=TensorDataset(x[:256], y[:256]), test=TensorDataset(x[256:], y[256:]),
                      num_classes=4, input_shape=(64,),
                      model_options={"in_features": 64, "num_classes": 4})


@kdplug.hookimpl
def register_teachers(register):
    register("ddp-mlp-teacher", lambda in_features=64, num_classes=4: mlp(128, in_features,
                                                                           num_classes))


@kdplug.hookimpl
def register_students(register):
    register("ddp-mlp-student", lambda in_features=64, num_classes=4: mlp(16, in_features,
                                                                          num_classes))


@kdplug.hookimpl
def register_datasets(register):
    register("ddp-generated", data)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_distribution):
    site = tmp_path_factory.mktemp("site")
    make_distribution(site, "kdplug-ddp-test", "0.1", {"kdplug_ddp_test": PLUGIN},
                      {"ddp-test": "kdplug_ddp_test"})
    return site


def run(args, site, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH"))
                                         if p)}
    env.pop("KDPLUG_LOAD_PLUGINS", None)
    env.pop("KDPLUG_DISABLE_PLUGINS", None)
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdplug"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, site):
    command = ["distill", "--teacher", "ddp-mlp-teacher", "--student", "ddp-mlp-student",
               "--data", "ddp-generated", "--epochs", "2", "--teacher-epochs", "2",
               "--batch-size", "32", "--lr", "0.01", "--baseline", "--device", "cpu", "--quiet"]
    one = run(["-m", "kdplug", *command, "--out", str(tmp_path / "one")], site)
    two = run([*TORCHRUN, *command, "--out", str(tmp_path / "two")], site)
    assert one.stdout.count("student (distilled)") == 1
    assert two.stdout.count("student (distilled)") == 1  # only rank 0 prints
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    ddp = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (single["world_size"], ddp["world_size"]) == (1, 2)
    for phase in ("teacher", "student", "scratch"):
        assert ddp[phase]["accuracy"] == pytest.approx(single[phase]["accuracy"], abs=1 / 64)
        assert ddp[phase]["loss"] == pytest.approx(single[phase]["loss"], rel=1e-3, abs=1e-4)
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6  # written once, by rank 0
    for line_one, line_two in zip((tmp_path / "one" / "metrics.jsonl").read_text().splitlines(),
                                  lines):
        a, b = json.loads(line_one), json.loads(line_two)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["test_samples"] == a["test_samples"] == 64  # every test item counted once
    assert (tmp_path / "two" / "checkpoints" / "student.pt").is_file()


RESTARTED = '''
import os, signal, sys
import torch
from torch import nn
from torch.utils.data import TensorDataset
import kdplug
from kdplug.data import DataSplits


def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(320, 8, generator=g), torch.randint(0, 3, (320,), generator=g)
    return DataSplits(train=TensorDataset(x[:256], y[:256]), test=TensorDataset(x[256:], y[256:]),
                      num_classes=3, input_shape=(8,))


def mlp(hidden, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))


class KillOnce:
    """Rank 1 dies by SIGKILL mid-epoch in the first attempt only."""

    def on_step(self, phase, epoch, step, loss):
        if ((phase, epoch, step) == ("student", 2, 5) and os.environ["RANK"] == "1"
                and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"):
            os.kill(os.getpid(), signal.SIGKILL)


RUN = dict(loss="kd+ce", epochs=2, teacher_epochs=0, lr=0.01, seed=2, checkpoint_every=1)

if __name__ == "__main__":
    kdplug.distill(teacher=mlp(32, 1), student=mlp(8, 2), data=data(), **RUN, batch_size=32,
                   grad_accum_steps=2, device="cpu", out=sys.argv[1], resume="auto",
                   callbacks=[KillOnce()])
'''


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resume_auto_finishes_the_run(tmp_path):
    """2 processes (gloo), micro-batches of 16 per process, 2 per optimizer step (DDP's no_sync
    on the first): rank 1 is SIGKILLed mid-epoch, torchrun restarts the group, --resume auto
    continues from the last checkpoint, and the run ends as one process with batches of 64."""
    import importlib.util

    import torch

    from kdplug.engine import distill
    from kdplug.engine.checkpoint import load_checkpoint

    script = tmp_path / "restarted.py"
    script.write_text(RESTARTED)
    out = tmp_path / "run"
    # a restarted group must not read the previous group's addresses from torchrun's shared
    # store (pytorch/pytorch#135712): one store per attempt
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "--max-restarts=1", str(script), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "failed (exitcode: -9) local_rank: 1" in proc.stderr  # killed, then restarted
    assert "student: resuming at epoch 2, step 4 of 8" in proc.stderr  # the last checkpoint
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    saved = load_checkpoint(out / "checkpoints" / "student.pt")
    assert saved["done"] and len(saved["history"]) == 2

    spec = importlib.util.spec_from_file_location("restarted", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = distill(teacher=module.mlp(32, 1), student=module.mlp(8, 2), data=module.data(),
                         **module.RUN, batch_size=64, device="cpu", quiet=True,
                         out=str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(saved["history"], single.student.history):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
        assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1 / 64)
    for key, value in single.student.model.state_dict().items():
        torch.testing.assert_close(saved["model"][key], value, rtol=1e-4, atol=1e-5)


SIGNALLED = '''
import os, signal, sys
import kdplug
from kdplug.engine.interrupt import RunInterrupted
from restarted import RUN, data, mlp


class SigtermRank0:
    def on_step(self, phase, epoch, step, loss):
        if (phase, epoch, step) == ("student", 1, 3) and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGTERM)


try:
    kdplug.distill(teacher=mlp(32, 1), student=mlp(8, 2), data=data(), **RUN, batch_size=32,
                   device="cpu", out=sys.argv[1], callbacks=[SigtermRank0()])
except RunInterrupted as exc:
    print(f"rank {os.environ['RANK']}: {exc}", flush=True)
    raise SystemExit(exc.exit_status)
'''


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """Rank 0 alone gets SIGTERM after step 3 of 8: the agreement started at optimizer step 4
    carries it, the epoch's end reads it, and both processes stop there and write one checkpoint
    together."""
    from kdplug.engine.checkpoint import load_checkpoint

    (tmp_path / "restarted.py").write_text(RESTARTED)
    (tmp_path / "signalled.py").write_text(SIGNALLED)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(tmp_path / "signalled.py"), str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):  # rank 1 stops with rank 0's signal
        assert f"rank {rank}: Interrupted by SIGTERM: the student phase stopped after epoch 1 " \
               "of 2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    saved = load_checkpoint(out / "checkpoints" / "student.pt")
    assert (saved["epoch"], saved["step"], len(saved["history"]), len(saved["rng"])) == \
        (1, 0, 1, 2)
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_torchrun_lm_with_the_fused_linear_head_matches_the_logits_path(tmp_path, site):
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(20))
                                  for i in range(24)), encoding="utf-8")
    tiny = ["num_layers=1", "d_model=16", "num_heads=2"]
    command = ["distill", "--teacher", "transformer-lm-teacher", "--student",
               "transformer-lm-student", "--data", f"text:{corpus}", "--data-option",
               "seq_len=24", "--epochs", "1", "--teacher-epochs", "1", "--batch-size", "8",
               "--lr", "0.003", "--device", "cpu", "--quiet"]
    for option in tiny:
        command += ["--teacher-option", option, "--student-option", option]
    reports = {}
    for mode in ("on", "off"):
        run([*TORCHRUN, *command, "--loss-option", f"fused_linear={mode}",
             "--out", str(tmp_path / mode)], site)
        reports[mode] = json.loads((tmp_path / mode / "report.json").read_text())
    assert reports["on"]["world_size"] == 2
    assert reports["on"]["student"]["loss"] == pytest.approx(reports["off"]["student"]["loss"],
                                                             rel=1e-4)
