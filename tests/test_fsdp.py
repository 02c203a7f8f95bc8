"""--strategy fsdp: FSDP2 across 2 CPU processes (gloo) ends where one process ends, resumes from
its shards exactly (on 2 processes) and on 1 process, and exports a plain student.

Two torchrun launches (tests/fsdp_worker.py runs several jobs in one process group): the LM pair
(a live teacher, sharded for inference) and the CNN pair without BatchNorm (norm="none", whose
outputs do not depend on how a batch is split) learning from a teacher cache. The rest runs in
this process: the shard units, the errors, and FSDP on a process group of one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kdplug
from kdplug.engine import distill
from run_helpers import metrics_records, write_corpus

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

LM = dict(teacher="transformer-lm-teacher", student="transformer-lm-student",
          teacher_options=dict(num_layers=2, d_model=32, num_heads=2),
          student_options=dict(num_layers=2, d_model=16, num_heads=2),
          data_options={"seq_len": 32}, loss="kd+ce", temperature=2.0, alpha=0.5, epochs=2,
          teacher_epochs=0, batch_size=8, eval_batch_size=3, checkpoint_every=5, seed=1,
          device="cpu", quiet=True)
LM_CRASH = ["student", 2, 7]  # global step 19: the last checkpoint is step 15 (epoch 2, step 3)

CNN = dict(student="cnn-student", data="digits", student_options={"norm": "none"},
           data_options={"train_size": 192}, epochs=2, batch_size=32, lr=3e-3, baseline=True,
           seed=2, device="cpu", quiet=True)
CNN_TEACHER = dict(teacher_options={"norm": "none"}, data_options={"train_size": 192})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers

def torchrun_jobs(jobs, folder: Path):
    path = folder / "jobs.json"
    path.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*TORCHRUN, str(HERE / "fsdp_worker.py"), str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(Path(f"{path}.out").read_text())


def assert_close_records(got, want, rel):
    assert [(r["phase"], r["epoch"]) for r in got] == [(r["phase"], r["epoch"]) for r in want]
    for a, b in zip(got, want):
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=rel), (a["phase"], a["epoch"], key)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=0.02)


def exported(run: Path, tmp: Path, phase="student"):
    out = tmp / f"{run.name}-{phase}.pt"
    kdplug.export_model(run, out, phase=phase)
    return torch.load(out, weights_only=True)


@pytest.fixture
def group_of_one(monkeypatch):
    """The environment torchrun gives a single process: strategy fsdp may run here."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)


# ----------------------------------------------------------------------------- 2 processes

@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """On 2 processes: an uninterrupted run, and a run stopped mid-epoch then resumed; a copy of
    the stopped run is left for a 1-process resume."""
    tmp = tmp_path_factory.mktemp("fsdp-lm")
    data = f"text:{write_corpus(tmp)}"
    options = dict(LM, data=data, strategy="fsdp")
    jobs = [dict(options=dict(options, out=str(tmp / "whole")), probe=str(tmp / "probe.pt")),
            dict(options=dict(options, out=str(tmp / "stopped")), crash_at=LM_CRASH,
                 copy_to=str(tmp / "stopped-copy")),
            dict(options=dict(options, out=str(tmp / "stopped"), resume=True))]
    seen = torchrun_jobs(jobs, tmp)
    reference = distill(**LM, data=data, out=str(tmp / "one-process"), threads=1)
    return tmp, data, seen, reference


@pytest.mark.slow
def test_fsdp_lm_pair_on_two_processes_ends_as_one_process(lm_runs):
    tmp, _, seen, reference = lm_runs
    whole = seen[0]
    assert_close_records(metrics_records(tmp / "whole"), metrics_records(reference.out),
                         rel=2e-4)
    assert whole["student_loss"] == pytest.approx(reference.student.loss, rel=2e-4)
    # each process held half of each model (the teacher too) and the teacher had no gradients
    for phase in ("teacher", "student"):
        facts = whole["facts"][phase]
        assert facts["all_dtensors"] and facts["local"] <= facts["global"] // 2 + 64, facts
    assert not whole["facts"]["teacher"]["any_grad"]
    status = torch.load(tmp / "whole" / "checkpoints" / "student.pt", weights_only=True)
    shards = tmp / "whole" / "checkpoints" / status["shards"]
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp",
                                                        "__1_0.distcp"]
    assert [p.name for p in shards.parent.iterdir()] == [shards.name]  # older saves removed
    assert not (tmp / "whole" / "checkpoints" / "teacher.pt").exists()  # an untrained teacher


@pytest.mark.slow
def test_fsdp_resumes_exactly_from_its_shards(lm_runs):
    tmp, _, seen, _ = lm_runs
    assert seen[1]["interrupted"]
    assert metrics_records(tmp / "stopped") == metrics_records(tmp / "whole")
    a, b = exported(tmp / "stopped", tmp), exported(tmp / "whole", tmp)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(lm_runs):
    tmp, data, _, reference = lm_runs
    copy = tmp / "stopped-copy"
    status = torch.load(copy / "checkpoints" / "student.pt", weights_only=True)
    assert (status["epoch"], status["step"], status["world_size"]) == (1, 3, 2)
    resumed = distill(**LM, data=data, out=str(copy), resume=True, threads=1)
    assert_close_records(metrics_records(copy), metrics_records(reference.out), rel=2e-4)
    assert resumed.student.loss == pytest.approx(reference.student.loss, rel=2e-4)
    # a one-process run writes one-file checkpoints: the shards it resumed from are gone
    assert "shards" not in torch.load(copy / "checkpoints" / "student.pt", weights_only=True)
    assert not (copy / "checkpoints" / "student.shards").exists()


@pytest.mark.slow
def test_the_export_loads_into_a_plain_model_with_identical_outputs(lm_runs, tmp_path):
    tmp, *_ = lm_runs
    out = tmp_path / "student.pt"
    result = kdplug.export_model(tmp / "whole", out)
    assert result.sharded and result.done and out.is_file()
    model = kdplug.create_student("transformer-lm-student", **LM["student_options"],
                                  max_len=LM["data_options"]["seq_len"])
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: every key, every shape
    probe = torch.load(tmp / "probe.pt", weights_only=True)
    with torch.no_grad():
        logits = model.eval()(probe["inputs"]).logits
    assert torch.equal(logits, probe["logits"])


@pytest.mark.slow
def test_fsdp_cnn_pair_from_a_teacher_cache_ends_as_one_process(tmp_path):
    """No teacher at all: the student and the scratch baseline are sharded, the cache teaches."""
    cache = tmp_path / "cache"
    kdplug.cache_teacher("cnn-teacher", "digits", str(cache), quiet=True, **CNN_TEACHER)
    options = dict(CNN, teacher_cache=str(cache))
    seen = torchrun_jobs([dict(options=dict(options, strategy="fsdp",
                                            out=str(tmp_path / "two")))], tmp_path)
    reference = distill(**options, out=str(tmp_path / "one"), threads=1)
    assert_close_records(metrics_records(tmp_path / "two"), metrics_records(reference.out),
                         rel=1e-5)
    facts = seen[0]["facts"]
    assert "teacher" not in facts and facts["student"]["all_dtensors"]
    plain = exported(tmp_path / "one", tmp_path, "scratch")
    sharded = exported(tmp_path / "two", tmp_path, "scratch")
    for key, value in plain.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- one process

def test_fsdp_without_torchrun_is_a_clear_error(monkeypatch, tmp_path):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(kdplug.KdplugError, match=r"strategy 'fsdp' shards the models across the "
                                                 r"processes torchrun starts.*torchrun "
                                                 r"--nproc_per_node=K"):
        distill(**CNN, teacher="cnn-teacher", strategy="fsdp", out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_fsdp_with_fp16_is_refused_before_anything_starts():
    with pytest.raises(kdplug.KdplugError, match=r"amp 'fp16' with strategy 'fsdp'.*use amp bf16"):
        kdplug.DistillConfig(amp="fp16", strategy="fsdp").validate()


class Constant(nn.Module):
    """A teacher without parameters: fixed logits."""

    def forward(self, x, **_):
        return torch.zeros(x.shape[0], 10).index_fill_(1, torch.tensor([3]), 5.0)


def test_a_teacher_with_no_parameters_to_shard_is_named(group_of_one, tmp_path):
    with pytest.raises(kdplug.KdplugError, match=r"the teacher 'Constant' \(Constant\) has no "
                                                 r"parameters to shard.*--strategy ddp"):
        distill(**CNN, teacher=Constant(), teacher_epochs=0, strategy="fsdp",
                out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def lm_batch(vocab=259, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, length + 1), generator=g)
    return {"inputs": ids[:, :-1], "labels": ids[:, 1:]}


def test_fsdp_shards_student_loss_and_a_frozen_teacher_in_bf16(group_of_one, tmp_path):
    """One step on a process group of one: what is sharded, what the optimizer holds, the
    precision FSDP computes in, and a checkpoint that keeps the hint projection."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from kdplug.engine.config import resolve_config
    from kdplug.engine.distributed import setup
    from kdplug.engine.loop import Trainer
    from kdplug.engine.strategies import make_strategy
    from kdplug.engine.strategy import release_gathered

    env = setup("cpu", "fsdp")
    try:
        strategy = make_strategy("fsdp", env, "bf16")
        teacher = kdplug.create_teacher("transformer-lm-teacher", num_layers=2, d_model=32,
                                        num_heads=2, max_len=16)
        student = kdplug.create_student("transformer-lm-student", num_layers=2, d_model=16,
                                        num_heads=2, max_len=16)
        strategy.prepare_model(teacher, "the teacher", inference=True)
        strategy.prepare_model(student, "the student")
        assert all(isinstance(m, FSDPModule) for m in (*student.blocks, student, teacher))
        loss = kdplug.create_loss("kd+ce+hidden", temperature=2.0, alpha=0.5)
        batch = lm_batch()
        with torch.no_grad():  # the dry run makes the hint projection (16 -> 32)
            outs = [m(batch["inputs"], output_hidden_states=True) for m in (student, teacher)]
            loss(*outs, batch)
        for model in (student, teacher):
            release_gathered(model)
        cfg = resolve_config(teacher="t", student="s", data="d", strategy="fsdp", amp="bf16",
                             device="cpu")
        trainer = Trainer(student, loss, cfg=cfg, env=env, lr=1e-3, total_steps=2,
                          teacher=teacher, strategy=strategy)
        seen = []
        student.blocks[0].attn.qkv.register_forward_hook(  # inside the unit's forward
            lambda module, args, out: seen.append(module.weight.dtype))
        value = trainer.train_step(batch)
        assert bool(torch.isfinite(value)) and seen == [torch.bfloat16]
        assert isinstance(loss, FSDPModule)
        trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        assert trained == {id(p) for p in (*student.parameters(), *loss.parameters())}
        assert not any(id(p) in trained for p in teacher.parameters())
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        # after its forward the teacher holds shards only, its root's parameters too; the
        # student's optimizer steps on float32 shards
        assert all(isinstance(p, DTensor) for p in teacher.parameters())
        assert all(isinstance(p, DTensor) and p.dtype == torch.float32
                   for p in (*student.parameters(), *loss.parameters()))
        path = tmp_path / "checkpoints" / "student.pt"
        strategy.save_checkpoint(trainer, {"epoch": 0, "step": 1}, path)
        status = torch.load(path, weights_only=True)
        keys = FileSystemReader(str(path.parent / status["shards"])).read_metadata()
        projection = [k for k in keys.state_dict_metadata if k.startswith("loss.")]
        assert projection and any(k.startswith("optimizer.state.loss.") for k in
                                  keys.state_dict_metadata)
        trainer.release()
    finally:
        env.teardown()


def test_a_one_file_checkpoint_resumes_sharded(group_of_one, tmp_path):
    """A run stopped under one plain process resumes with strategy fsdp (each tensor read whole
    and sharded), and ends where the uninterrupted plain run ends; --overwrite then clears the
    shard folders with the rest."""
    run = dict(CNN, teacher="cnn-teacher", teacher_options={"norm": "none"}, teacher_epochs=1,
               epochs=2, baseline=False, checkpoint_every=4)
    whole = distill(**run, out=str(tmp_path / "whole"))

    class Stop:
        def on_step(self, phase, epoch, step, loss):
            if (phase, epoch, step) == ("student", 2, 2):
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(**run, out=str(tmp_path / "run"), callbacks=[Stop()])
    resumed = distill(**run, out=str(tmp_path / "run"), resume=True, strategy="fsdp")
    assert_close_records(metrics_records(tmp_path / "run"), metrics_records(whole.out), rel=1e-6)
    assert resumed.student.loss == pytest.approx(whole.student.loss, rel=1e-6)
    assert (tmp_path / "run" / "checkpoints" / "student.shards").is_dir()
    distill(**dict(run, epochs=1), out=str(tmp_path / "run"), overwrite=True)
    assert not (tmp_path / "run" / "checkpoints" / "student.shards").exists()


def test_export_errors_name_what_is_wrong(tmp_path, run_kdplug):
    with pytest.raises(kdplug.KdplugError, match=r"holds no checkpoint of the student phase"):
        kdplug.export_model(tmp_path, tmp_path / "x.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(kdplug.KdplugError, match=r"not a checkpoint of a kdplug run"):
        kdplug.export_model(plain, tmp_path / "x.pt")
    proc = run_kdplug("export", str(tmp_path), "--out", str(tmp_path / "x.pt"), "--phase",
                      "teacher")
    assert proc.returncode == 1 and "Error: " in proc.stderr and "teacher phase" in proc.stderr


class OneRank:
    """A process of a group as save_sharded sees it: rank 0 sends, the others receive."""

    def __init__(self, is_main: bool, received=None):
        self.is_main, self.received, self.sent = is_main, received, []

    def broadcast(self, obj):
        self.sent.append(obj)
        return obj if self.is_main else self.received


def test_a_shard_folder_rank_0_cannot_make_stops_every_process(monkeypatch, tmp_path):
    import errno

    from kdplug.engine import sharded_checkpoint

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sharded_checkpoint, "_new_folder", full_disk)
    status = {"epoch": 0, "step": 4}
    rank0 = OneRank(is_main=True)
    with pytest.raises(OSError, match="No space left"):
        sharded_checkpoint.save_sharded({}, status, tmp_path / "student.pt", rank0)
    folder, error = rank0.sent[0]  # the others were told instead of left waiting
    assert folder is None and "student.shards" in error and "No space left" in error
    rank1 = OneRank(is_main=False, received=rank0.sent[0])
    with pytest.raises(kdplug.KdplugError, match=r"rank 0 could not prepare the shard folder.*"
                                                 r"No space left"):
        sharded_checkpoint.save_sharded({}, status, tmp_path / "student.pt", rank1)
