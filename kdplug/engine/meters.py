"""What an epoch measures without slowing it down: the running training loss, kept on the device,
and where the epoch's time goes.

Reading a GPU tensor's value makes the host wait for every kernel queued before it: one read per
step would stall the pipeline that keeps the GPU busy. :class:`RunningLoss` adds each step's loss
to a device tensor and is read only when someone looks (the progress bar, a checkpoint, the
epoch's record).
"""
from __future__ import annotations

import time
from typing import Dict

import torch

from .distributed import DistEnv

__all__ = ["RunningLoss", "EpochClock", "EPOCH_PARTS"]

#: the parts of an epoch's time, as the records name them (``<part>_time_s``)
EPOCH_PARTS = ("data", "step", "eval", "checkpoint")


class RunningLoss:
    """The summed training loss of an epoch's steps (float64, where the loss is) and their count.

    Under torchrun each process sums its own losses; :meth:`global_sum` adds them up (a
    collective: every process calls it at the same step) and divides by the number of processes,
    so it is the sum of the steps' process-averaged losses.
    """

    def __init__(self, device: torch.device) -> None:
        self._total = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0
        self.read_at = 0  # the step count when the sum was last read

    def restart(self, total: float = 0.0, steps: int = 0) -> None:
        """From ``total`` (a :meth:`global_sum`, as a checkpoint keeps it) over ``steps``."""
        self._total.fill_(total)
        self.steps = self.read_at = steps

    def add(self, loss: torch.Tensor) -> None:
        self._total += loss.detach().reshape(())
        self.steps += 1

    def local_mean(self) -> float:
        """This process's mean so far (one read; for display)."""
        return float(self._total) / max(self.steps, 1)

    def global_sum(self, env: DistEnv) -> float:
        total = self._total.clone()
        env.all_reduce_sum(total)
        self.read_at = self.steps
        return float(total) / env.world_size


class EpochClock:
    """Seconds spent on each part of an epoch (:data:`EPOCH_PARTS`): ``tick(part)`` charges the
    time since the previous tick to ``part``.

    Without a read of the GPU's results per step, a step's kernels may still run while the next
    batch is fetched; the parts then split the epoch's wall time only roughly, the total is exact.
    """

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = dict.fromkeys(EPOCH_PARTS, 0.0)
        self._last = time.perf_counter()

    def tick(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now

    def record(self) -> Dict[str, float]:
        return {f"{part}_time_s": round(value, 4) for part, value in self.seconds.items()}
