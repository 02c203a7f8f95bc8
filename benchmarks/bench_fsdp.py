"""Peak memory per process: ``--strategy ddp`` against ``--strategy fsdp``, the Transformer LM pair.

Each run is ``torchrun --nproc_per_node=K`` (K = 2 by default) of the same ``kdplug.distill``:
the LM teacher (not trained here, ``teacher_epochs=0``: a teacher that is only run) and the LM
student distilled with kd+ce, AdamW, on BBC News articles (byte tokens), one epoch of a few steps,
one torch thread per process, CPU (gloo). Only ``strategy`` differs between the two sides. Every
process reads its resident set (``/proc/self/status``) at four points:

  before    just before ``kdplug.distill``, after a warm-up run of the same with tiny models (what
            the run imports — plugins, FSDP or DDP, the report's matplotlib — is in already)
  setup     the high-water mark up to the first student step's end: data, models built (FSDP
            builds each model whole on the CPU, then shards it), the first step (optimizer state)
  training  the high-water mark over the later steps (reset with ``/proc/self/clear_refs`` after
            the first): what training holds
  end       the high-water mark to the run's end (evaluation, the report, the last checkpoint)

and the figures are growths over ``before``, the larger of the K processes, medians over the
repeats (interleaved: ddp fsdp, fsdp ddp, …). The prediction is the memory formula of
docs/fsdp.md, from the models' own parameter counts (fp32, AdamW):

    ddp   4·P_t + 20·P_s                    (student: weights, gradients, 2 Adam moments, DDP's
                                            gradient buckets; the teacher's weights)
    fsdp  (4·P_t + 16·P_s)/K + gathered     (gathered: the whole tensors of the units being run,
                                            at most a model's root and two units at a time)

Activations, the data and the runtime come on top, the same on both sides. glibc's malloc gets a
fixed mmap threshold in the workers, so that freed tensors leave the resident set on both sides
alike (its adaptive threshold would keep some in the heap, differently from run to run).

    python benchmarks/bench_fsdp.py                  # K=2, the default sizes, 2 repeats
    python benchmarks/bench_fsdp.py --nproc 4 --teacher-d 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

STRATEGIES = ("ddp", "fsdp")
POINTS = ("setup", "training", "end")
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- the workers

def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: its high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """VmHWM back to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def distill_options(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    return dict(
        teacher="transformer-lm-teacher", student="transformer-lm-student",
        teacher_options=dict(num_layers=args.teacher_layers, d_model=args.teacher_d,
                             num_heads=args.teacher_d // 64),
        student_options=dict(num_layers=args.student_layers, d_model=args.student_d,
                             num_heads=args.student_d // 64),
        data="bbc-news-lm", data_options={"limit": args.articles, "seq_len": args.seq_len},
        loss="kd+ce", temperature=2.0, alpha=0.5, epochs=1, teacher_epochs=0,
        batch_size=args.batch_size, eval_batch_size=args.batch_size, lr=1e-3, seed=0,
        threads=1, device="cpu", quiet=True, out=str(out))


def worker(args: argparse.Namespace) -> None:
    """One process of a torchrun launch: a distillation run with the memory readings."""
    import torch.distributed as dist

    import kdplug

    dist.init_process_group("gloo")  # one group for both runs (kdplug.distill joins it)
    rank = dist.get_rank()
    tiny = argparse.Namespace(**{**vars(args), "teacher_layers": 1, "teacher_d": 64,
                                 "student_layers": 1, "student_d": 64})
    kdplug.distill(**distill_options(tiny, Path(f"{args.out}-warm-up")), strategy=args.strategy)
    readings: Dict[str, Any] = {"before": status_kib("VmRSS"), "steps": 0}

    class Meter:
        def on_step(self, phase: str, epoch: int, step: int, loss: float) -> None:
            if phase != "student":
                return
            readings["steps"] = step
            if step == 1:
                readings["setup"] = status_kib("VmHWM")
                reset_peak()
            else:
                readings["training"] = status_kib("VmHWM")

    kdplug.distill(**distill_options(args, Path(args.out)), strategy=args.strategy,
                   callbacks=[Meter()])
    readings["end"] = status_kib("VmHWM")
    dist.destroy_process_group()
    Path(f"{args.result}.{rank}").write_text(json.dumps(readings))


# ----------------------------------------------------------------------------- the prediction

def parameter_counts(args: argparse.Namespace) -> Dict[str, Dict[str, int]]:
    """Per model: all parameters, the root's own (outside every shard unit), the largest unit."""
    import torch

    import kdplug
    from kdplug.engine.shard_units import shard_units

    facts = {"vocab_size": 259, "max_len": args.seq_len}  # byte tokens
    options = distill_options(args, Path("."))
    counts = {}
    with torch.device("meta"):  # sizes only, no memory
        models = {"teacher": kdplug.create_teacher(options["teacher"],
                                                   **options["teacher_options"], **facts),
                  "student": kdplug.create_student(options["student"],
                                                   **options["student_options"], **facts)}
    for role, model in models.items():
        units = [sum(p.numel() for p in unit.parameters()) for _, unit in shard_units(model)]
        total = sum(p.numel() for p in model.parameters())
        counts[role] = {"total": total, "root": total - sum(units), "unit": max(units)}
    return counts


def predicted_bytes(strategy: str, counts: Dict[str, Dict[str, int]], k: int) -> float:
    t, s = counts["teacher"], counts["student"]
    if strategy == "ddp":
        return 4 * t["total"] + 20 * s["total"]
    gathered = max(4 * (t["root"] + 2 * t["unit"]),  # the teacher's forward
                   4 * s["root"] + 8 * 2 * s["unit"])  # the student's backward: weights + grads
    return (4 * t["total"] + 16 * s["total"]) / k + gathered


# ----------------------------------------------------------------------------- the driver

def launch(strategy: str, args: argparse.Namespace, workdir: Path, index: int) -> List[Dict]:
    """One torchrun launch of ``args.nproc`` workers; each process's readings."""
    result = workdir / f"result-{strategy}-{index}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", __file__, "--worker", "--strategy", strategy,
               "--result", str(result), "--out", str(workdir / f"run-{strategy}-{index}"),
               *forwarded(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(args.nproc)]


SIZES = ("teacher_layers", "teacher_d", "student_layers", "student_d", "seq_len", "batch_size",
         "articles")


def forwarded(args: argparse.Namespace) -> List[str]:
    return [item for name in SIZES for item in (f"--{name.replace('_', '-')}",
                                                str(getattr(args, name)))]


def growth_mib(readings: List[Dict[str, Any]], point: str) -> float:
    """The largest growth over its own ``before`` among the processes, in MiB."""
    return max(r[point] - r["before"] for r in readings) / 1024


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (K)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per strategy, interleaved")
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--teacher-d", type=int, default=768, help="teacher d_model (64 a head)")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--student-d", type=int, default=384, help="student d_model")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch")
    parser.add_argument("--articles", type=int, default=4, help="BBC News articles (the data)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch

    counts = parameter_counts(args)
    t, s = counts["teacher"]["total"], counts["student"]["total"]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.nproc} processes (gloo, one "
          f"thread each), {args.repeats} repeats; teacher {args.teacher_layers}x{args.teacher_d} "
          f"P_t={t / 1e6:.1f}M, student {args.student_layers}x{args.student_d} "
          f"P_s={s / 1e6:.1f}M, global batch {args.batch_size} x {args.seq_len} tokens")
    runs: Dict[str, List[List[Dict[str, Any]]]] = {name: [] for name in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for strategy in (STRATEGIES if repeat % 2 == 0 else reversed(STRATEGIES)):
                readings = launch(strategy, args, Path(tmp), repeat)
                runs[strategy].append(readings)
                print(f"  repeat {repeat + 1} {strategy:<4} growth MiB (largest process): "
                      + ", ".join(f"{p} {growth_mib(readings, p):.0f}" for p in POINTS)
                      + f"; {readings[0]['steps']} student steps", flush=True)
    summary: Dict[str, Any] = {"nproc": args.nproc, "counts": counts}
    print(f"\npeak resident-set growth per process, MiB (median of {args.repeats}); "
          "prediction: model state from the formula")
    print(f"  {'':<6}{'setup':>9}{'training':>10}{'end':>9}{'predicted':>11}")
    for strategy, results in runs.items():
        row = {p: statistics.median(growth_mib(r, p) for r in results) for p in POINTS}
        row["predicted"] = predicted_bytes(strategy, counts, args.nproc) / MIB
        summary[strategy] = row
        print(f"  {strategy:<6}" + "".join(f"{row[p]:{w}.0f}" for p, w in
                                           zip((*POINTS, "predicted"), (9, 10, 9, 11))))
    ddp, fsdp = summary["ddp"], summary["fsdp"]
    print(f"  fsdp / ddp: training x{fsdp['training'] / ddp['training']:.2f}, run end "
          f"x{fsdp['end'] / ddp['end']:.2f}, setup x{fsdp['setup'] / ddp['setup']:.2f} "
          f"(predicted model state x{fsdp['predicted'] / ddp['predicted']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
