"""A teacher cache written and read under `torchrun --nproc_per_node=2` (gloo on CPU).

Each process writes the chunks it owns (chunk u by process u mod 2); the cache is byte for byte
the one a single process writes at the same thread count (same chunks, same batches, every
process at OMP_NUM_THREADS=1 here), and a two-process distillation from it matches a one-process
distillation from it.
"""
from __future__ import annotations

import json

import pytest

# The same test plugin (generated data, BatchNorm-free MLPs, installed as a real distribution),
# the same subprocess runner and torchrun command as the distributed-training tests.
from test_distributed import TORCHRUN, run, site  # noqa: F401  (site is a fixture)


@pytest.mark.slow
def test_torchrun_writes_its_shards_and_reads_them(tmp_path, site):
    write = ["cache-teacher", "--teacher", "ddp-mlp-teacher", "--data", "ddp-generated", "--top-k", "3",
             "--chunk-size", "64", "--batch-size", "16", "--device", "cpu", "--quiet"]
    run(["-m", "kdplug", *write, "--out", str(tmp_path / "one")], site)
    two = run([*TORCHRUN, *write, "--out", str(tmp_path / "two")], site)
    assert two.stdout.count("256 samples, top-3") == 1  # only rank 0 prints
    single = json.loads((tmp_path / "one" / "manifest.json").read_text())
    sharded = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert sharded["writer"]["world_size"] == 2
    assert single["writer"]["threads"] == sharded["writer"]["threads"] == 1  # the condition
    assert [c["rank"] for c in sharded["chunks"]] == [0, 1, 0, 1]  # chunk u by rank u mod 2
    assert len(single["chunks"]) == len(sharded["chunks"]) == 4
    for a, b in zip(single["chunks"], sharded["chunks"]):
        assert {k: f["blake2b"] for k, f in a["files"].items()} == \
               {k: f["blake2b"] for k, f in b["files"].items()}
    assert sharded["teacher_eval"]["accuracy"] == single["teacher_eval"]["accuracy"]

    learn = ["distill", "--student", "ddp-mlp-student", "--data", "ddp-generated", "--epochs", "2",
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
