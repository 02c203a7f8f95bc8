"""torchrun support: one process per device, DistributedDataParallel, rank 0 writes.

Launched by ``torchrun --nproc_per_node=K`` (WORLD_SIZE > 1 in the environment), the engine joins
the process group torchrun describes (gloo on CPU, nccl on CUDA) with the standard
``init_process_group``; nothing here builds process groups by hand. Single-process runs skip all of
it: every helper is then a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Type

import torch
import torch.distributed as dist

from ..errors import KdplugError

__all__ = ["DistEnv", "setup", "resolve_device"]


def resolve_device(device: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """'auto' -> cuda when available, else cpu; a clear error for cuda without a GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KdplugError(f"device {device!r} asked for, but torch sees no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu")
        if device == "cuda":
            index = local_rank if distributed else torch.cuda.current_device()
            device = f"cuda:{index}"
    return torch.device(device)


@dataclass
class DistEnv:
    """Where this process stands: rank, world size, device; helpers that are no-ops alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums a tensor over processes in place (and returns it)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box: List[Any] = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, action: Callable[[], Any], error: Type[KdplugError] = KdplugError) -> None:
        """``action()`` on rank 0 alone (writing a run's first files); a KdplugError it raises
        is raised on every process (as ``error`` elsewhere), so none waits for a failed one."""
        problem = None
        if self.is_main:
            try:
                action()
            except KdplugError as exc:
                problem = exc
        message = self.broadcast(None if problem is None else str(problem))
        if problem is not None:
            raise problem
        if message is not None:
            raise error(message)

    def any_true(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any (e.g. to fail together)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device)
        self.all_reduce_sum(t)
        return bool(t.item() > 0)

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def teardown(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized_here = False


def setup(device: str = "auto") -> DistEnv:
    """The process's DistEnv; joins torchrun's process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank, distributed=True)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        kwargs = {"device_id": target} if target.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        initialized_here = True
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=target, initialized_here=initialized_here)

