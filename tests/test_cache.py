"""Offline distillation with a teacher cache: same student as the live teacher, every mismatch and
damage named, resume of an interrupted write, the augmentation policy, top-k, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import Dataset

import kdplug
from kdplug.cache import (CacheCorruptError, CacheError, CacheIncompleteError, CacheMismatchError,
                          cache_teacher, open_cache)
from kdplug.cache.format import seal_manifest
from kdplug.cli import cli
from kdplug.data import DataSplits
from kdplug.engine import distill

#: Changed by tests to simulate data that changed on disk behind the same name and options.
STATE = {"offset": 0.0, "extra": 0, "augment": 0.0}


class Noisy(Dataset):
    """Fixed tensors; with ``augment`` > 0 each load adds Gaussian noise from torch's global RNG
    (random augmentation that kdplug's per-item seeding makes reproducible)."""

    def __init__(self, x, y, augment):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:
            x = x + self.augment * torch.randn_like(x)
        return x, self.y[i]


def generated(n: int = 96, classes: int = 4, size: int = 8, augment: float = 0.0) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    n = n + STATE["extra"]
    prototypes = torch.randn(classes, 1, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = prototypes[y] + 0.7 * torch.randn(n, 1, size, size, generator=g) + STATE["offset"]
    cut = n * 3 // 4
    return DataSplits(train=Noisy(x[:cut], y[:cut], augment or STATE["augment"]),
                      test=Noisy(x[cut:], y[cut:], 0.0), num_classes=classes,
                      input_shape=(1, size, size),
                      model_options={"in_channels": 1, "image_size": size, "num_classes": classes})


def other_teacher(in_channels=1, image_size=8, num_classes=4):
    return kdplug.create_teacher("cnn-teacher", in_channels=in_channels, image_size=image_size,
                                 num_classes=num_classes)


class CacheData:
    @kdplug.hookimpl
    def register_teachers(register):
        register("cnn-teacher-2", other_teacher)

    @kdplug.hookimpl
    def register_datasets(register):
        register("cache-gen", generated)
        register("cache-gen-2", generated)


@pytest.fixture(scope="module", autouse=True)
def plugin():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    name = kdplug.register_plugin(CacheData, name="cache-test-data")
    try:
        yield
    finally:
        kdplug.unregister_plugin(name)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean_state():
    saved = dict(STATE)
    yield
    STATE.update(saved)


class NoTraining:
    def on_step(self, **_):
        raise AssertionError("training started")


OPTS = dict(in_channels=1, image_size=8, num_classes=4)


def teacher_checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    torch.save(kdplug.create_teacher("cnn-teacher", **OPTS).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return teacher_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt", 0)


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory, ckpt):
    out = tmp_path_factory.mktemp("caches") / "dense"
    cache_teacher("cnn-teacher", "cache-gen", out, teacher_checkpoint=ckpt, chunk_size=20,
                  batch_size=16, quiet=True)
    return out


RUN = dict(student="cnn-student", data="cache-gen", epochs=2, batch_size=16, quiet=True, seed=1)


def same_student(a, b, rel=1e-3):
    """Two runs trained the same student (up to float rounding of the teacher's forward)."""
    assert len(a.student.history) == len(b.student.history)
    for ha, hb in zip(a.student.history, b.student.history):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=rel)
        assert hb["test_loss"] == pytest.approx(ha["test_loss"], rel=rel)
    assert abs(a.student.accuracy - b.student.accuracy) <= 1 / 24 + 1e-9
    for key, value in a.student.model.state_dict().items():
        torch.testing.assert_close(b.student.model.state_dict()[key].float(), value.float(),
                                   atol=5e-3, rtol=1e-2)


# ----------------------------------------------------------------------------- same student

def test_cached_run_gives_the_same_student_as_the_live_teacher(tmp_path, ckpt, dense_cache):
    live = distill(teacher="cnn-teacher", **RUN, teacher_checkpoint=ckpt, out=str(tmp_path / "a"))
    cached = distill(**RUN, teacher_cache=str(dense_cache), out=str(tmp_path / "b"))
    same_student(live, cached)
    report = cached.report
    assert report["teacher_cache"]["kind"] == "dense" and report["teacher"]["epochs"] == 0
    assert report["teacher"]["source"].startswith("cache ")
    # the teacher's numbers come from the manifest (measured when caching)
    assert report["teacher"]["accuracy"] == pytest.approx(live.teacher.accuracy)
    assert report["teacher"]["inference_ms_per_batch"] is None
    assert "teacher" in cached.table() and "student (distilled)" in cached.table()
    manifest = json.loads((dense_cache / "manifest.json").read_text())
    assert manifest["data"]["num_samples"] == 72 and manifest["storage"]["num_chunks"] == 4
    assert manifest["teacher"]["weights_hash"].startswith("blake2b:")
    assert all(f["blake2b"] for c in manifest["chunks"] for f in c["files"].values())


def test_storage_dtypes_round_trip(tmp_path, ckpt, dense_cache):
    exact = open_cache(dense_cache)
    want, _ = exact.rows(range(72))
    sizes = {}
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 1e-2)):
        out = tmp_path / dtype
        result = cache_teacher("cnn-teacher", "cache-gen", out, teacher_checkpoint=ckpt,
                               dtype=dtype, chunk_size=72, batch_size=72, quiet=True,
                               evaluate_teacher=False)
        got, lengths = open_cache(out, expect={"storage": {"dtype": dtype}}).rows(range(72))
        assert lengths == [1] * 72
        torch.testing.assert_close(got["logits"], want["logits"], rtol=tol, atol=tol)
        sizes[dtype] = result.bytes
    assert sizes["float16"] == sizes["bfloat16"]
    with pytest.raises(CacheMismatchError, match=r"storage.dtype: 'float32' in the cache, "
                                                 r"'float16' in this run"):
        open_cache(dense_cache, expect={"storage": {"dtype": "float16", "k": None}})
    with pytest.raises(CacheMismatchError, match=r"storage.k: null in the cache, 8 in this run"):
        open_cache(dense_cache, expect={"storage": {"k": 8}})


# ----------------------------------------------------------------------------- language models

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the park while birds sang".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
                       for _ in range(30))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return f"text:{path}"


LM_T = dict(num_layers=1, d_model=32, num_heads=2)
LM_RUN = dict(student="transformer-lm-student", epochs=1, batch_size=8, quiet=True,
              data_options={"seq_len": 24}, student_options=dict(num_layers=1, d_model=16,
                                                                 num_heads=2),
              temperature=2.0, alpha=0.5, lr=3e-3, device="cpu")


def test_lm_caches_dense_and_top_k(tmp_path, corpus):
    torch.manual_seed(0)
    teacher = kdplug.create_teacher("transformer-lm-teacher", vocab_size=259, max_len=24, **LM_T)
    ckpt = tmp_path / "lm-teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    kw = dict(teacher_checkpoint=str(ckpt), teacher_options=LM_T,
              data_options={"seq_len": 24}, chunk_size=16, batch_size=8, quiet=True)
    live = distill(teacher="transformer-lm-teacher", data=corpus, teacher_options=LM_T,
                   teacher_checkpoint=str(ckpt), out=str(tmp_path / "live"), **LM_RUN)
    results = {}
    for name, extra in (("dense", {}), ("all", {"top_k": 259}), ("top8", {"top_k": 8})):
        cached = cache_teacher("transformer-lm-teacher", corpus, tmp_path / name, **kw, **extra)
        assert cached.manifest["storage"]["sequence"]
        results[name] = distill(data=corpus, teacher_cache=str(tmp_path / name),
                                out=str(tmp_path / f"run-{name}"), **LM_RUN)
    # dense logits, and top-k with k = the whole vocabulary, are the live teacher exactly
    same_student(live, results["dense"], rel=1e-4)
    same_student(live, results["all"], rel=1e-4)
    assert results["top8"].student.metrics["perplexity"] < 1e3
    # only real tokens are stored: rows = counted tokens, and top-8 is far smaller
    dense = json.loads((tmp_path / "dense" / "manifest.json").read_text())
    top8 = json.loads((tmp_path / "top8" / "manifest.json").read_text())
    assert dense["rows"] == top8["rows"] < dense["data"]["num_samples"] * 24 + 1
    assert top8["bytes"] * 8 < dense["bytes"]
    assert top8["storage"]["index_dtype"] == "int16"
    # the cached top-8 rows of a padded batch are the live teacher's top-8 log-probabilities
    cache = open_cache(tmp_path / "top8")
    splits = kdplug.create_dataset(corpus, seq_len=24)
    batch = splits.collate_fn([splits.train[i] for i in (0, 5, 9)])
    targets = cache.targets([0, 5, 9], 0, batch)
    teacher.eval()
    with torch.no_grad():
        logits = teacher(batch["inputs"], attention_mask=batch["attention_mask"])
    logprobs = torch.log_softmax(getattr(logits, "logits", logits).float(), -1)
    want, want_idx = logprobs.topk(8, -1)
    mask = batch["attention_mask"]
    assert torch.equal(targets["teacher_topk_indices"][mask], want_idx[mask])
    torch.testing.assert_close(targets["teacher_topk_logprobs"][mask], want[mask])


# ----------------------------------------------------------------------------- mismatches

def mismatch(tmp_path, cache, **options):
    run = {**RUN, "teacher_cache": str(cache), "out": str(tmp_path / "run"),
           "callbacks": [NoTraining()]}
    run.update(options)
    with pytest.raises(CacheMismatchError) as info:
        distill(**run)
    return info.value


def test_the_matching_teacher_by_name_and_weights_is_accepted(tmp_path, ckpt, dense_cache):
    result = distill(teacher="cnn-teacher", **{**RUN, "epochs": 1}, teacher_checkpoint=ckpt,
                     teacher_cache=str(dense_cache), out=str(tmp_path))
    assert result.student.epochs == 1


@pytest.mark.parametrize("case, field, message", [
    ("teacher name", "teacher.name", r"teacher.name: 'cnn-teacher' in the cache, "
                                     r"'cnn-teacher-2' in this run"),
    ("teacher options", "teacher.options", r'teacher.options: \{"image_size": 8, "in_channels": '
                                           r'1, "num_classes": 4\} in the cache, \{"dropout": '
                                           r'0.5, '),
    ("teacher weights", "teacher.weights_hash", r"teacher.weights_hash: 'blake2b:\w+' in the "
                                                r"cache, 'blake2b:\w+' in this run"),
    ("data name", "data.name", r"data.name: 'cache-gen' in the cache, 'cache-gen-2' in this run"),
    ("data options", "data.options", r'data.options: \{\} in the cache, \{"n": 80\} in this run'),
    ("sample count", "data.num_samples", r"data.num_samples: 72 in the cache, 75 in this run"),
    ("sample order", "data.order", r"data.order: 'blake2b:\w+' in the cache, 'blake2b:\w+'"),
    ("transform", "transform.deterministic", r"transform.deterministic: true in the cache, "
                                             r"false in this run"),
])
def test_every_mismatch_names_its_field(tmp_path, ckpt, dense_cache, case, field, message):
    options = {}
    if case == "teacher name":
        options = {"teacher": "cnn-teacher-2"}
    elif case == "teacher options":
        options = {"teacher": "cnn-teacher", "teacher_options": {"dropout": 0.5}}
    elif case == "teacher weights":
        options = {"teacher": "cnn-teacher",
                   "teacher_checkpoint": teacher_checkpoint(tmp_path / "other.pt", 7)}
    elif case == "data name":
        options = {"data": "cache-gen-2"}
    elif case == "data options":
        options = {"data_options": {"n": 80}}
    elif case == "sample count":
        STATE["extra"] = 4
    elif case == "sample order":
        STATE["offset"] = 0.5
    elif case == "transform":
        STATE["augment"] = 0.3
    error = mismatch(tmp_path, dense_cache, **options)
    assert field in error.fields
    assert str(dense_cache) in str(error)
    import re

    assert re.search(message, str(error)), str(error)


def edited_copy(tmp_path, cache, edit):
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)  # resealed: what is tested is the edit, not the manifest's own checksum
    (copy / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    return copy


def test_format_version_and_split_are_checked(tmp_path, dense_cache):
    old = edited_copy(tmp_path, dense_cache, lambda m: m.update(format_version=0))
    error = mismatch(tmp_path, old)
    assert "format_version: 0 in the cache, 2 in this kdplug" in str(error)
    shutil.rmtree(old)
    other = edited_copy(tmp_path, dense_cache, lambda m: m["data"].update(split="test"))
    assert "data.split: 'test' in the cache, 'train' in this run" in str(mismatch(tmp_path, other))


def flip_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_missing_and_truncated_chunks_are_named(tmp_path, dense_cache):
    copy = tmp_path / "copy"
    shutil.copytree(dense_cache, copy)
    chunk = copy / "chunks" / "view0-chunk000002.logits.npy"
    flip_byte(chunk)
    run = {**RUN, "teacher_cache": str(copy), "out": str(tmp_path / "run"),
           "callbacks": [NoTraining()]}
    with pytest.raises(CacheCorruptError, match=r"chunk file chunks/view0-chunk000002.logits.npy "
                                                r"is corrupt: its blake2b checksum .*samples "
                                                r"40..59.*--resume"):
        distill(**run)
    # lazy verification: sizes now, each chunk's checksum on its first lookup
    lazy = open_cache(copy, verify="lazy")
    lazy.rows([0, 1])
    with pytest.raises(CacheCorruptError, match="view0-chunk000002.logits.npy is corrupt"):
        lazy.rows([45])
    chunk.write_bytes(chunk.read_bytes()[:-40])
    with pytest.raises(CacheCorruptError, match=r"view0-chunk000002.logits.npy is truncated or "
                                                r"damaged: \d+ bytes, the manifest records \d+"):
        distill(**run)
    chunk.unlink()
    with pytest.raises(CacheCorruptError, match="view0-chunk000002.logits.npy is missing"):
        distill(**run)
    with pytest.raises(CacheError, match="does not exist"):
        distill(**{**run, "teacher_cache": str(tmp_path / "nothing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="is not a kdplug teacher cache: no manifest.json"):
        distill(**{**run, "teacher_cache": str(tmp_path / "empty")})


# ----------------------------------------------------------------------------- resume

class StopAfter:
    def __init__(self, chunks):
        self.chunks, self.seen = chunks, 0

    def on_chunk(self, **_):
        self.seen += 1
        if self.seen == self.chunks:
            raise KeyboardInterrupt("simulated kill")


def checksums(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    return [f["blake2b"] for c in manifest["chunks"] for f in c["files"].values()]


def test_an_interrupted_write_resumes_from_its_last_complete_chunk(tmp_path, ckpt, dense_cache):
    out = tmp_path / "cache"
    kw = dict(teacher_checkpoint=ckpt, chunk_size=20, batch_size=16, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher("cnn-teacher", "cache-gen", out, callbacks=[StopAfter(2)], **kw)
    assert not (out / "manifest.json").exists() and (out / "cache-plan.json").exists()
    with pytest.raises(CacheIncompleteError, match=r"incomplete \(truncated\): 2 of 4 chunks "
                                                   r"are written.*--resume"):
        distill(**RUN, teacher_cache=str(out), out=str(tmp_path / "run"))
    with pytest.raises(CacheError, match="already holds an incomplete teacher cache; pass "
                                         "--resume to finish it"):
        cache_teacher("cnn-teacher", "cache-gen", out, **kw)
    with pytest.raises(CacheMismatchError, match=r"--resume: the incomplete teacher cache .* "
                                                 r"other settings \(storage.dtype: 'float32' "
                                                 r"then, 'float16' now\)"):
        cache_teacher("cnn-teacher", "cache-gen", out, resume=True, dtype="float16", **kw)
    result = cache_teacher("cnn-teacher", "cache-gen", out, resume=True, **kw)
    assert (result.written, result.skipped) == (2, 2)
    assert checksums(out) == checksums(dense_cache)  # the bytes of an uninterrupted write
    # --resume on a complete cache rewrites only what fails its checksum
    flip_byte(out / "chunks" / "view0-chunk000001.logits.npy")
    repaired = cache_teacher("cnn-teacher", "cache-gen", out, resume=True, **kw)
    assert (repaired.written, repaired.skipped) == (1, 3)
    assert checksums(out) == checksums(dense_cache)
    open_cache(out)


def test_resume_after_sigkill_mid_chunk(tmp_path, ckpt, dense_cache):
    """SIGKILL inside the teacher's forward of chunk 3: half-written temporary files stay."""
    out = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import os, signal, torch, kdplug
        torch.set_num_threads(1)
        import test_cache
        kdplug.register_plugin(test_cache.CacheData, name="cache-test-data")
        teacher = kdplug.create_teacher("cnn-teacher", in_channels=1, image_size=8, num_classes=4)
        teacher.load_state_dict(torch.load({ckpt!r}))
        calls = []

        def kill(module, args):
            calls.append(1)
            if len(calls) == 1 + 2 * 2 + 1:  # the probe, chunks 1-2 (2 batches each), then 3
                os.kill(os.getpid(), signal.SIGKILL)

        teacher.register_forward_pre_hook(kill)
        kdplug.cache_teacher(teacher, "cache-gen", {str(out)!r}, chunk_size=20, batch_size=16,
                             quiet=True)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list((out / "chunks").glob("*.json"))) == 2
    assert list((out / "chunks").glob(".*.tmp-*"))  # the killed chunk's temporary file
    teacher = kdplug.create_teacher("cnn-teacher", **OPTS)
    teacher.load_state_dict(torch.load(ckpt))
    result = cache_teacher(teacher, "cache-gen", out, chunk_size=20, batch_size=16, quiet=True,
                           resume=True)
    assert (result.written, result.skipped) == (2, 2)
    assert not list((out / "chunks").glob(".*.tmp-*"))
    assert checksums(out) == checksums(dense_cache)


# ----------------------------------------------------------------------------- augmentation

def test_random_transforms_are_refused_unless_views_are_cached(tmp_path, ckpt):
    with pytest.raises(CacheError, match=r"training transform is random.*augment=0.*"
                                         r"--allow-random-transforms"):
        cache_teacher("cnn-teacher", "cache-gen", tmp_path / "c", teacher_checkpoint=ckpt,
                      data_options={"augment": 0.3}, quiet=True)
    with pytest.raises(CacheError, match="transform of data 'cache-gen' is deterministic"):
        cache_teacher("cnn-teacher", "cache-gen", tmp_path / "c", teacher_checkpoint=ckpt,
                      views=2, quiet=True)


def test_cached_augmented_views_replay_the_live_run_exactly(tmp_path, ckpt):
    """Two views for two epochs: epoch e shows view e, the very augmentation of the live run."""
    data = {"data_options": {"augment": 0.3}}
    out = tmp_path / "views"
    result = cache_teacher("cnn-teacher", "cache-gen", out, teacher_checkpoint=ckpt, views=2,
                           seed=1, allow_random_transforms=True, chunk_size=40, batch_size=16,
                           quiet=True, **data)
    transform = result.manifest["transform"]
    assert (transform["views"], transform["seed"], transform["deterministic"]) == (2, 1, False)
    assert result.written == 4  # 2 chunks x 2 views
    live = distill(teacher="cnn-teacher", **RUN, teacher_checkpoint=ckpt, **data,
                   out=str(tmp_path / "a"))
    cached = distill(**RUN, teacher_cache=str(out), **data, out=str(tmp_path / "b"))
    same_student(live, cached)
    error = mismatch(tmp_path, out, seed=2, **data)
    assert "transform.seed: 1 in the cache, 2 in this run" in str(error)


# ----------------------------------------------------------------------------- losses, CLI

def test_losses_that_a_cache_cannot_serve_are_refused(tmp_path, ckpt):
    out = tmp_path / "top2"
    cache_teacher("cnn-teacher", "cache-gen", out, teacher_checkpoint=ckpt, top_k=2, quiet=True,
                  evaluate_teacher=False)

    def dense_only(student_out, teacher_out, batch):
        return kdplug.ops.kd_kl_div(student_out.logits, teacher_out.logits, 2.0)

    run = {**RUN, "teacher_cache": str(out), "out": str(tmp_path / "run"),
           "callbacks": [NoTraining()]}
    with pytest.raises(CacheError, match="reads the teacher's dense logits, but .* is a top-2 "
                                         "cache"):
        distill(**run, loss=dense_only)
    with pytest.raises(CacheError, match=r"requires hidden_states of the teacher, but a teacher "
                                         r"cache holds only its logits"):
        distill(**run, loss="kd+ce+hint")
    # kd+ce routes the top-k teacher to the fused top-k op, with either rest mode
    result = distill(**{**run, "callbacks": [], "epochs": 1}, loss_options={"rest": "bucket"})
    assert result.teacher.accuracy is None and "n/a" in result.table()


def test_cli_cache_teacher_then_distill(tmp_path, ckpt):
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, [
        "cache-teacher", "--teacher", "cnn-teacher", "--data", "cache-gen", "--out", str(out),
        "--teacher-checkpoint", ckpt, "--dtype", "float16", "--top-k", "3", "--chunk-size", "50",
        "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "72 samples, top-3 float16, 4 classes" in result.output
    assert "chunks: 2 written, 0 kept from before" in result.output
    result = CliRunner().invoke(cli, [
        "distill", "--student", "cnn-student", "--data", "cache-gen", "--teacher-cache", str(out),
        "--epochs", "1", "--batch-size", "16", "--quiet", "--out", str(tmp_path / "run")],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "student (distilled)" in result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["teacher_cache"]["k"] == 3 and report["teacher"]["name"] == "cnn-teacher"
    result = CliRunner().invoke(cli, [
        "cache-teacher", "--teacher", "cnn-teacher", "--data", "cache-gen", "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error: " in result.output and "already holds a complete teacher cache" in result.output


def test_zero_and_two_workers_give_the_same_cached_batches(dense_cache):
    """The cache's items and its targets pickle into worker processes and come back the same."""
    from kdplug.engine.batching import collate
    from kdplug.engine.config import DistillConfig
    from kdplug.engine.distributed import DistEnv
    from kdplug.engine.loaders import build_loaders

    splits = generated()
    got = {}
    for workers in (0, 2):
        loaders = build_loaders(splits, collate, DistillConfig(num_workers=workers, batch_size=16,
                                                               seed=1),
                                DistEnv(), open_cache(dense_cache))
        loaders.read_cached_targets(True)
        loader = loaders.train_loader()
        assert loader.num_workers == workers
        got[workers] = []
        for epoch in range(2):
            loaders.sampler.set_epoch(epoch)
            loaders.train_dataset.set_epoch(epoch)
            got[workers].append(list(loader))
    for epoch_0, epoch_2 in zip(got[0], got[2]):
        assert len(epoch_0) == len(epoch_2) == 4
        for a, b in zip(epoch_0, epoch_2):
            assert a.keys() == b.keys() and {"inputs", "labels", "teacher_logits"} <= set(a)
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(a[key], b[key]), key
