"""The demo's distillation (kdplug demo) over several seeds: teacher, scratch and distilled student
test accuracy as mean ± std, and how often distillation beat / matched / lost to scratch.

    python benchmarks/bench_digits.py                  # seeds 0, 1, 2; the demo's settings
    python benchmarks/bench_digits.py --seeds 0 1 2 3 4 --epochs 20
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from kdplug.engine.demo import DEMO_CONFIG
from kdplug.engine.run import distill


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    config = dict(DEMO_CONFIG)
    if args.epochs is not None:
        config["epochs"] = config["teacher_epochs"] = args.epochs
    for key in ("temperature", "alpha"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    print(f"digits, {config['teacher']} -> {config['student']}, epochs {config['epochs']}, "
          f"T={config['temperature']}, alpha={config['alpha']}, seeds {args.seeds}")
    rows = {"teacher": [], "scratch": [], "student": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            result = distill(**{**config, "seed": seed}, out=f"{tmp}/seed{seed}",
                             device=args.device, quiet=True)
            for phase in rows:
                rows[phase].append(100 * getattr(result, phase).accuracy)
            print(f"  seed {seed}: teacher {rows['teacher'][-1]:.2f}%  scratch "
                  f"{rows['scratch'][-1]:.2f}%  distilled {rows['student'][-1]:.2f}%", flush=True)
    print(f"over {len(args.seeds)} seeds ({time.perf_counter() - started:.0f} s):")
    for phase, label in (("teacher", "teacher"), ("scratch", "student (scratch)"),
                         ("student", "student (distilled)")):
        values = rows[phase]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {label:<20} {statistics.mean(values):6.2f}% ± {std:.2f}")
    gains = [d - s for d, s in zip(rows["student"], rows["scratch"])]
    print(f"  distilled - scratch  {statistics.mean(gains):+6.2f} points (per seed: "
          f"{', '.join(f'{g:+.2f}' for g in gains)}); beat {sum(g > 0 for g in gains)}, "
          f"matched {sum(g == 0 for g in gains)}, lost {sum(g < 0 for g in gains)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
