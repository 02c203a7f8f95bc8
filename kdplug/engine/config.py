"""The run's settings: defaults, a TOML file, explicit options (in that order of precedence).

Every key of :class:`DistillConfig` can be set in a TOML file (``kdplug distill --config run.toml``,
``kdplug.distill(config="run.toml")``), as a keyword of :func:`kdplug.distill`, or as a CLI flag
(``teacher_epochs`` is ``--teacher-epochs``): each field is declared once, with its default and
help, and the CLI's options are made from the declarations. Options for the factories are tables::

    teacher = "cnn-teacher"
    epochs = 5
    [data_options]
    root = "data"

An unknown key or a value of the wrong type is a :class:`kdplug.KdplugError` that names the key
(and the file it came from), raised before anything is built.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import tomli_w

from ..errors import KdplugError, closest, did_you_mean
from ..hyperparameters import check_alpha, check_temperature
from ..kd_augment import KD_AUGMENTS, check_kd_augment
from ..settings import declared_problem, setting, settings_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

__all__ = ["DistillConfig", "ConfigError", "load_config_file", "resolve_config",
           "parse_option", "parse_options", "OPTION_TABLES", "RESUME_IDENTITY_EXCLUDES",
           "to_toml"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "constant", "step")
AMP_MODES = ("none", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
#: Keys that may change between a run and its --resume (they do not change what is computed).
RESUME_IDENTITY_EXCLUDES = frozenset({
    "out", "resume", "overwrite", "device", "quiet", "num_workers", "threads", "checkpoint_every",
    "eval_batch_size", "eval_every", "baseline", "teacher_cache_verify", "strategy",
})
CACHE_VERIFY_MODES = ("full", "lazy", "size")


class ConfigError(KdplugError):
    """A bad configuration key or value; the message names it."""


@dataclass
class DistillConfig:
    """Everything a distillation run needs besides the objects themselves.

    Each field is declared once below with its default and help; ``kdplug distill --help`` shows
    them as options. teacher, student, data and loss are registry names (for ready objects: their
    class names, shown in reports only).
    """

    teacher: Optional[str] = setting(None, help="Teacher name (`kdplug plugins` lists them).")
    student: Optional[str] = setting(None, help="Student name.")
    data: Optional[str] = setting(None, help="Data provider name.")
    loss: str = setting("kd+ce", help="Loss name.")
    temperature: float = setting(4.0, short="-T",
                                 help="Softmax temperature T > 0 softening both sides' logits.")
    alpha: float = setting(0.9, help="Weight of the soft-target term in [0, 1] "
                                     "(kd+ce = alpha*kd + (1-alpha)*ce).")
    epochs: int = setting(10, help="Student epochs (the distilled student and the scratch "
                                   "baseline alike).")
    teacher_epochs: Optional[int] = setting(None, default_text="= --epochs",
                                            help="Teacher epochs on the labels (0: use the "
                                                 "teacher as built).")
    teacher_checkpoint: Optional[str] = setting(None, path="file",
                                                help="Load the teacher from this checkpoint "
                                                     "instead of training it.")
    baseline: bool = setting(False, negatable=True, help="Also train the student from scratch "
                                                         "on the labels (same budget and seed).")
    out: Optional[str] = setting(None, path="dir", default_text="runs/distill-<time>",
                                 help="Output folder.")
    resume: Union[bool, str] = setting(
        False, bare="true", choices=("true", "auto", "false"), default_text="off",
        help="Continue the run in --out (its checkpoints must come from the same settings). "
             "auto: the same where out holds a checkpoint, a fresh start where it holds none "
             "(for job scripts that a scheduler restarts).")
    overwrite: bool = setting(False, help="Start over in an --out that holds a run.")
    seed: int = setting(0, help="Random seed (initial weights, data order, augmentation).")
    batch_size: int = setting(64, help="Global batch size (split across processes under "
                                       "torchrun).")
    eval_batch_size: int = setting(256, help="Evaluation batch size per process.")
    optimizer: str = setting("adamw", choices=OPTIMIZERS, help="Optimizer.")
    lr: float = setting(1e-3, help="Learning rate.")
    teacher_lr: Optional[float] = setting(None, default_text="= --lr",
                                          help="Teacher learning rate.")
    weight_decay: float = setting(0.01, help="Weight decay.")
    momentum: float = setting(0.9, help="SGD momentum.")
    scheduler: str = setting("cosine", choices=SCHEDULERS,
                             help="LR schedule per step, after the warm-up (step: times "
                                  "--lr-decay at each of --lr-milestones).")
    lr_milestones: str = setting("", help="Epochs after which the step schedule multiplies the "
                                          "LR by --lr-decay, comma-separated (e.g. 150,180,210).")
    lr_decay: float = setting(0.1, help="The step schedule's LR factor at each milestone.")
    warmup_steps: int = setting(0, help="Linear LR warm-up steps (optimizer steps).")
    grad_accum_steps: int = setting(1, help="Micro-batches of --batch-size per optimizer step "
                                            "(K of B train as one batch of K*B; the schedule and "
                                            "--checkpoint-every count optimizer steps).")
    grad_clip: Optional[float] = setting(None, default_text="none", help="Max gradient norm.")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:N.")
    amp: str = setting("none", choices=AMP_MODES,
                       help="Mixed precision (autocast); fp16 runs with a grad scaler.")
    strategy: str = setting("ddp", choices=STRATEGIES,
                            help="How torchrun's processes share the models: ddp (each holds them "
                                 "whole) or fsdp (parameters, gradients and optimizer state "
                                 "sharded with FSDP2; the teacher sharded for inference). fsdp "
                                 "needs torchrun.")
    num_workers: Optional[int] = setting(
        None, default_text="auto",
        help="DataLoader worker processes per split (auto: none where items load faster than a "
             "worker hands them over, else the cores less one, at most 8).")
    threads: Optional[int] = setting(None, default_text="torch's choice",
                                     help="torch CPU threads for the run.")
    kd_augment: str = setting("none", choices=KD_AUGMENTS,
                              help="Transfer-set augmentation of the distillation phase: mixup "
                                   "gives teacher and student the same mixed inputs.")
    kd_mixup_alpha: float = setting(1.0, help="mixup's lambda ~ Beta(a, a), folded to >= 1/2.")
    eval_every: int = setting(1, help="Evaluate on the test split every N epochs (the last "
                                      "epoch always).")
    checkpoint_every: int = setting(0, help="Also checkpoint every N steps (0: at each epoch's "
                                            "end only).")
    quiet: bool = setting(False, help="No per-epoch lines or progress bars.")
    teacher_cache: Optional[str] = setting(
        None, path="dir", help="Learn from the teacher outputs cached in this folder by `kdplug "
                               "cache-teacher` (checked against this run; no teacher phase).")
    teacher_cache_verify: str = setting(
        "full", choices=CACHE_VERIFY_MODES,
        help="Cache checksums: all before training (full), each chunk on first read (lazy), or "
             "file sizes only (size).")
    teacher_options: Dict[str, Any] = setting(
        default_factory=dict, flag="--teacher-option", metavar="KEY=VALUE",
        help="Teacher factory option (repeatable), e.g. dropout=0.1.")
    student_options: Dict[str, Any] = setting(default_factory=dict, flag="--student-option",
                                              metavar="KEY=VALUE", help="Student factory option.")
    data_options: Dict[str, Any] = setting(
        default_factory=dict, flag="--data-option", metavar="KEY=VALUE",
        help="Data provider option, e.g. root=data or download=false.")
    loss_options: Dict[str, Any] = setting(default_factory=dict, flag="--loss-option",
                                           metavar="KEY=VALUE", help="Loss factory option.")

    # -- derived
    @property
    def resolved_teacher_epochs(self) -> int:
        return self.epochs if self.teacher_epochs is None else self.teacher_epochs

    @property
    def resolved_teacher_lr(self) -> float:
        return self.lr if self.teacher_lr is None else self.teacher_lr

    @property
    def milestones(self) -> Tuple[int, ...]:
        """lr_milestones as sorted epochs."""
        return _milestones(self.lr_milestones)

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
            value = getattr(self, key)
            if key in sources:
                return ConfigError(f"config key {key!r}{at(key)}: expected {expected}, "
                                   f"got {value!r}")
            flag = "--" + key.replace("_", "-")  # given as a keyword or on the command line
            return ConfigError(f"{key} ({flag}) must be {expected}, got {value!r}")

        if self.resume in ("true", "false"):  # the CLI's spelling of the switch
            self.resume = self.resume == "true"
        problem = declared_problem(self)  # what the declarations say: types and choices
        if problem:
            raise bad(*problem)
        if not self.loss:
            raise bad("loss", "a loss name")
        try:  # the rule the op and the losses apply too
            check_temperature(self.temperature, source=at("temperature"))
            check_alpha(self.alpha, source=at("alpha"))
        except KdplugError as exc:
            raise ConfigError(str(exc)) from None
        for key, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("seed", 0),
                         ("warmup_steps", 0), ("grad_accum_steps", 1), ("num_workers", 0),
                         ("checkpoint_every", 0),
                         ("eval_every", 1),
                         ("teacher_epochs", 0), ("threads", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise bad(key, f"an int >= {low}")
        for key, low, strict in (("lr", 0, True), ("teacher_lr", 0, True), ("grad_clip", 0, True),
                                 ("weight_decay", 0, False), ("momentum", 0, False)):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value)
                                          and (value > low if strict else value >= low)):
                raise bad(key, f"a number {'>' if strict else '>='} {low}")
        if not isinstance(self.device, str) or not (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise bad("device", "auto, cpu, cuda or cuda:N")
        try:
            milestones = _milestones(self.lr_milestones)
        except ValueError:
            raise bad("lr_milestones", "epochs as comma-separated ints >= 1, e.g. 150,180,210"
                      ) from None
        if self.scheduler == "step" and not milestones:
            raise ConfigError(f"scheduler 'step'{at('scheduler')} needs lr_milestones, the epochs "
                              "after which the LR is multiplied by lr_decay (e.g. 150,180,210)")
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise bad("lr_decay", "a number in (0, 1]")
        try:
            check_kd_augment(self.kd_augment, self.kd_mixup_alpha)
        except KdplugError as exc:
            raise ConfigError(f"{exc}{at('kd_augment')}") from None
        if self.kd_augment != "none" and self.teacher_cache:
            raise ConfigError(f"kd_augment {self.kd_augment!r} needs the teacher's outputs on the "
                              "augmented inputs, and a teacher cache holds them for the data as it "
                              "is: drop kd_augment or teacher_cache")
        if self.strategy == "fsdp" and self.amp == "fp16":
            raise ConfigError(f"amp 'fp16'{at('amp')} with strategy 'fsdp': fp16 needs a grad "
                              "scaler that agrees across the shards, which kdplug does not "
                              "provide; use amp bf16 (FSDP2's MixedPrecisionPolicy, no scaler)")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite exclude each other: resume continues the run "
                              "in out, overwrite starts it over")
        return self


def _milestones(text: str) -> Tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    values = tuple(sorted(int(p) for p in parts))
    if any(v < 1 for v in values):
        raise ValueError(text)
    return values


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


SETTINGS = settings_of(DistillConfig)
FIELD_NAMES: Tuple[str, ...] = tuple(item.name for item in SETTINGS)
_FLOAT_FIELDS = {item.name for item in SETTINGS if item.type is float}
OPTION_TABLES: Tuple[str, ...] = tuple(item.name for item in SETTINGS if item.is_table)


def _normalize_key(key: str) -> str:
    return key.replace("-", "_")


def _unknown_keys(keys: Sequence[str], source: str) -> ConfigError:
    where = f" in {source}" if source else ""
    if len(keys) == 1:
        named = f" {keys[0]!r}{where}{did_you_mean(keys[0], FIELD_NAMES)}"
    else:
        named = f"s{where}: " + ", ".join(
            f"{key!r}" + (f" (did you mean {match!r}?)" if match else "")
            for key, match in ((key, closest(key, FIELD_NAMES)) for key in keys)) + "."
    return ConfigError(f"unknown config key{named} Known keys: {', '.join(FIELD_NAMES)}")


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
    unknown = [str(key) for key in raw if _normalize_key(str(key)) not in FIELD_NAMES]
    if unknown:  # all of them at once: a file with several typos needs one round, not several
        raise _unknown_keys(unknown, source)
    values: Dict[str, Any] = {}
    for key, value in raw.items():
        name = _normalize_key(str(key))
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
    """A TOML document for a flat config with option tables (None values are left out: TOML has
    no null; values TOML cannot hold, such as objects given from Python, are written as strings)."""
    return tomli_w.dumps(_toml_ready(values))


def _toml_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
