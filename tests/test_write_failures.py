"""A write that fails (a full disk: OSError(ENOSPC) from the write itself) keeps the previous
complete file and stops with an error naming the file and the cause; a damaged checkpoint or
cache manifest is an error naming the file."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdplug
from kdplug import _atomic
from kdplug.cache import format as cache_format
from kdplug.data import DataSplits
from kdplug.engine import checkpoint, distill, report
from kdplug.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FullDisk:
    """A file whose writes fail once half of the bytes went out, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """From now on every atomic write fails with ENOSPC (the test arms it when it wants)."""
    def arm():
        real_open = open
        monkeypatch.setattr(_atomic, "open", lambda *a, **k: FullDisk(real_open(*a, **k)),
                            raising=False)
    return arm


WRITERS = {
    "checkpoint": (lambda path, v: checkpoint.atomic_save({"v": v}, path), "student.pt",
                   lambda path: load_checkpoint(path)["v"]),
    "report": (lambda path, v: report.write_report(path, {"v": v}), "report.json",
               lambda path: json.loads(path.read_text())["v"]),
    "metrics": (lambda path, v: report.write_metrics(path, [{"v": v}], durable=False),
                "metrics.jsonl", lambda path: json.loads(path.read_text())["v"]),
    "status": (lambda path, v: report.write_status(path.parent, "done", str(v)), "status.json",
               lambda path: int(json.loads(path.read_text())["detail"])),
    "cache record": (lambda path, v: cache_format.atomic_write_json({"v": v}, path),
                     "manifest.json", lambda path: json.loads(path.read_text())["v"]),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_failed_write_keeps_the_previous_file_and_names_it(tmp_path, full_disk, name):
    write, filename, read = WRITERS[name]
    path = tmp_path / filename
    write(path, 1)
    full_disk()
    with pytest.raises(kdplug.KdplugError) as caught:
        write(path, 2)
    message = str(caught.value)
    assert str(path) in message and "ENOSPC: No space left on device" in message
    assert "previous complete file is kept" in message
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert read(path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [filename]  # no temporary file left


def test_a_cache_chunk_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_format, "_reserve", full)
    path = tmp_path / "chunks" / "view0-chunk000000.logits.npy"
    path.parent.mkdir()
    with pytest.raises(kdplug.KdplugError, match=r"cannot write '.*view0-chunk000000.logits.npy' "
                                                 r"\(ENOSPC: No space left on device\)"):
        cache_format.write_npy(np.zeros((4, 3), np.float32), path, tmp_path)
    assert list(path.parent.iterdir()) == []


def data() -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    return DataSplits(train=TensorDataset(x[:64], y[:64]), test=TensorDataset(x[64:], y[64:]),
                      num_classes=3, input_shape=(8,))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_a_run_whose_checkpoint_write_fails_stops_and_keeps_the_last_one(tmp_path, full_disk):
    class FailFromEpoch2:
        def on_epoch_end(self, phase, epoch, metrics):
            if epoch == 1:
                full_disk()

    with pytest.raises(kdplug.KdplugError, match=r"cannot write '.*checkpoints/student.pt' "
                                                 r"\(ENOSPC"):
        distill(student=mlp(), data=data(), loss="ce", epochs=3, batch_size=16, quiet=True,
                out=str(tmp_path), callbacks=[FailFromEpoch2()])
    assert load_checkpoint(tmp_path / "checkpoints" / "student.pt")["epoch"] == 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "running"  # the status write failed too: the disk is full


def truncated_copy(path: Path, out: Path) -> Path:
    raw = path.read_bytes()
    out.write_bytes(raw[:len(raw) // 2])
    return out


def test_truncated_checkpoints_are_named_for_resume_and_teacher_checkpoint(tmp_path):
    run = dict(student=mlp(), data=data(), loss="ce", epochs=1, batch_size=16, quiet=True)
    distill(**run, out=str(tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "student.pt"
    truncated_copy(ckpt, ckpt)
    with pytest.raises(kdplug.KdplugError, match=r"cannot read checkpoint '.*student.pt': .*"
                                                 r"damaged"):
        distill(**run, out=str(tmp_path / "run"), resume=True)
    teacher = truncated_copy(tmp_path / "run" / "checkpoints" / "student.pt", tmp_path / "t.pt")
    with pytest.raises(kdplug.KdplugError, match=r"cannot read checkpoint '.*t.pt'"):
        distill(teacher=mlp(), **{**run, "loss": "kd+ce"}, teacher_checkpoint=str(teacher),
                out=str(tmp_path / "other"))


def test_a_changed_cache_manifest_fails_its_own_checksum(tmp_path):
    from kdplug.cache import cache_teacher, open_cache

    splits = data()

    class Data:
        @kdplug.hookimpl
        def register_datasets(register):
            register("write-failures-data", lambda: splits)

        @kdplug.hookimpl
        def register_teachers(register):
            register("write-failures-mlp", mlp)

    name = kdplug.register_plugin(Data, name="write-failures-test")
    try:
        out = tmp_path / "cache"
        cache_teacher("write-failures-mlp", "write-failures-data", out, quiet=True,
                      evaluate_teacher=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest[cache_format.MANIFEST_CHECKSUM] == cache_format.manifest_digest(manifest)
        open_cache(out)  # as written: accepted
        manifest["rows"] += 1
        (out / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(kdplug.KdplugError, match=r"manifest.json does not match its own "
                                                     r"checksum .*changed or damaged"):
            open_cache(out)
    finally:
        kdplug.unregister_plugin(name)
