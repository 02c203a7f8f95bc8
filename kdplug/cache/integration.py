"""How ``kdplug.distill(..., teacher_cache=DIR)`` uses a cache: what it must match, the loader
that yields sample indices and attaches cached targets, and the teacher's line in the report.

- :func:`expected_identity` computes, from the run's own settings, what the cache must record:
  the teacher (name and resolved options when given by name; the weights' hash when its weights
  are given: a checkpoint or a ready module), the data provider (name, options, split, sample
  count and the sample-order fingerprint), the transform (description, deterministic or not, and
  for a cache of augmented views the seed) and the format version. The reader compares field by
  field and names every difference.
- :class:`IndexedDataset` returns ``(index, view, item)``; with a cache of K augmented views,
  epoch e loads the items with the augmentation of epoch ``e mod K`` (exactly the cached view).
- :class:`CachedCollate` collates the items with the data's own collate and adds the cached
  targets for those indices (:mod:`kdplug.cache.targets`); it runs in DataLoader workers too.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..data import DataSplits
from ..engine.batching import check_batch, load_items
from ..engine.config import DistillConfig
from ..engine.distributed import DistEnv
from .format import FORMAT_VERSION, CacheCorruptError, CacheError
from .hashing import order_fingerprint, transform_info, weights_hash
from .reader import TeacherCache
from .targets import cached_teacher_output

__all__ = ["expected_identity", "IndexedDataset", "CachedCollate", "check_loss", "DryRunTeacher",
           "open_for_run", "teacher_phase_result"]


def expected_identity(*, teacher_name: Optional[str], teacher_options: Optional[Mapping[str, Any]],
                      teacher_model: Optional[torch.nn.Module], data_name: str,
                      data_options: Mapping[str, Any], train: Dataset, seed: int,
                      cache: TeacherCache) -> Dict[str, Any]:
    """What ``cache`` must record for this run (nested like the manifest)."""
    teacher: Dict[str, Any] = {}
    if teacher_name is not None:
        teacher["name"] = teacher_name
    if teacher_options is not None:
        teacher["options"] = dict(teacher_options)
    if teacher_model is not None:
        teacher["weights_hash"] = weights_hash(teacher_model)
    info = transform_info(train)
    transform: Dict[str, Any] = {"description": info["description"],
                                 "deterministic": info["deterministic"]}
    if not info["deterministic"]:
        # a cache of augmented views holds the views of one seed: the run must use it
        transform["seed"] = seed
    order_seed = seed if not info["deterministic"] else 0
    if not info["deterministic"] and cache.view_seed is not None and cache.view_seed != seed:
        order = None  # the seed mismatch is the news; the order under another seed differs too
    else:
        order = order_fingerprint(train, seed=order_seed, epoch=0)
    data: Dict[str, Any] = {"name": data_name, "options": dict(data_options), "split": "train",
                            "num_samples": len(train)}  # type: ignore[arg-type]
    if order is not None:
        data["order"] = order
    out: Dict[str, Any] = {"format_version": FORMAT_VERSION, "data": data, "transform": transform}
    if teacher:
        out["teacher"] = teacher
    return out


def check_loss(loss: Any, cache: TeacherCache, loss_name: str) -> None:
    """A cache holds logits only, and a top-k cache only what a top-k-aware loss can use."""
    requires = set(getattr(loss, "requires", ()) or ())
    if requires:
        raise CacheError(f"the loss {loss_name!r} requires {', '.join(sorted(requires))} of the "
                         "teacher, but a teacher cache holds only its logits; run without "
                         "--teacher-cache, or use a logit loss (kd, kd+ce)")
    if cache.kind == "topk" and getattr(loss, "uses_teacher", True) and not getattr(
            loss, "supports_topk_teacher", False):
        raise CacheError(f"the loss {loss_name!r} reads the teacher's dense logits, but "
                         f"{str(cache.path)!r} is a top-{cache.k} cache (indices and "
                         "log-probabilities); use kd or kd+ce (they route top-k teachers to "
                         "kd_kl_div_topk), a dense cache, or a loss with "
                         "supports_topk_teacher = True that reads teacher_out.extras['topk']")


class IndexedDataset(Dataset):
    """``dataset[i]`` as ``(i, view, item)``; ``set_epoch(e)`` picks the view ``e mod views``
    and, for random transforms, loads epoch e's items with view (e mod views)'s augmentation."""

    def __init__(self, dataset: Dataset, views: int = 1, replay_views: bool = False) -> None:
        self.dataset, self.views, self.replay_views = dataset, max(1, int(views)), replay_views
        self.epoch, self.view = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.view = epoch, epoch % self.views
        inner = getattr(self.dataset, "set_epoch", None)
        if inner is not None:
            inner(self.view if self.replay_views else epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return index, self.view, self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        return [(index, self.view, item)
                for index, item in zip(indices, load_items(self.dataset, indices))]


class CachedCollate:
    """The data's collate, plus ``batch["index"]`` and (while ``enabled``) the cached targets."""

    def __init__(self, collate: Callable[[List[Any]], Dict[str, Any]], cache: TeacherCache) -> None:
        self.collate, self.cache, self.enabled = collate, cache, True

    def __call__(self, triples: Sequence[Any]) -> Dict[str, Any]:
        indices = [int(t[0]) for t in triples]
        batch = check_batch(self.collate([t[2] for t in triples]), "training batch")
        if self.enabled:
            batch.update(self.cache.targets(indices, int(triples[0][1]), batch))
        batch["index"] = torch.tensor(indices, dtype=torch.int64)
        return batch


class DryRunTeacher(torch.nn.Module):
    """Stands in for the teacher in the engine's dry run on the first training samples: returns
    the cached outputs of samples 0..B-1 (view 0). A top-k cache also gets dense logits here
    (the top-k log-probabilities, -1e4 elsewhere) so the engine's shape checks apply as usual."""

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **_: Any) -> Any:
        batch = {"inputs": inputs.cpu(), "attention_mask": attention_mask}
        targets = self.cache.targets(list(range(int(inputs.shape[0]))), 0, batch)
        out = cached_teacher_output({k: v.to(inputs.device) for k, v in targets.items()})
        topk = out.extras.get("topk")
        if topk is not None:
            indices, logprobs = topk
            dense = torch.full((*indices.shape[:-1], self.cache.num_classes), -1e4,
                               device=inputs.device)
            out.logits = dense.scatter(-1, indices, logprobs)
        return out


def open_for_run(cfg: DistillConfig, env: DistEnv, splits: DataSplits, loss: Any, *,
                 teacher_name: Optional[str], teacher_options: Optional[Mapping[str, Any]],
                 teacher_model: Optional[torch.nn.Module]) -> TeacherCache:
    """Open ``cfg.teacher_cache`` for a distillation run and check that it fits the run.

    The cache must record the teacher the run names (``teacher_name``; with the options its
    factory gets when it is built by name) and, when the run gives its weights
    (``teacher_model``: loaded from ``teacher_checkpoint``, or a ready module), their hash; the
    data's identity and order always; the checksums per ``teacher_cache_verify``, split across
    processes under torchrun.
    """
    verify = cfg.teacher_cache_verify
    cache = TeacherCache(cfg.teacher_cache, verify=verify)
    cache.check_files()
    check_loss(loss, cache, cfg.loss)
    expected = expected_identity(
        teacher_name=teacher_name, teacher_options=teacher_options, teacher_model=teacher_model,
        data_name=cfg.data, data_options=cfg.data_options, train=splits.train, seed=cfg.seed,
        cache=cache)
    cache.compare(expected)
    if cache.num_classes != splits.num_classes:
        raise CacheError(f"{str(cache.path)!r} holds {cache.num_classes} classes per row, the data "
                         f"{cfg.data!r} has {splits.num_classes}")
    if verify == "full":
        units = sorted(cache.units)
        error = None
        try:
            cache.verify_checksums(units[env.rank::env.world_size])
        except CacheError as exc:
            error = str(exc)
        errors = [e for e in env.gather(error) if e]
        if errors:
            raise CacheCorruptError(errors[0])
    return cache


def teacher_phase_result(cache: TeacherCache) -> Dict[str, Any]:
    """The teacher's numbers for the report, from the manifest (None where not recorded)."""
    ev = cache.teacher_eval or {}
    metrics = {k: v for k, v in ev.items() if k != "split"}
    return {"name": cache.teacher.get("name"), "params": int(cache.teacher.get("params", 0)),
            "accuracy": ev.get("accuracy"), "loss": ev.get("loss"), "metrics": metrics,
            "source": f"cache {cache.path}"}
