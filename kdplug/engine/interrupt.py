"""Stopping a run on SIGTERM or SIGINT (a cluster's preemption, Ctrl-C) without losing it.

While :func:`kdplug.distill` runs, the first SIGTERM or SIGINT only sets a flag: the training loop
finishes the optimizer step it is in, writes a full checkpoint (the atomic writer), records
``interrupted`` in the run's ``status.json`` and raises :class:`RunInterrupted`, whose message says
what was saved and how to resume; the CLI exits with 128 + the signal's number (130 for Ctrl-C,
143 for SIGTERM). A second signal ends the process at once, by the signal's default action.

Under torchrun every process must stop after the same step (the checkpoint is a collective), so
the processes agree on the flag every few optimizer steps (``loop.STOP_CHECK_STEPS``): a
one-number all-reduce on the CPU (gloo), read at the next check (no process waits for it), so
there the run stops up to twice that many steps after the signal.
Handlers are installed only from the main thread (Python delivers signals there alone).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

import torch

from ..errors import KdplugError
from .distributed import DistEnv

__all__ = ["RunInterrupted", "StopSignals", "STOP_SIGNALS", "ignore_ctrl_c"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(KdplugError):
    """The run stopped on a signal after checkpointing; ``exit_status`` is 128 + its number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """A context manager: SIGTERM/SIGINT ask the run to stop at the next step's end."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}
        self._group: Any = None
        self._pending: Any = None  # under torchrun: the all-reduce of the flag in flight

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: stop now, as if kdplug caught none
            self._restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\nkdplug: {signal.Signals(signum).name} received: finishing the current step, "
              "then saving a checkpoint (send it again to stop at once)", file=sys.stderr,
              flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, env: DistEnv) -> Optional[int]:
        """The signal that stops every process after this step (None: go on). Under torchrun
        a collective: every process calls it at the same points (every few optimizer steps,
        at each epoch's end and phase's start).

        There the answer is the all-reduce started by the previous call, which has had steps
        to finish: nobody waits for a round trip, and every process still reads the same value
        at the same point."""
        if not env.distributed:
            return self.signum
        import torch.distributed as dist

        if self._group is None:  # the flag never waits for a GPU: a CPU group beside nccl
            self._group = (dist.new_group(backend="gloo") if dist.get_backend() != "gloo"
                           else dist.group.WORLD)
        value = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            value = int(flag)
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group,
                                         async_op=True), flag)
        if value and self.signum is None:
            self.signum = value  # another process was signalled: stop with it
        return value or None


def ignore_ctrl_c(worker_id: int = 0) -> None:
    """A DataLoader worker's start: a terminal's Ctrl-C reaches every process of its group, and
    the training process decides when to stop; its workers end with their loader. (SIGTERM stays
    as it is: multiprocessing ends workers with it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
