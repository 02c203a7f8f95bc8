"""Offline distillation with a teacher cache: epoch time, disk bytes, LM quality.

    python benchmarks/bench_cache.py                       # all three parts (CPU, ~10 min)
    python benchmarks/bench_cache.py --parts epoch --repeats 3
    python benchmarks/bench_cache.py --parts bytes
    python benchmarks/bench_cache.py --parts quality
    python benchmarks/bench_cache.py --quick                # a smoke run of everything

epoch    The time of one training epoch through kdplug's engine (``epoch_time_s``: the training
         loop with data loading and cache reads, without evaluation) for three variants of the
         same run, interleaved in one process: the student alone on the labels (loss ``ce``),
         distillation running the teacher every step, and distillation from a teacher cache.
         Two pairs: the CIFAR CNN pair (cnn-teacher / cnn-student on 3×32×32 images: scikit-
         learn's digits upsampled, the CIFAR-10 tensor shape, since CIFAR-10 itself needs a
         download) with a dense cache, and the Transformer LM pair (transformer-lm-teacher 6
         layers d=384 / transformer-lm-student 2 layers d=128) on generated token sequences at
         a 32,000-token vocabulary with a top-32 cache and a dense float16 cache. The goal: a
         cached distillation epoch costs at most 1.15× an epoch of the student alone.
bytes    Disk bytes per sample (and per token) of a cache of 128-token sequences at a 32,000-token
         vocabulary: dense float32 / float16 against top-k (k = 8, 32, 128; int16 indices and
         float16 log-probabilities), measured from the written files (manifest ``bytes``).
quality  The LM student's perplexity trained from top-k against dense teacher outputs: a
         byte-level LM teacher trained on the BBC tech articles, cached dense and top-k, and
         students distilled from each cache next to the student alone (same budget), over
         several seeds (single runs of this small LM vary by several perplexity points).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdplug
from kdplug.engine import distill

VOCAB = 32000


# ----------------------------------------------------------------------------- generated tokens

def generated_tokens(n: int = 48, seq_len: int = 128, vocab_size: int = VOCAB, seed: int = 0):
    """Random token sequences (lengths from seq_len/2 to seq_len: padding is exercised)."""
    from kdplug_transformer.text_data import PadCollate, TokenDataset

    g = torch.Generator().manual_seed(seed)

    def items(count):
        out = []
        for _ in range(count):
            length = int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=g))
            ids = torch.randint(3, vocab_size, (length + 1,), generator=g)
            out.append((ids[:-1], ids[1:]))
        return TokenDataset(out)

    return kdplug.DataSplits(
        train=items(n), test=items(max(8, n // 4)), num_classes=vocab_size,
        input_shape=(seq_len,), task="lm", vocab_size=vocab_size,
        collate_fn=PadCollate(0, "lm"),
        model_options={"vocab_size": vocab_size, "max_len": seq_len, "task": "lm"})


class BenchData:
    @kdplug.hookimpl
    def register_datasets(register):
        register("bench-tokens", generated_tokens)


# ----------------------------------------------------------------------------- epoch time

def epoch_times(result):
    return [r["epoch_time_s"] for r in result.student.history]


def bench_epoch(args, work: Path) -> dict:
    pairs = {
        "cnn": dict(teacher="cnn-teacher", student="cnn-student", data="digits",
                    data_options={"image_size": 32, "channels": 3,
                                  "train_size": 256 if args.quick else 640},
                    batch_size=64, caches={"dense float32": {}}),
        "lm": dict(teacher="transformer-lm-teacher", student="transformer-lm-student",
                   data="bench-tokens", data_options={"n": 16 if args.quick else 48},
                   batch_size=8,
                   caches={"top-32 float16": {"top_k": 32, "dtype": "float16"},
                           "dense float16": {"dtype": "float16"}}),
    }
    out: dict = {}
    for key, pair in pairs.items():
        if args.pairs and key not in args.pairs:
            continue
        caches = pair.pop("caches")
        common = dict(student=pair["student"], data=pair["data"],
                      data_options=pair["data_options"], batch_size=pair["batch_size"],
                      epochs=args.epochs, quiet=True, device=args.device, seed=0,
                      eval_batch_size=64)
        splits = kdplug.create_dataset(pair["data"], **pair["data_options"])
        torch.manual_seed(0)
        teacher = kdplug.create_teacher(pair["teacher"], **splits.model_options)
        ckpt = work / f"{key}-teacher.pt"
        torch.save(teacher.state_dict(), ckpt)
        del teacher
        variants = {"student alone (ce)": dict(teacher=pair["teacher"], loss="ce",
                                               teacher_checkpoint=str(ckpt)),
                    "teacher every step": dict(teacher=pair["teacher"],
                                               teacher_checkpoint=str(ckpt))}
        for label, options in caches.items():
            folder = work / f"{key}-cache-{label.replace(' ', '-')}"
            started = time.perf_counter()
            written = kdplug.cache_teacher(pair["teacher"], pair["data"], folder,
                                           teacher_checkpoint=str(ckpt),
                                           data_options=pair["data_options"],
                                           batch_size=pair["batch_size"], device=args.device,
                                           quiet=True, evaluate_teacher=False, **options)
            print(f"[{key}] cache {label}: {written.bytes / 2**20:.1f} MiB written in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
            variants[f"cache {label}"] = dict(teacher_cache=str(folder))
        times = {label: [] for label in variants}
        names = list(variants)
        for repeat in range(args.repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            for label in order:
                result = distill(**common, **variants[label], out=str(work / f"{key}-run"),
                                 overwrite=True)
                times[label] += epoch_times(result)[1:] if args.epochs > 1 else \
                    epoch_times(result)
            print(f"[{key}] repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{label} {times[label][-1]:.2f} s" for label in names), file=sys.stderr)
        alone = statistics.median(times["student alone (ce)"])
        out[key] = {label: {"epoch_s": round(statistics.median(t), 3),
                            "min_s": round(min(t), 3), "max_s": round(max(t), 3),
                            "vs_alone": round(statistics.median(t) / alone, 3)}
                    for label, t in times.items()}
    return out


# ----------------------------------------------------------------------------- disk bytes

def bench_bytes(args, work: Path) -> dict:
    n, seq_len = (4, 64) if args.quick else (16, 128)
    data_options = {"n": n, "seq_len": seq_len}
    splits = generated_tokens(n, seq_len)
    tokens = sum(int(x.shape[0]) for x, _ in splits.train.items)
    torch.manual_seed(0)
    teacher = kdplug.create_teacher("transformer-lm-teacher", vocab_size=VOCAB, max_len=seq_len,
                                    num_layers=1, d_model=64, num_heads=2)
    rows = {}
    for label, options in (("dense float32", {"dtype": "float32"}),
                           ("dense float16", {"dtype": "float16"}),
                           ("top-8 (int16 + float16)", {"top_k": 8, "dtype": "float16"}),
                           ("top-32 (int16 + float16)", {"top_k": 32, "dtype": "float16"}),
                           ("top-128 (int16 + float16)", {"top_k": 128, "dtype": "float16"})):
        folder = work / f"bytes-{len(rows)}"
        result = kdplug.cache_teacher(teacher, "bench-tokens", folder, data_options=data_options,
                                      batch_size=4, quiet=True, evaluate_teacher=False,
                                      **options)
        rows[label] = {"bytes_per_sample": round(result.bytes / n),
                       "bytes_per_token": round(result.bytes / tokens, 1),
                       "vs_dense_float32": None}
        shutil.rmtree(folder)
    dense = rows["dense float32"]["bytes_per_sample"]
    for row in rows.values():
        row["vs_dense_float32"] = round(row["bytes_per_sample"] / dense, 5)
    return {"samples": n, "tokens_per_sample": round(tokens / n, 1), "vocab": VOCAB,
            "rows": rows}


# ----------------------------------------------------------------------------- quality

def bench_quality(args, work: Path) -> dict:
    """Students from dense and top-k caches of one teacher, over several seeds. (With lr 2e-3 and
    no warm-up, as in the README's LM preset, single runs of this small LM differ by several
    perplexity points from seed to seed, some stalling on a plateau; lr 1e-3 after 100 warm-up
    steps is stable.)"""
    from kdplug_transformer.text_data import bbc_news_folder

    data = f"text:{bbc_news_folder() / 'tech'}"
    data_options = {"seq_len": 64, "limit": 20 if args.quick else 80}
    teacher_options = {"num_layers": 4, "d_model": 192, "num_heads": 6}
    common = dict(student="transformer-lm-student", data=data, data_options=data_options,
                  batch_size=16, lr=1e-3, warmup_steps=100, temperature=1.0, alpha=0.5,
                  quiet=True, device=args.device,
                  epochs=1 if args.quick else args.quality_epochs)
    started = time.perf_counter()
    base = distill(teacher="transformer-lm-teacher", teacher_options=teacher_options,
                   teacher_epochs=1 if args.quick else 3, loss="ce", seed=0,
                   out=str(work / "quality-teacher"), overwrite=True, **common)
    ckpt = str(work / "quality-teacher" / "checkpoints" / "teacher.pt")
    print(f"[quality] teacher trained: ppl {base.teacher.metrics['perplexity']:.3f} "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    caches = {"dense float16": {"dtype": "float16"},
              "top-32 float16": {"top_k": 32, "dtype": "float16"},
              "top-8 float16": {"top_k": 8, "dtype": "float16"}}
    sizes = {}
    for label, options in caches.items():
        written = kdplug.cache_teacher("transformer-lm-teacher", data,
                                       work / f"quality-{label.replace(' ', '-')}",
                                       teacher_checkpoint=ckpt, teacher_options=teacher_options,
                                       data_options=data_options, batch_size=32,
                                       device=args.device, quiet=True, overwrite=True, **options)
        sizes[label] = written.bytes
    variants = {"student alone (ce)": None,
                "dense float16 cache": ("dense float16", {}),
                "top-32 cache (renormalize)": ("top-32 float16", {}),
                "top-8 cache (renormalize)": ("top-8 float16", {}),
                "top-8 cache (rest=bucket)": ("top-8 float16", {"rest": "bucket"})}
    ppl: dict = {label: [] for label in variants}
    seeds = list(range(1 if args.quick else args.quality_seeds))
    for seed in seeds:
        for label, variant in variants.items():
            if variant is None and seed == 0:
                value = base.student.metrics["perplexity"]
            else:
                options = (dict(teacher="transformer-lm-teacher", loss="ce",
                                teacher_options=teacher_options, teacher_checkpoint=ckpt)
                           if variant is None else
                           dict(teacher_cache=str(work / f"quality-{variant[0].replace(' ', '-')}"),
                                loss_options=variant[1]))
                result = distill(**common, **options, seed=seed, out=str(work / "quality-run"),
                                 overwrite=True)
                value = result.student.metrics["perplexity"]
            ppl[label].append(round(value, 3))
        print(f"[quality] seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in ppl.items()),
              file=sys.stderr)
    rows = {"teacher": {"perplexity": round(base.teacher.metrics["perplexity"], 3)}}
    for label, values in ppl.items():
        rows[label] = {"perplexity_mean": round(statistics.mean(values), 3),
                       "perplexity_std": round(statistics.stdev(values), 3) if len(values) > 1
                       else 0.0, "per_seed": values}
        if variants[label] is not None:
            rows[label]["cache_bytes"] = sizes[variants[label][0]]
    return {"data": data, "data_options": data_options, "teacher_options": teacher_options,
            "temperature": 1.0, "alpha": 0.5, "lr": common["lr"],
            "warmup_steps": common["warmup_steps"], "student_epochs": common["epochs"],
            "seeds": seeds, "rows": rows}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="epoch,bytes,quality")
    ap.add_argument("--pairs", default="", help="epoch part: cnn,lm (default both)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timed run (the first of "
                    "each run is not counted when > 1)")
    ap.add_argument("--quality-epochs", type=int, default=2)
    ap.add_argument("--quality-seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for caches and runs (default: a temp)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    args.pairs = [p for p in args.pairs.split(",") if p]
    if args.quick:
        args.repeats, args.epochs = 1, 1
    torch.set_num_threads(args.threads)
    kdplug.register_plugin(BenchData, name="bench-cache-data")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kdplug-bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "threads": args.threads, "torch": torch.__version__}
    try:
        for part in args.parts.split(","):
            started = time.perf_counter()
            report[part] = {"epoch": bench_epoch, "bytes": bench_bytes,
                            "quality": bench_quality}[part](args, work)
            report[part]["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps({part: report[part]}, indent=1), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
