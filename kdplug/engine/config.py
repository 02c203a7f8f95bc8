"""The run's settings: defaults, a TOML file, explicit options (in that order of precedence).

Every key of :class:`DistillConfig` can be set in a TOML file (``kdplug distill --config run.toml``,
``kdplug.distill(config="run.toml")``), as a keyword of :func:`kdplug.distill`, or as a CLI flag
(``teacher_epochs`` is ``--teacher-epochs``). Options for the factories are tables::

    teacher = "cnn-teacher"
    epochs = 5
    [data_options]
    root = "data"

An unknown key or a value of the wrong type is a :class:`kdplug.KdplugError` that names the key
(and the file it came from), raised before anything is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import KdplugError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = ["DistillConfig", "ConfigError", "load_config_file", "resolve_config",
           "parse_option", "parse_options", "OPTION_TABLES", "RESUME_IDENTITY_EXCLUDES",
           "to_toml"]

OPTIONAL_INT = "int or null"
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")
AMP_MODES = ("none", "bf16", "fp16")
OPTION_TABLES = ("teacher_options", "student_options", "data_options", "loss_options")
#: Keys that may change between a run and its --resume (they do not change what is computed).
RESUME_IDENTITY_EXCLUDES = frozenset({
    "out", "resume", "overwrite", "device", "quiet", "num_workers", "threads", "checkpoint_every",
    "eval_batch_size", "baseline", "teacher_cache_verify",
})
CACHE_VERIFY_MODES = ("full", "lazy", "size")


class ConfigError(KdplugError):
    """A bad configuration key or value; the message names it."""


@dataclass
class DistillConfig:
    """Everything a distillation run needs besides the objects themselves.

    teacher, student, data, loss: registry names (for ready objects: their class names, shown in
        reports only).
    temperature: T > 0 softening both sides' logits in the soft-target loss.
    alpha: weight of the soft-target term in [0, 1] (``kd+ce`` = α·kd + (1−α)·ce).
    epochs: student epochs (the distilled student and the scratch baseline alike).
    teacher_epochs: teacher epochs on the labels (default: ``epochs``; 0 uses the teacher as built).
    teacher_checkpoint: load the teacher from this file instead of training it.
    baseline: also train the student from scratch on the labels, same budget and seed.
    out: output folder (default ``runs/distill-<time>``); resume: continue the run in ``out``;
        overwrite: start over in an ``out`` that holds a run.
    batch_size: global batch (split across processes under torchrun); eval_batch_size likewise
        per process for evaluation.
    optimizer: adamw | adam | sgd; lr, teacher_lr (default lr), weight_decay, momentum (sgd).
    scheduler: cosine | linear | constant, per step, after warmup_steps of linear warm-up.
    grad_clip: max gradient norm (none by default).
    device: auto | cpu | cuda | cuda:N; amp: none | bf16 | fp16 (fp16: CUDA only, with a scaler).
    checkpoint_every: also checkpoint every N steps (0: at the end of each epoch only).
    threads: torch's intra-op CPU threads for the run (default: torch's own choice).
    teacher_cache: a folder written by ``kdplug cache-teacher``: the student learns from the
        teacher's cached outputs (no teacher phase, no teacher forward), after the cache is
        checked against this run (teacher, data, sample order, transform, format, checksums).
    teacher_cache_verify: full (every chunk's checksum before training) | lazy (each chunk's
        checksum when first read) | size (file sizes only).
    """

    teacher: Optional[str] = None
    student: Optional[str] = None
    data: Optional[str] = None
    loss: str = "kd+ce"
    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 10
    teacher_epochs: Optional[int] = None
    teacher_checkpoint: Optional[str] = None
    baseline: bool = False
    out: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 1e-3
    teacher_lr: Optional[float] = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "cosine"
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    device: str = "auto"
    amp: str = "none"
    num_workers: int = 0
    threads: Optional[int] = None
    checkpoint_every: int = 0
    quiet: bool = False
    teacher_cache: Optional[str] = None
    teacher_cache_verify: str = "full"
    teacher_options: Dict[str, Any] = field(default_factory=dict)
    student_options: Dict[str, Any] = field(default_factory=dict)
    data_options: Dict[str, Any] = field(default_factory=dict)
    loss_options: Dict[str, Any] = field(default_factory=dict)

    # -- derived
    @property
    def resolved_teacher_epochs(self) -> int:
        return self.epochs if self.teacher_epochs is None else self.teacher_epochs

    @property
    def resolved_teacher_lr(self) -> float:
        return self.lr if self.teacher_lr is None else self.teacher_lr

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> Dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_IDENTITY_EXCLUDES}

    def validate(self, sources: Optional[Mapping[str, str]] = None) -> "DistillConfig":
        """Checks every value; raises ConfigError naming the key (and the file it came from, given
        ``sources``: key -> file). Returns self."""
        sources = sources or {}

        def at(key: str) -> str:
            return f" (in {sources[key]})" if key in sources else ""

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"config key {key!r}{at(key)}: expected {expected}, "
                               f"got {getattr(self, key)!r}")

        for key in ("teacher", "student", "data", "teacher_checkpoint", "out", "teacher_cache"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise bad(key, "a string")
        if not isinstance(self.loss, str) or not self.loss:
            raise bad("loss", "a loss name")
        if _not_number(self.temperature) or not math.isfinite(self.temperature) \
                or self.temperature <= 0:
            raise ConfigError(f"temperature must be finite and > 0, got {self.temperature!r}"
                              f"{at('temperature')}"
                              " (T softens the logits as softmax(logits/T); 2..8 is usual)")
        if _not_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha!r}{at('alpha')} "
                              "(loss = alpha*kd + (1-alpha)*ce)")
        for key, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("seed", 0),
                         ("warmup_steps", 0), ("num_workers", 0), ("checkpoint_every", 0)):
            value = getattr(self, key)
            if _not_int(value) or value < low:
                raise bad(key, f"an int >= {low}")
        if self.teacher_epochs is not None and (_not_int(self.teacher_epochs)
                                                or self.teacher_epochs < 0):
            raise bad("teacher_epochs", "an int >= 0")
        if self.threads is not None and (_not_int(self.threads) or self.threads < 1):
            raise bad("threads", "an int >= 1")
        for key in ("lr", "teacher_lr", "grad_clip"):
            value = getattr(self, key)
            if value is None and key != "lr":
                continue
            if _not_number(value) or not math.isfinite(value) or value <= 0:
                raise bad(key, "a number > 0")
        for key in ("weight_decay", "momentum"):
            value = getattr(self, key)
            if _not_number(value) or not math.isfinite(value) or value < 0:
                raise bad(key, "a number >= 0")
        for key in ("baseline", "resume", "overwrite", "quiet"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        for key, choices in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS),
                             ("amp", AMP_MODES), ("teacher_cache_verify", CACHE_VERIFY_MODES)):
            if getattr(self, key) not in choices:
                raise bad(key, "one of " + ", ".join(choices))
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "auto, cpu, cuda or cuda:N")
        for key in OPTION_TABLES:
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise bad(key, "a table of name = value options")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run "
                              "in out, overwrite starts it over")
        return self


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _not_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float))


FIELD_NAMES: Tuple[str, ...] = tuple(f.name for f in fields(DistillConfig))
_FLOAT_FIELDS = {f.name for f in fields(DistillConfig) if f.type in ("float", "Optional[float]")}


def _normalize_key(key: str) -> str:
    return key.replace("-", "_")


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = f" in {source}" if source else ""
    return ConfigError(f"unknown config key {key!r}{where}{hint} Known keys: "
                       f"{', '.join(FIELD_NAMES)}")


def load_config_file(path: Any) -> Dict[str, Any]:
    """The keys of a TOML config file (hyphens in keys read as underscores); unknown keys raise."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    return check_keys(raw, source=str(path))


def check_keys(raw: Mapping[str, Any], source: str = "") -> Dict[str, Any]:
    """Normalized keys of a mapping of config values; unknown keys raise, naming the key."""
    values: Dict[str, Any] = {}
    for key, value in raw.items():
        name = _normalize_key(str(key))
        if name not in FIELD_NAMES:
            raise _unknown_key(str(key), source)
        if name in OPTION_TABLES and isinstance(value, Mapping):
            value = {_normalize_key(str(k)): v for k, v in value.items()}
        values[name] = value
    return values


def resolve_config(config: Any = None, **options: Any) -> DistillConfig:
    """Defaults < ``config`` (a TOML path, a mapping or a DistillConfig) < ``options``.

    ``options`` left at None do not override. The ``*_options`` tables merge key by key (explicit
    options win). The result is validated.
    """
    source = ""
    if config is None:
        base: Dict[str, Any] = {}
    elif isinstance(config, DistillConfig):
        base = config.to_dict()
    elif isinstance(config, Mapping):
        base = check_keys(config, source="config")
        source = "config"
    elif isinstance(config, (str, Path)):
        base = load_config_file(config)
        source = str(config)
    else:
        raise ConfigError(f"config must be a TOML file path, a mapping or a DistillConfig, "
                          f"got {type(config).__name__}")
    explicit = check_keys({k: v for k, v in options.items() if v is not None})
    merged = dict(base)
    for key, value in explicit.items():
        if key in OPTION_TABLES and isinstance(value, Mapping) and isinstance(merged.get(key),
                                                                             Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    for key in _FLOAT_FIELDS:  # TOML/CLI ints where floats are meant: 4 -> 4.0
        if _not_int(merged.get(key)) is False:
            merged[key] = float(merged[key])
    for key in OPTION_TABLES:
        if isinstance(merged.get(key), Mapping):
            merged[key] = dict(merged[key])
    cfg = DistillConfig(**merged)
    sources = {key: source for key in base if key not in explicit} if source else {}
    return cfg.validate(sources)


def parse_option(text: str, flag: str = "--option") -> Tuple[str, Any]:
    """``key=value`` -> (key, value); the value reads as TOML (42, 0.5, true, "x", [1, 2]) and
    otherwise as a plain string (``root=data/cifar`` is the string ``"data/cifar"``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{flag} expects key=value, got {text!r}")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return _normalize_key(key), parsed


def parse_options(items: Iterable[str], flag: str = "--option") -> Dict[str, Any]:
    return dict(parse_option(item, flag) for item in items)


def to_toml(values: Mapping[str, Any]) -> str:
    """A TOML document for a flat config with option tables (None values are left out)."""
    lines: List[str] = []
    tables: List[Tuple[str, Mapping[str, Any]]] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    import json

    return json.dumps(str(value))  # a basic TOML string: JSON escapes are valid TOML escapes
