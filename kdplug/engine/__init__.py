"""The distillation engine: ``kdplug.distill`` and the pieces it is made of, one job a module.

- :mod:`.config`      DistillConfig: every option once (default, help), TOML files, validation
- :mod:`.run`         distill(): the procedure, start to end, calling the modules below
- :mod:`.components`  building the data, models and loss from the registry (or ready objects);
                      the one place a teacher checkpoint is loaded
- :mod:`.preflight`   the checks before any training: data sizes, the dry run on two samples
- :mod:`.run_folder`  the output folder: what it holds, --resume/--overwrite, records, config
- :mod:`.loaders`     the training and test loaders (seeded order, a teacher cache's targets)
- :mod:`.phases`      running one phase (train / resume / load / cached) into a PhaseResult
- :mod:`.loop`        Trainer (one step) and PhaseRun (epochs, checkpoints, progress)
- :mod:`.evaluate`    metrics by task (classification, lm), inference timing
- :mod:`.results`     PhaseResult, DistillResult
- :mod:`.report`      metrics.jsonl, report.json, config files, curves.png, the summary table
- :mod:`.batching`    batch dicts, model calls, deterministic data order
- :mod:`.checkpoint`  atomic checkpoints, RNG state
- :mod:`.distributed` torchrun / DistributedDataParallel helpers

Names load on first use, so that reading :mod:`.config` (the CLI does, to make its options)
does not import torch.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY_EXPORTS = {
    "distill": ".run", "DistillResult": ".results", "PhaseResult": ".results",
    "DistillConfig": ".config", "ConfigError": ".config", "load_config_file": ".config",
    "parse_option": ".config", "resolve_config": ".config",
    "NonFiniteLossError": ".loop", "Trainer": ".loop",
}

__all__ = ["distill", "DistillConfig", "DistillResult", "PhaseResult", "ConfigError",
           "NonFiniteLossError", "Trainer", "load_config_file", "parse_option", "resolve_config"]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY_EXPORTS, globals())  # PEP 562
