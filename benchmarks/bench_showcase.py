"""The showcase recipe (recipes/digits-showcase.toml, what `kdplug demo` runs) over several
seeds: teacher, scratch and distilled student test accuracy as mean ± std, and how much of the
teacher-scratch gap distillation closes.

    python benchmarks/bench_showcase.py                 # seeds 0, 1, 2
    python benchmarks/bench_showcase.py --seeds 0 1 2 3 4 --epochs 600
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from kdplug.engine import distill
from kdplug.recipes import find_recipe


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-showcase")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the "
                                                                 "recipe's)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    recipe = find_recipe(args.recipe)
    overrides = {} if args.epochs is None else {"epochs": args.epochs}
    print(f"{recipe.name}: {recipe.summary}; seeds {args.seeds}", flush=True)
    rows = {"teacher": [], "scratch": [], "student": []}
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            started = time.perf_counter()
            result = distill(config=str(recipe.path), seed=seed, out=f"{tmp}/seed{seed}",
                             device=args.device, quiet=True, **overrides)
            seconds.append(time.perf_counter() - started)
            for phase in rows:
                rows[phase].append(100 * getattr(result, phase).accuracy)
            print(f"  seed {seed}: teacher {rows['teacher'][-1]:.2f}%  scratch "
                  f"{rows['scratch'][-1]:.2f}%  distilled {rows['student'][-1]:.2f}%  "
                  f"({seconds[-1]:.0f} s)", flush=True)
    print(f"over {len(args.seeds)} seeds (median {statistics.median(seconds):.0f} s a run; the "
          "machine may be shared, so times are indicative):")
    for phase, label in (("teacher", "teacher"), ("scratch", "student (scratch)"),
                         ("student", "student (distilled)")):
        mean, std = _mean_std(rows[phase])
        print(f"  {label:<20} {mean:6.2f}% ± {std:.2f}")
    teacher, scratch, student = (statistics.mean(rows[p]) for p in ("teacher", "scratch",
                                                                     "student"))
    gap = teacher - scratch
    closed = [(d - s) / (t - s) for t, s, d in zip(rows["teacher"], rows["scratch"],
                                                    rows["student"]) if t > s]
    print(f"  teacher - scratch    {gap:+6.2f} points")
    if gap > 0:
        print(f"  gap closed           {(student - scratch) / gap:6.0%} of the mean gap (per "
              f"seed: {', '.join(f'{c:.0%}' for c in closed)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
