"""A teacher cache written and read under `torchrun --nproc_per_node=2` (gloo on CPU).

Each process writes the chunks it owns (chunk u by process u mod 2); the cache is byte for byte
the one a single process writes (same chunks, same batches), and a two-process distillation from
it matches a one-process distillation from it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PLUGIN = '''
"""Test plugin: BatchNorm-free MLPs and generated data."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdplug
from kdplug.data import DataSplits


def mlp(hidden, in_features=32, num_classes=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def data(n=200):
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(4, 32, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, 32, generator=g)
    return DataSplits(train=TensorDataset(x[:160], y[:160]), test=TensorDataset(x[160:], y[160:]),
                      num_classes=4, input_shape=(32,),
                      model_options={"in_features": 32, "num_classes": 4})


@kdplug.hookimpl
def register_teachers(register):
    register("cddp-teacher", lambda in_features=32, num_classes=4: mlp(64, in_features,
                                                                       num_classes))


@kdplug.hookimpl
def register_students(register):
    register("cddp-student", lambda in_features=32, num_classes=4: mlp(8, in_features,
                                                                       num_classes))


@kdplug.hookimpl
def register_datasets(register):
    register("cddp-data", data)
'''


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_distribution):
    site = tmp_path_factory.mktemp("site")
    make_distribution(site, "kdplug-cache-ddp-test", "0.1", {"kdplug_cache_ddp_test": PLUGIN},
                      {"cache-ddp-test": "kdplug_cache_ddp_test"})
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
def test_torchrun_writes_its_shards_and_reads_them(tmp_path, site):
    write = ["cache-teacher", "--teacher", "cddp-teacher", "--data", "cddp-data", "--top-k", "3",
             "--chunk-size", "32", "--batch-size", "16", "--device", "cpu", "--quiet"]
    run(["-m", "kdplug", *write, "--out", str(tmp_path / "one")], site)
    two = run([*TORCHRUN, *write, "--out", str(tmp_path / "two")], site)
    assert two.stdout.count("160 samples, top-3") == 1  # only rank 0 prints
    single = json.loads((tmp_path / "one" / "manifest.json").read_text())
    sharded = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert sharded["writer"]["world_size"] == 2
    assert [c["rank"] for c in sharded["chunks"]] == [0, 1, 0, 1, 0]  # chunk u by rank u mod 2
    assert len(single["chunks"]) == len(sharded["chunks"]) == 5
    for a, b in zip(single["chunks"], sharded["chunks"]):
        assert {k: f["blake2b"] for k, f in a["files"].items()} == \
               {k: f["blake2b"] for k, f in b["files"].items()}
    assert sharded["teacher_eval"]["accuracy"] == single["teacher_eval"]["accuracy"]

    learn = ["distill", "--student", "cddp-student", "--data", "cddp-data", "--epochs", "2",
             "--batch-size", "32", "--lr", "0.01", "--device", "cpu", "--quiet",
             "--teacher-cache", str(tmp_path / "two")]
    run(["-m", "kdplug", *learn, "--out", str(tmp_path / "run-one")], site)
    run([*TORCHRUN, *learn, "--out", str(tmp_path / "run-two")], site)
    one = json.loads((tmp_path / "run-one" / "report.json").read_text())
    ddp = json.loads((tmp_path / "run-two" / "report.json").read_text())
    assert (one["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["student"]["accuracy"] == pytest.approx(one["student"]["accuracy"], abs=1 / 40)
    assert ddp["student"]["loss"] == pytest.approx(one["student"]["loss"], rel=1e-3, abs=1e-4)
    assert ddp["teacher"]["accuracy"] == single["teacher_eval"]["accuracy"]
