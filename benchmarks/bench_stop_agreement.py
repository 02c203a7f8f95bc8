"""The cost of preemption safety under torchrun: after each optimizer step the processes agree
on whether a SIGTERM/SIGINT arrived (a one-number all-reduce on the CPU, gloo), so that all
stop after the same step. This measures that agreement against a DDP step of a small model in
the same run, and prints the ratio.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_stop_agreement.py [--steps 300]

Goal: the agreement costs under 5% of even a small model's DDP step (the models kdplug trains
are larger; the agreement's cost does not grow with them). Rank 0 prints; the rounds interleave
the two measurements so that a changing machine load hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kdplug.engine.distributed import setup
from kdplug.engine.interrupt import StopSignals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = setup("cpu")
    if not env.distributed:
        raise SystemExit("run it under torchrun --nproc_per_node=2")
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
    stop = StopSignals()
    step_s, agree_s = [], []
    for _ in range(args.rounds):
        env.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        step_s.append((time.perf_counter() - start) / args.steps)
        env.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            stop.agreed(env)
        agree_s.append((time.perf_counter() - start) / args.steps)
    if env.is_main:
        step, agree = statistics.median(step_s), statistics.median(agree_s)
        print(f"world size {env.world_size}, {torch.get_num_threads()} thread(s) per process, "
              f"medians of {args.rounds} rounds of {args.steps}")
        print(f"DDP step (Linear 256-512-10, batch 64): {step * 1e6:8.1f} us")
        print(f"stop agreement (all-reduce of 1 int): {agree * 1e6:8.1f} us")
        print(f"agreement / step: {agree / step:.1%} (goal: under 5%)")
    dist.barrier()
    env.teardown()


if __name__ == "__main__":
    main()
