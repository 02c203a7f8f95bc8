"""Start-up: how long kdplug's commands take before (and around) their real work.

    python benchmarks/bench_startup.py                 # 5 interleaved repeats of everything
    python benchmarks/bench_startup.py --repeats 3 --no-run

Every command runs in a fresh interpreter, as a user starts it, and the rounds are interleaved
(one of each, then again) so that a machine's changing load hits all alike; the medians are
compared with the same round's ``python -c "import torch"``, the floor of any command that
touches a tensor. Goals: ``kdplug plugins`` and ``kdplug doctor`` within 1.5x of that floor;
a 1-epoch digits run's fixed overhead (its wall time less the time its phases spent in epochs)
under 3 s.

The fixed overhead of a run is printed whole and beyond two floors: ``import torch``, and
``import torch`` plus a first optimizer, which any PyTorch training script pays (torch.optim
imports torch._dynamo when an optimizer is made). What is left is kdplug's own: plugins, data,
models, the dry run, inference timing, report and curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

KDPLUG = [sys.executable, "-m", "kdplug"]
TRAINING_FLOOR = "import torch + an optimizer"
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    # any PyTorch training script pays this: torch.optim imports torch._dynamo on first use
    TRAINING_FLOOR: [sys.executable, "-c", "import torch; "
                     "torch.optim.AdamW([torch.zeros(1, requires_grad=True)])"],
    "import kdplug": [sys.executable, "-c", "import kdplug"],
    "kdplug --help": KDPLUG + ["--help"],
    "kdplug plugins": KDPLUG + ["plugins"],
    "kdplug doctor": KDPLUG + ["doctor"],
}
RUN = KDPLUG + ["distill", "--teacher", "cnn-teacher", "--student", "cnn-student", "--data",
                "digits", "--epochs", "1", "--teacher-epochs", "1", "--threads", "1", "--quiet",
                "--json"]
FLOOR = "import torch"


def timed(command: List[str]) -> tuple:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr}")
    return seconds, proc.stdout


def _env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # a run's epochs use one thread (--threads 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-run", action="store_true", help="Skip the 1-epoch digits run.")
    args = parser.parse_args()
    times: Dict[str, List[float]] = {name: [] for name in COMMANDS}
    run_wall: List[float] = []
    run_epochs: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, command in COMMANDS.items():
                times[name].append(timed(command)[0])
            if not args.no_run:
                seconds, out = timed(RUN + ["--out", str(Path(tmp) / f"run{r}")])
                report = json.loads(out)
                run_wall.append(seconds)
                run_epochs.append(sum(report[p]["train_time_s"] for p in ("teacher", "student")))
            print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    floor = statistics.median(times[FLOOR])
    print(f"median of {args.repeats} interleaved rounds (each command in a fresh interpreter)")
    print(f"{'command':<48}{'seconds':>9}{'x import torch':>16}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<48}{median:>9.2f}{median / floor:>15.2f}x")
    if run_wall:
        overheads = [w - e for w, e in zip(run_wall, run_epochs)]
        overhead = statistics.median(overheads)
        print(f"{'distill digits, 1+1 epochs: wall':<48}{statistics.median(run_wall):>9.2f}"
              f"{statistics.median(run_wall) / floor:>15.2f}x")
        print(f"{'  in epochs (teacher + student)':<48}{statistics.median(run_epochs):>9.2f}")
        print(f"{'  fixed overhead (wall - epochs)':<48}{overhead:>9.2f}{overhead / floor:>15.2f}x")
        for floor_name in (FLOOR, TRAINING_FLOOR):
            beyond = statistics.median([o - f for o, f in zip(overheads, times[floor_name])])
            print(f"{'  overhead beyond ' + floor_name:<48}{beyond:>9.2f}"
                  f"{beyond / floor:>15.2f}x")
    goals = [("kdplug plugins", 1.5), ("kdplug doctor", 1.5)]
    for name, limit in goals:
        ratio = statistics.median(times[name]) / floor
        print(f"goal: {name} <= {limit}x import torch: {ratio:.2f}x "
              f"({'met' if ratio <= limit else 'NOT met'})")
    if run_wall:
        met = "met" if overhead < 3 else "NOT met"
        print(f"goal: fixed overhead < 3 s: {overhead:.2f} s ({met} on this machine)")


if __name__ == "__main__":
    main()
