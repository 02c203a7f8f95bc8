"""Epoch time: ``kdplug.distill`` against the hand-written loop doing the same work.

Each side trains the same model on the same data set object (the provider's, with its
augmentation), with the same batch size, AdamW (torch's fused kernel on both sides), per-step
cosine schedule, evaluation on the test split after each epoch and a checkpoint of the model and
optimizer after each epoch. The hand-written loop is the one a user writes in 20 lines:
``DataLoader(train, batch_size, shuffle=True, drop_last=True)``, a ``for`` over batches, the loss
written out with ``log_softmax``/``kl_div``/``cross_entropy``, ``torch.save`` at the epoch's end.

Cases:
  items   the cost of per-item seeding on digits' augmented items: the plain item, kdplug's seeded
          item (one at a time, and a batch of 64 as DataLoader asks for them), and the global-RNG
          round trip kdplug used before issue 16 (reproduced here as the baseline)
  digits  scikit-learn's digits with random shifts (``augment=1``), a 64-32-10 MLP trained alone
          with ``ce`` (no teacher), batch 64
  cifar   generated CIFAR-10-format data (``--cifar-train`` images) with random crop + flip, the
          CNN pair's student phase (the teacher, as built, runs forward on both sides), kd+ce
  lm      BBC News language modelling (``bbc-news-lm``, ``--lm-articles`` articles), the
          Transformer LM pair's student phase, kd+ce per token

Every measurement runs in a fresh subprocess (one per side and repeat, interleaved A B B A …);
an epoch's time is the wall time from one epoch's end to the next (training, evaluation and
checkpoint; the first epoch, which starts workers and warms caches, is left out), and each side's
figure is the median over its epochs and repeats. The breakdown columns are medians too: waiting
for data, the steps, evaluation, checkpoint. The hand loop runs twice: with no worker processes
(what the 20 lines give) and with the number of workers kdplug chose; the goal (<= 1.15x) is
judged against the faster of the two.

    python benchmarks/bench_epoch.py                         # all cases, one thread
    python benchmarks/bench_epoch.py --case digits --repeats 5
    python benchmarks/bench_epoch.py --case digits --before-src ../kdplug-main
        # also times another kdplug source tree (e.g. the commit before a change), interleaved

``--before-src DIR`` runs kdplug from DIR (its ``kdplug/`` with a built op, and ``plugins/``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

GOAL = 1.15
CASES = ("items", "digits", "cifar", "lm")
BREAKDOWN = ("data", "step", "eval", "checkpoint")


# ----------------------------------------------------------------------------- the cases

def case_settings(case: str, args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    """What both sides share: data, models, loss, batch size, learning rate."""
    if case == "digits":
        return dict(data="digits", data_options={"augment": 1}, teacher=None,
                    student="mlp", loss="ce", batch_size=64, lr=1e-3, temperature=4.0, alpha=0.9)
    if case == "cifar":
        return dict(data="cifar10", data_options={"root": str(workdir / "cifar"),
                                                  "download": False, "verify": False},
                    teacher="cnn-teacher", student="cnn-student", loss="kd+ce", batch_size=64,
                    lr=1e-3, temperature=4.0, alpha=0.9)
    return dict(data="bbc-news-lm", data_options={"limit": args.lm_articles, "seq_len": 64},
                teacher="transformer-lm-teacher", student="transformer-lm-student",
                loss="kd+ce", batch_size=16, lr=1e-3, temperature=2.0, alpha=0.5)


def write_cifar(root: Path, train: int, test: int) -> None:
    """A CIFAR-10 copy in the real on-disk format, random pixels (kdplug's cifar10 reads it with
    verify=false)."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(n: int, name: str) -> Dict[str, Any]:
        return {"batch_label": name, "labels": rng.integers(0, 10, n).tolist(),
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "filenames": [f"img_{i}.png" for i in range(n)]}

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(train // 5, f"training batch {i} of 5"), f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test, "testing batch 1 of 1"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f, protocol=2)


def mlp():
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# ----------------------------------------------------------------------------- kdplug's side

def run_kdplug(case: str, args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    import torch

    import kdplug
    from kdplug.engine.config import DistillConfig

    s = case_settings(case, args, workdir)
    new_api = "eval_every" in DistillConfig.__dataclass_fields__
    stamps: List[float] = []
    records: List[Dict[str, Any]] = []

    class Clock:
        def on_epoch_end(self, phase: str, epoch: int, metrics: Dict[str, Any]) -> None:
            if phase == "student":
                stamps.append(time.perf_counter())
                records.append(metrics)

    student = mlp() if s["student"] == "mlp" else s["student"]
    options: Dict[str, Any] = dict(
        student=student, data=s["data"], loss=s["loss"], data_options=s["data_options"],
        epochs=args.epochs, batch_size=s["batch_size"], lr=s["lr"], seed=0,
        temperature=s["temperature"], alpha=s["alpha"], quiet=True, threads=args.threads,
        out=str(workdir / f"run-{os.getpid()}"))
    if args.num_workers is not None:
        options["num_workers"] = args.num_workers
    if s["teacher"] is not None:
        options.update(teacher=s["teacher"], teacher_epochs=0)
    elif not new_api:  # before issue 16 a run needed a teacher even for ce: one it never runs
        options.update(teacher=mlp(), teacher_epochs=0)
    kdplug.distill(**options, callbacks=[Clock()])
    epochs = [b - a for a, b in zip(stamps, stamps[1:])]
    breakdown = {part: [r[f"{part}_time_s"] for r in records[1:] if f"{part}_time_s" in r]
                 for part in BREAKDOWN}
    return {"epoch_s": epochs, "breakdown": breakdown, "threads": torch.get_num_threads()}


def kdplug_default_workers(case: str, args: argparse.Namespace, workdir: Path) -> int:
    """The DataLoader workers kdplug picks for this case's training set (0 before issue 16)."""
    import kdplug
    from kdplug.engine import loaders
    from kdplug.engine.batching import collate
    from kdplug.engine.config import DistillConfig
    from kdplug.engine.distributed import DistEnv

    if not hasattr(loaders, "default_num_workers"):
        return 0
    s = case_settings(case, args, workdir)
    splits = kdplug.create_dataset(s["data"], **s["data_options"])
    built = loaders.build_loaders(splits, splits.collate_fn or collate,
                                  DistillConfig(batch_size=s["batch_size"]), DistEnv())
    return built.train_workers


# ----------------------------------------------------------------------------- the hand loop

def run_hand(case: str, args: argparse.Namespace, workdir: Path, workers: int) -> Dict[str, Any]:
    """The loop a user writes (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    import kdplug

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = case_settings(case, args, workdir)
    splits = kdplug.create_dataset(s["data"], **s["data_options"])
    collate = splits.collate_fn
    student = mlp() if s["student"] == "mlp" else kdplug.create_student(
        s["student"], **splits.model_options)
    teacher = None
    if s["teacher"] is not None:
        teacher = kdplug.create_teacher(s["teacher"], **splits.model_options).eval()
        teacher.requires_grad_(False)
    T, alpha = s["temperature"], s["alpha"]
    extra = dict(num_workers=workers, persistent_workers=workers > 0)
    train = DataLoader(splits.train, batch_size=s["batch_size"], shuffle=True, drop_last=True,
                       collate_fn=collate, **extra)
    test = DataLoader(splits.test, batch_size=256, collate_fn=collate)
    optimizer = torch.optim.AdamW(student.parameters(), lr=s["lr"], weight_decay=0.01,
                                  fused=True)
    total = args.epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))

    def unpack(batch):
        if isinstance(batch, dict):
            return batch["inputs"], batch["labels"], batch.get("attention_mask")
        return batch[0], batch[1], None

    def forward(model, x, mask):
        out = model(x, attention_mask=mask) if mask is not None else model(x)
        return getattr(out, "logits", out)

    def loss_of(s_logits, t_logits, y):
        flat_s = s_logits.reshape(-1, s_logits.shape[-1])
        ce = F.cross_entropy(flat_s, y.reshape(-1), ignore_index=-100)
        if t_logits is None:
            return ce
        flat_t = t_logits.reshape(-1, t_logits.shape[-1])
        counted = y.reshape(-1) != -100
        kl = F.kl_div(F.log_softmax(flat_s[counted] / T, -1), F.softmax(flat_t[counted] / T, -1),
                      reduction="batchmean") * T * T
        return alpha * kl + (1 - alpha) * ce

    epoch_s, parts = [], {part: [] for part in BREAKDOWN}
    for epoch in range(args.epochs):
        started = time.perf_counter()
        data_s = step_s = 0.0
        student.train()
        batches = iter(train)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            data_s += t1 - t0
            if batch is None:
                break
            x, y, mask = unpack(batch)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = forward(teacher, x, mask)
            loss = loss_of(forward(student, x, mask), t_logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        student.eval()
        correct = count = 0
        loss_sum = 0.0
        with torch.no_grad():
            for batch in test:
                x, y, mask = unpack(batch)
                logits = forward(student, x, mask).reshape(-1, splits.num_classes)
                y = y.reshape(-1)
                counted = y != -100
                loss_sum += float(F.cross_entropy(logits, y, ignore_index=-100, reduction="sum"))
                correct += int(((logits.argmax(-1) == y) & counted).sum())
                count += int(counted.sum())
        t3 = time.perf_counter()
        torch.save({"model": student.state_dict(), "optimizer": optimizer.state_dict()},
                   workdir / f"hand-{os.getpid()}.pt")
        t4 = time.perf_counter()
        if epoch:  # the first epoch warms up
            epoch_s.append(t4 - started)
            for part, value in zip(BREAKDOWN, (data_s, step_s, t3 - t2, t4 - t3)):
                parts[part].append(value)
    return {"epoch_s": epoch_s, "breakdown": parts, "workers": workers,
            "threads": torch.get_num_threads(), "accuracy": correct / max(count, 1)}


# ----------------------------------------------------------------------------- items

def former_round_trip(dataset, seed: int, epoch: int, index: int):
    """How SeededDataset loaded an item before issue 16: every global RNG saved, torch (CPU and,
    lazily, CUDA) and Python's random seeded, all restored."""
    import random

    import torch

    from kdplug.engine.batching import mix_seed

    item_seed = mix_seed(seed, epoch, index)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(item_seed)
    random.seed(item_seed)
    try:
        return dataset[index]
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


def bench_items(args: argparse.Namespace) -> None:
    import torch

    import kdplug
    from kdplug.engine.batching import SeededDataset

    torch.set_num_threads(args.threads)
    dataset = kdplug.create_dataset("digits", augment=1).train
    seeded = SeededDataset(dataset, 0)
    with_python = SeededDataset(dataset, 0, python_random=True)  # as for a data set that uses it
    indices = list(range(64))
    ways = {
        "plain item": lambda: [dataset[i] for i in indices],
        "seeded, one at a time": lambda: [seeded[i] for i in indices],
        "seeded, a batch of 64": lambda: seeded.__getitems__(indices),
        "+ Python's random": lambda: with_python.__getitems__(indices),
        "before issue 16": lambda: [former_round_trip(dataset, 0, 0, i) for i in indices],
    }
    times: Dict[str, List[float]] = {name: [] for name in ways}
    for repeat in range(15 * args.repeats):
        for name in (list(ways) if repeat % 2 == 0 else list(reversed(ways))):
            started = time.perf_counter()
            for _ in range(5):
                ways[name]()
            times[name].append((time.perf_counter() - started) / (5 * len(indices)))
    plain = median(times["plain item"])
    print(f"\nitems: digits with random shifts, seeded by (seed, epoch, index) "
          f"({python_random_note(seeded)}); median us per item")
    for name, values in times.items():
        print(f"  {name:<24}{1e6 * median(values):8.1f} us   x{median(values) / plain:.2f}")


def python_random_note(seeded) -> str:
    return ("it draws from Python's random too" if seeded.python_random
            else "it does not draw from Python's random")


# ----------------------------------------------------------------------------- the driver

def measure(side: str, case: str, args: argparse.Namespace, workdir: Path,
            workers: Optional[int] = None) -> Dict[str, Any]:
    """One side's run in a fresh subprocess; its JSON result."""
    out = workdir / f"result-{side}-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--child", side, "--case", case, "--workdir",
               str(workdir), "--result", str(out), "--epochs", str(args.epochs), "--threads",
               str(args.threads), "--lm-articles", str(args.lm_articles)]
    if workers is not None:
        command += ["--num-workers", str(workers)]
    env = dict(os.environ)
    if side == "before":
        src = Path(args.before_src).resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "plugins"),
                                             env.get("PYTHONPATH", "")])
    subprocess.run(command, check=True, env=env)
    return json.loads(out.read_text())


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_case(case: str, args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    workers = args.num_workers
    if workers is None:
        workers = int(measure("workers", case, args, workdir)["workers"])
    sides = (["kdplug", "hand0"] + (["hand"] if workers else [])
             + (["before"] if args.before_src else []))
    runs: Dict[str, List[Dict[str, Any]]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side in (sides if repeat % 2 == 0 else list(reversed(sides))):
            hand_workers = 0 if side == "hand0" else workers
            result = measure("hand" if side.startswith("hand") else side, case, args, workdir,
                             hand_workers if side.startswith("hand") else args.num_workers)
            runs[side].append(result)
            print(f"  {case} repeat {repeat + 1} {side:<6} epochs "
                  + " ".join(f"{1000 * t:.0f}" for t in result["epoch_s"]) + " ms", flush=True)
    summary: Dict[str, Any] = {"case": case, "workers": workers}
    for side, results in runs.items():
        epochs = [t for r in results for t in r["epoch_s"]]
        parts = {part: median([t for r in results for t in r["breakdown"].get(part, [])])
                 for part in BREAKDOWN}
        summary[side] = {"epoch_ms": 1000 * median(epochs), "epochs": len(epochs),
                         **{f"{part}_ms": 1000 * parts[part] for part in BREAKDOWN}}
    return summary


def print_summary(summary: Dict[str, Any]) -> None:
    case, workers = summary["case"], summary["workers"]
    labels = {"kdplug": f"kdplug ({workers} workers)", "hand0": "hand loop (0 workers)",
              "hand": f"hand loop ({workers} workers)", "before": "kdplug before"}
    print(f"\n{case}: median epoch (ms), and its parts (medians)")
    print(f"  {'':<24}{'epoch':>9}{'data':>9}{'step':>9}{'eval':>9}{'ckpt':>9}")
    for side in ("kdplug", "hand0", "hand", "before"):
        if side not in summary:
            continue
        row = summary[side]
        cells = "".join("        -" if math.isnan(row[f"{p}_ms"]) else f"{row[f'{p}_ms']:9.1f}"
                        for p in BREAKDOWN)
        print(f"  {labels[side]:<24}{row['epoch_ms']:9.1f}{cells}   ({row['epochs']} epochs)")
    kd = summary["kdplug"]["epoch_ms"]
    hands = [summary[side]["epoch_ms"] for side in ("hand0", "hand") if side in summary]
    ratio = kd / min(hands)
    same = (f", (same workers) x{kd / summary['hand']['epoch_ms']:.2f}" if "hand" in summary
            else "")
    print(f"  kdplug / hand loop (0 workers) x{kd / summary['hand0']['epoch_ms']:.2f}{same}; "
          f"against the faster: x{ratio:.2f} "
          f"({'meets' if ratio <= GOAL else 'misses'} the goal <= {GOAL})")
    if "before" in summary:
        before = summary["before"]["epoch_ms"]
        print(f"  before -> after: {before:.1f} ms -> {kd:.1f} ms per epoch "
              f"(x{before / kd:.1f} faster); before / hand loop (0 workers) "
              f"x{before / summary['hand0']['epoch_ms']:.2f}")


def child(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    if args.child == "hand":
        result = run_hand(args.case, args, workdir, args.num_workers or 0)
    elif args.child == "workers":
        result = {"workers": kdplug_default_workers(args.case, args, workdir)}
    else:
        result = run_kdplug(args.case, args, workdir)
    Path(args.result).write_text(json.dumps(result))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is "
                                                              "left out)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers for both sides (default: kdplug's choice)")
    parser.add_argument("--cifar-train", type=int, default=1280, help="generated CIFAR images")
    parser.add_argument("--lm-articles", type=int, default=12, help="BBC News articles (lm)")
    parser.add_argument("--before-src", default=None, help="another kdplug source tree to time")
    parser.add_argument("--json", default=None, help="also write the summaries here")
    parser.add_argument("--child", choices=["kdplug", "hand", "before", "workers"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per "
          f"side, {args.epochs} epochs per run (first left out), {args.repeats} repeats")
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_cifar(workdir / "cifar", args.cifar_train, 256)
        for case in (CASES if args.case == "all" else [args.case]):
            if case == "items":
                bench_items(args)
                continue
            summary = bench_case(case, args, workdir)
            print_summary(summary)
            summaries.append(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
