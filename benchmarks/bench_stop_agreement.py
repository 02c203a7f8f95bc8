"""The cost of preemption safety under torchrun: the processes agree on whether a SIGTERM/SIGINT
arrived every STOP_CHECK_STEPS optimizer steps (a one-number all-reduce on the CPU, gloo, read at
the next check), so that all stop after the same step. This measures DDP steps of a small model
with and without that agreement in the same run, and prints the overhead.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_stop_agreement.py [--steps 300]

Goal: the agreement adds under 5% to even a small model's DDP step (its cost does not grow with
the model). Rank 0 prints; the rounds interleave the two loops so that a changing machine load
hits both alike.
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
from kdplug.engine.loop import STOP_CHECK_STEPS


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

    def steps(agree: bool) -> float:
        env.barrier()
        start = time.perf_counter()
        for step in range(args.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if agree and step % STOP_CHECK_STEPS == 0:  # as PhaseRun asks
                stop.agreed(env)
        return (time.perf_counter() - start) / args.steps

    plain_s, agreed_s = [], []
    for _ in range(args.rounds):
        plain_s.append(steps(False))
        agreed_s.append(steps(True))
    if env.is_main:
        plain, agreed = statistics.median(plain_s), statistics.median(agreed_s)
        print(f"world size {env.world_size}, {torch.get_num_threads()} thread(s) per process, "
              f"medians of {args.rounds} rounds of {args.steps} steps")
        print(f"DDP step (Linear 256-512-10, batch 64):           {plain * 1e6:8.1f} us")
        print(f"DDP step + the stop agreement (async all-reduce): {agreed * 1e6:8.1f} us")
        print(f"overhead: {agreed / plain - 1:+.1%} (goal: under 5%)")
    dist.barrier()
    env.teardown()


if __name__ == "__main__":
    main()
