"""The training loop's epoch: no read of the loss per step where a read waits (a GPU, torchrun),
the non-finite check then, evaluation every N epochs, and where an epoch's time goes."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import TensorDataset

import kdplug
from kdplug.data import DataSplits
from kdplug import _op_support
from kdplug.engine import NonFiniteLossError, distill
from kdplug.engine import loop, phases
from kdplug.engine.checkpoint import load_checkpoint
from kdplug.engine.loop import Trainer
from kdplug.engine.meters import EPOCH_PARTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

READS = {"item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy"}


class FloatReads(TorchFunctionMode):
    """Counts reads of floating-point tensors' values (what a device sync would be on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in READS and args and isinstance(args[0], torch.Tensor)
                and args[0].is_floating_point()):
            self.count += 1
        return func(*args, **(kwargs or {}))


class DeferredReads(Trainer):
    """The Trainer as it runs on a GPU or under torchrun: reading the loss is not free."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads_are_free = False


def data(n_train: int) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + 32, 8, generator=g), torch.randint(0, 3, (n_train + 32,),
                                                                     generator=g)
    return DataSplits(train=TensorDataset(x[:n_train], y[:n_train]),
                      test=TensorDataset(x[n_train:], y[n_train:]), num_classes=3,
                      input_shape=(8,))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


RUN = dict(loss="ce", epochs=2, batch_size=16, quiet=True)


def reads_of_a_run(tmp_path, n_train: int, name: str) -> int:
    with FloatReads() as reads:
        distill(student=mlp(), data=data(n_train), **RUN, out=str(tmp_path / name))
    return reads.count


def test_no_read_of_the_loss_per_step_where_reads_wait(tmp_path, monkeypatch):
    # on the CPU in one process each step's loss is read (free there): a bad step is never applied
    assert reads_of_a_run(tmp_path, 96, "free-many") > reads_of_a_run(tmp_path, 32, "free-few")
    monkeypatch.setattr(phases, "Trainer", DeferredReads)
    few, many = reads_of_a_run(tmp_path, 32, "few"), reads_of_a_run(tmp_path, 96, "many")
    assert few == many  # 2 or 6 steps per epoch: the same reads, at the epochs' ends


def test_a_non_finite_loss_is_caught_at_the_next_read_before_any_checkpoint(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(phases, "Trainer", DeferredReads)
    calls = {"n": 0}
    ce = kdplug.create_loss("ce")

    def exploding(student_out, teacher_out, batch):
        calls["n"] += 1
        loss = ce(student_out, teacher_out, batch)
        return loss * float("nan") if calls["n"] == 1 + 4 + 2 else loss  # dry run, epoch 1, 2

    exploding.uses_teacher = False  # a ready loss says so itself: the run needs no teacher
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) in phase 'student' "
                                                 r"epoch 2, within steps 1-2.*last good") as info:
        distill(student=mlp(), data=data(64), loss=exploding, epochs=2, batch_size=16,
                checkpoint_every=3, quiet=True, out=str(tmp_path))
    assert (info.value.phase, info.value.epoch, info.value.step) == ("student", 2, 2)
    kept = load_checkpoint(tmp_path / "checkpoints" / "student.pt")  # step 6 was not saved
    assert (kept["epoch"], kept["step"], kept["done"]) == (1, 0, False)
    assert all(math.isfinite(float(v.float().abs().sum())) for v in kept["model"].values())


def test_eval_every_and_the_time_of_each_part_of_an_epoch(tmp_path, capsys):
    result = distill(student=mlp(), data=data(64), loss="ce", epochs=5, eval_every=2,
                     batch_size=16, out=str(tmp_path))
    history = result.student.history
    assert [("test_accuracy" in r) for r in history] == [False, True, False, True, True]
    assert result.student.accuracy == history[-1]["test_accuracy"]
    for record in history:
        assert all(record[f"{part}_time_s"] >= 0 for part in EPOCH_PARTS)
        assert record["data_time_s"] + record["step_time_s"] <= record["epoch_time_s"] + 1e-3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("test_loss" in line) for line in lines] == [False, True, False, True, True]
    assert (tmp_path / "curves.png").is_file()
    log = capsys.readouterr().err.splitlines()
    epoch_lines = [line for line in log if line.startswith("student  epoch")]
    assert len(epoch_lines) == 5
    assert "test acc" not in epoch_lines[0] and "test acc" in epoch_lines[1]
    assert all("seconds of data" in line and "checkpoint" in line for line in epoch_lines)


@pytest.mark.parametrize("deferring", [False, True])
def test_a_phase_defers_the_ops_value_checks_where_told_and_checks_faults_at_reads(
        tmp_path, monkeypatch, deferring):
    # on the CPU the loop keeps the checks; told it runs on CUDA, it defers them for its steps
    # and asks for the kernels' faults where it reads values (here: each epoch's end)
    monkeypatch.setattr(loop, "defers_value_checks", lambda device: deferring)
    checks = []
    monkeypatch.setattr(loop, "check_kernel_faults", lambda wait=True: checks.append(wait))
    ce = kdplug.create_loss("ce")
    seen = []

    def recording(student_out, teacher_out, batch):
        seen.append(_op_support.checks_values(True, torch.device("cuda")))
        return ce(student_out, teacher_out, batch)

    recording.uses_teacher = False
    distill(student=mlp(), data=data(32), loss=recording, epochs=2, batch_size=16, quiet=True,
            out=str(tmp_path))
    assert seen[-4:] == [not deferring] * 4  # 2 epochs of 2 steps (after a dry run's call)
    assert checks == ([True] * 2 if deferring else [])
    assert _op_support.checks_values(True, torch.device("cuda"))  # nothing deferred after it


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU test: "
                                                          "test_no_read_of_the_loss_per_step...)")
def test_training_steps_on_a_gpu_never_wait_for_it():
    from kdplug.engine.config import DistillConfig
    from kdplug.engine.distributed import DistEnv

    device = torch.device("cuda")
    cfg = DistillConfig(lr=1e-3)
    trainer = Trainer(mlp(), kdplug.create_loss("kd+ce"), cfg=cfg, env=DistEnv(device=device),
                      lr=1e-3, total_steps=100, teacher=mlp())
    assert not trainer.reads_are_free
    g = torch.Generator().manual_seed(0)
    batches = [{"inputs": torch.randn(16, 8, generator=g).to(device),
                "labels": torch.randint(0, 3, (16,), generator=g).to(device)} for _ in range(3)]
    trainer.train_step(batches[0])  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # as a phase runs them on a GPU: the kernels, not reads, check labels and indices
        with _op_support.deferred_value_checks():
            losses = [trainer.train_step(batch) for batch in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(float(loss)) for loss in losses)
    loop.check_kernel_faults()
