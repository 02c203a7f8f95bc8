"""The distillation engine: ``kdplug.distill`` and the pieces it is made of.

- :mod:`.config`      DistillConfig: defaults, TOML files, options, validation
- :mod:`.run`         distill(): set-up checks, teacher / student / scratch phases, the report
- :mod:`.loop`        Trainer (one step) and PhaseRun (epochs, checkpoints, progress)
- :mod:`.evaluate`    metrics by task (classification, lm), inference timing
- :mod:`.batching`    batch dicts, model calls, deterministic data order
- :mod:`.checkpoint`  atomic checkpoints, RNG state
- :mod:`.distributed` torchrun / DistributedDataParallel helpers
- :mod:`.report`      metrics.jsonl, report.json, curves.png, the summary table
"""
from .config import ConfigError, DistillConfig, load_config_file, parse_option, resolve_config
from .loop import NonFiniteLossError, Trainer
from .run import DistillResult, PhaseResult, distill

__all__ = ["distill", "DistillConfig", "DistillResult", "PhaseResult", "ConfigError",
           "NonFiniteLossError", "Trainer", "load_config_file", "parse_option", "resolve_config"]
