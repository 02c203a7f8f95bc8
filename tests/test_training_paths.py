"""Training paths beyond the defaults: gradient accumulation, sgd/adam, the linear and constant
schedules with warm-up, bf16 and fp16 autocast on the CPU (fp16 with its grad scaler), gradient
clipping — each runs, and resumes exactly."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdplug
from kdplug.data import DataSplits
from kdplug.engine import distill
from kdplug.engine.checkpoint import load_checkpoint
from kdplug.engine.config import DistillConfig
from kdplug.engine.distributed import DistEnv
from kdplug.engine.loop import Trainer, accumulation_group, optimizer_steps_per_epoch
from kdplug.losses import CrossEntropyLoss
from run_helpers import CrashAt, Interrupt, without_timing

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(n_train: int = 256) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + 64, 8, generator=g), torch.randint(0, 3, (n_train + 64,),
                                                                     generator=g)
    return DataSplits(train=TensorDataset(x[:n_train], y[:n_train]),
                      test=TensorDataset(x[n_train:], y[n_train:]), num_classes=3,
                      input_shape=(8,))


def mlp(hidden: int = 16, seed: int = 0) -> nn.Module:
    """No BatchNorm, no dropout: K micro-batches then compute one batch's gradient."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def objects():
    return dict(teacher=mlp(32, 1), student=mlp(8, 2), data=data())


def assert_same_weights(a: nn.Module, b: nn.Module, exact: bool = True) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(x, y), key
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------- accumulation

def test_accumulation_groups_and_steps():
    assert optimizer_steps_per_epoch(8, 4) == 2 and optimizer_steps_per_epoch(9, 4) == 3
    assert [len(accumulation_group(s, 9, 4)) for s in range(9)] == [4] * 8 + [1]
    assert accumulation_group(5, 9, 4) == range(4, 8)


def test_four_micro_batches_of_16_train_as_one_batch_of_64(tmp_path):
    run = dict(epochs=2, teacher_epochs=0, seed=3, quiet=True, loss="kd+ce", lr=0.01,
               scheduler="linear", warmup_steps=2)
    whole = distill(**objects(), **run, batch_size=64, out=str(tmp_path / "whole"))
    micro = distill(**objects(), **run, batch_size=16, grad_accum_steps=4,
                    out=str(tmp_path / "micro"))
    assert_same_weights(whole.student.model, micro.student.model, exact=False)
    for a, b in zip(whole.student.history, micro.student.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["lr"] == pytest.approx(a["lr"])  # the schedule counts optimizer steps
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)


def test_accumulation_checkpoints_count_optimizer_steps_and_resume_exactly(tmp_path):
    run = dict(epochs=2, teacher_epochs=1, seed=3, quiet=True, batch_size=16,
               grad_accum_steps=3, checkpoint_every=2)  # 16 batches: groups of 3, 3, 3, 3, 3, 1
    reference = distill(**objects(), **run, out=str(tmp_path / "ref"))
    with pytest.raises(Interrupt):
        distill(**objects(), **run, out=str(tmp_path / "run"),
                callbacks=[CrashAt("student", 2, 14)])
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "student.pt")
    # optimizer steps 2 and 4 of epoch 2 end after batches 6 and 12: the last one is kept
    assert (saved["epoch"], saved["step"]) == (1, 12)
    assert saved["state"]["scheduler"]["last_epoch"] == 6 + 4
    resumed = distill(**objects(), **run, out=str(tmp_path / "run"), resume=True)
    assert without_timing(resumed.student.history) == without_timing(reference.student.history)
    assert_same_weights(resumed.student.model, reference.student.model)
    with pytest.raises(kdplug.KdplugError, match=r"grad_accum_steps: 3 then, 2 now"):
        distill(**objects(), **{**run, "grad_accum_steps": 2}, out=str(tmp_path / "run"),
                resume=True)


# ----------------------------------------------------------------------------- each path resumes

PATHS = {
    "sgd, constant with warm-up": dict(optimizer="sgd", scheduler="constant", warmup_steps=5),
    "adam, linear with warm-up": dict(optimizer="adam", scheduler="linear", warmup_steps=5),
    "adamw, bf16 autocast": dict(amp="bf16"),
    "adamw, fp16 autocast and grad scaler": dict(amp="fp16"),
    "sgd, grad clip": dict(optimizer="sgd", grad_clip=0.05, lr=0.1),
}


@pytest.mark.parametrize("options", list(PATHS.values()), ids=list(PATHS))
def test_each_path_trains_and_resumes_exactly(tmp_path, options):
    run = dict(epochs=2, teacher_epochs=1, seed=5, quiet=True, batch_size=32,
               checkpoint_every=3, **options)
    reference = distill(**objects(), **run, out=str(tmp_path / "ref"))
    with pytest.raises(Interrupt):
        distill(**objects(), **run, out=str(tmp_path / "run"),
                callbacks=[CrashAt("student", 2, 5)])
    resumed = distill(**objects(), **run, out=str(tmp_path / "run"), resume=True)
    assert without_timing(resumed.student.history) == without_timing(reference.student.history)
    assert_same_weights(resumed.student.model, reference.student.model)
    assert all(math.isfinite(r["train_loss"]) for r in reference.student.history)
    untrained = mlp(8, 2)
    assert any(not torch.equal(p, q) for p, q in zip(untrained.parameters(),
                                                      reference.student.model.parameters()))


def test_fp16_training_computes_in_half_precision_with_a_scaler(tmp_path):
    run = dict(epochs=1, teacher_epochs=1, seed=5, quiet=True, batch_size=32,
               checkpoint_every=3)
    half = distill(**objects(), **run, amp="fp16", out=str(tmp_path / "fp16"))
    full = distill(**objects(), **run, out=str(tmp_path / "fp32"))
    saved = load_checkpoint(tmp_path / "fp16" / "checkpoints" / "student.pt")
    assert saved["state"]["scaler"]["scale"] > 1.0  # the grad scaler ran and was checkpointed
    losses = [r["train_loss"] for r in half.student.history]
    assert all(math.isfinite(x) for x in losses)
    assert losses != [r["train_loss"] for r in full.student.history]  # autocast really ran
    assert all(p.dtype == torch.float32 for p in half.student.model.parameters())


def test_an_autocast_dtype_the_device_cannot_compute_in_is_refused(monkeypatch):
    from kdplug.engine import loop
    assert loop.autocast_computes_in(torch.device("cpu"), torch.float16)
    monkeypatch.setattr(loop, "autocast_computes_in", lambda device, dtype: False)
    with pytest.raises(kdplug.KdplugError, match=r"amp 'fp16'.*does not compute in torch.float16"):
        loop.autocast_factory("fp16", torch.device("cpu"))


def test_the_schedules_lr_after_warm_up():
    lrs = {}
    for kind in ("constant", "linear"):
        cfg = DistillConfig(optimizer="sgd", scheduler=kind, warmup_steps=4, lr=1.0)
        trainer = Trainer(mlp(), CrossEntropyLoss(), cfg=cfg, env=DistEnv(), lr=1.0,
                          total_steps=12)
        batch = {"inputs": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 0])}
        seen = []
        for _ in range(12):
            seen.append(trainer.lr)
            trainer.train_step(batch)
        lrs[kind] = seen
    assert lrs["constant"] == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 8)
    assert lrs["linear"] == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1 - i / 8 for i in range(8)])


# ----------------------------------------------------------------------------- clipping, scaler

def one_sgd_step(grad_clip, scaler=None):
    cfg = DistillConfig(optimizer="sgd", momentum=0.0, weight_decay=0.0, scheduler="constant",
                        grad_clip=grad_clip)
    model = mlp()
    trainer = Trainer(model, CrossEntropyLoss(), cfg=cfg, env=DistEnv(), lr=0.5, total_steps=1)
    if scaler is not None:
        trainer.scaler = scaler
    batch = {"inputs": torch.randn(16, 8, generator=torch.Generator().manual_seed(1)),
             "labels": torch.arange(16) % 3}
    before = copy.deepcopy(model)
    trainer.train_step(batch)
    return before, model, batch


def reference_update(before, batch, clip):
    model = copy.deepcopy(before)
    loss = nn.functional.cross_entropy(model(batch["inputs"]), batch["labels"])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else None
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    return model, norm


def test_grad_clip_changes_the_update_as_clip_grad_norm_does():
    before, trained, batch = one_sgd_step(grad_clip=0.05)
    want, norm = reference_update(before, batch, 0.05)
    assert norm > 0.05  # the clip was active
    assert_same_weights(trained, want, exact=False)
    unclipped, _ = reference_update(before, batch, None)
    assert any(not torch.allclose(p, q) for p, q in zip(trained.parameters(),
                                                         unclipped.parameters()))


def test_the_grad_scaler_path_on_the_cpu():
    """What fp16 training adds besides autocast: loss scaling, unscaling before the clip,
    skipping a step whose gradients overflowed and lowering the scale."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    before, trained, batch = one_sgd_step(grad_clip=0.05, scaler=scaler)
    want, _ = reference_update(before, batch, 0.05)
    assert_same_weights(trained, want, exact=False)  # scaled, unscaled, clipped: the same step
    assert scaler.get_scale() == 2.0 ** 12

    cfg = DistillConfig(optimizer="sgd", scheduler="constant")
    model = mlp()
    trainer = Trainer(model, CrossEntropyLoss(), cfg=cfg, env=DistEnv(), lr=0.5, total_steps=2)
    trainer.scaler = scaler
    trainer.reads_are_free = False  # as on a GPU: the loss is not read per step
    kept = copy.deepcopy(model)
    overflow = {"inputs": torch.full((4, 8), 3e38), "labels": torch.tensor([0, 1, 2, 0])}
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch's note on a skipped step
        trainer.train_step(overflow)
    assert_same_weights(model, kept)  # the step was skipped
    assert scaler.get_scale() == 2.0 ** 11
    assert trainer.state()["scaler"]["scale"] == 2.0 ** 11  # checkpointed with the run
