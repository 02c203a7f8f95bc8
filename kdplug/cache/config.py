"""cache-teacher's settings: every option once, with its default and help. ``kdplug.cache_teacher``
takes them as keywords and ``kdplug cache-teacher``'s options are made from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..engine.config import AMP_MODES
from ..errors import did_you_mean
from ..settings import declared_problem, setting, settings_of
from .errors import CacheError

__all__ = ["CacheConfig", "STORAGE_DTYPES"]

#: how dense logits (or top-k log-probabilities) can be stored
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CacheConfig:
    """What :func:`kdplug.cache_teacher` runs: the teacher over the data's training split, into
    ``out``. teacher and data are names, or a ready nn.Module and DataSplits from Python."""

    teacher: Any = setting(None, required=True,
                           help="Teacher name (or hf:PATH; `kdplug plugins` lists them).")
    data: Any = setting(None, required=True,
                        help="Data provider name (its training split is cached).")
    out: Any = setting(None, required=True, path="dir", help="Cache folder (new or empty).")
    teacher_checkpoint: Optional[str] = setting(
        None, path="file",
        help="The teacher's weights, e.g. checkpoints/teacher.pt of a `kdplug distill` run.")
    teacher_options: Dict[str, Any] = setting(default_factory=dict, flag="--teacher-option",
                                              metavar="KEY=VALUE",
                                              help="Teacher factory option (repeatable).")
    data_options: Dict[str, Any] = setting(
        default_factory=dict, flag="--data-option", metavar="KEY=VALUE",
        help="Data provider option (repeatable); use the same ones with `kdplug distill`.")
    dtype: str = setting("float32", choices=STORAGE_DTYPES,
                         help="Storage of dense logits (or top-k log-probabilities).")
    top_k: Optional[int] = setting(
        None, default_text="dense logits",
        help="Keep the K largest classes per row (indices + log-probabilities): for large "
             "vocabularies and token sequences.")
    chunk_size: int = setting(1024, help="Samples per chunk (the unit of writing, checksumming "
                                         "and --resume).")
    batch_size: int = setting(64, help="Teacher batch size.")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N.")
    amp: str = setting("none", choices=AMP_MODES, help="Run the teacher under autocast.")
    resume: bool = setting(False, help="Continue (or repair) the cache in --out: verified "
                                       "chunks are kept.")
    overwrite: bool = setting(False, help="Delete the cache in --out first.")
    allow_random_transforms: bool = setting(
        False, help="The training transform is random: cache --views augmented views per sample "
                    "(replayed exactly by `kdplug distill --teacher-cache` with the same --seed).")
    views: int = setting(1, help="Augmented views per sample (with --allow-random-transforms).")
    seed: int = setting(0, help="Seed of the augmented views (and of a teacher built from its "
                                "name).")
    evaluate_teacher: bool = setting(True, flag="--evaluate", negatable=True,
                                     help="Measure the teacher on the test split (kept in the "
                                          "manifest).")
    num_workers: int = setting(0, help="DataLoader workers.")
    threads: Optional[int] = setting(None, help="torch CPU threads.")
    quiet: bool = setting(False, help="No progress output.")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "CacheConfig":
        """Keyword options as a validated CacheConfig; an unknown one is named, with the closest
        known one."""
        names = [item.name for item in settings_of(cls)]
        for key in options:
            if key not in names:
                raise CacheError(f"unknown cache_teacher option {key!r}"
                                 f"{did_you_mean(key, names)} Known options: "
                                 f"{', '.join(names)}")
        return cls(**options).validate()

    def validate(self) -> "CacheConfig":
        missing = [n for n in ("teacher", "data", "out") if getattr(self, n) is None]
        if missing:
            raise CacheError(f"cache_teacher needs a teacher, data and an output folder; "
                             f"missing: {', '.join(missing)}")
        problem = declared_problem(self)
        if problem:
            name, expected = problem
            raise CacheError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        for name, low in (("chunk_size", 1), ("batch_size", 1), ("views", 1), ("seed", 0),
                          ("num_workers", 0), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise CacheError(f"{name} must be an int >= {low}, got {value!r}")
        if self.top_k is not None and self.top_k < 1:
            raise CacheError(f"top_k must be an int >= 1, got {self.top_k!r}; to cache dense "
                             "logits (every class), leave --top-k out")
        if self.resume and self.overwrite:
            raise CacheError("resume and overwrite exclude each other: resume continues the "
                             "cache, overwrite rebuilds it")
        return self
