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
