"""The run's strategy by name: ``--strategy ddp`` (one process alone) or ``fsdp``."""
from __future__ import annotations

from .distributed import DistEnv
from .strategy import DDPStrategy, Strategy

__all__ = ["make_strategy"]


def make_strategy(name: str, env: DistEnv, amp: str = "none") -> Strategy:
    """The strategy ``name`` ("ddp" or "fsdp") for this process; "ddp" alone is one process.
    FSDP (and its imports) load only when asked for."""
    if name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(env, amp)
    return DDPStrategy(env) if env.distributed else Strategy(env)
