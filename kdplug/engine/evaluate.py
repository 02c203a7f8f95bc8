"""Evaluation by task, summed exactly across processes; inference timing.

- "classification": ``accuracy`` (top-1) and ``loss`` (mean cross-entropy) over test samples.
- "lm": over tokens whose label is not -100 (and, given an attention mask, real tokens):
  ``accuracy`` (= ``token_accuracy``, next-token top-1), ``loss`` (mean token cross-entropy) and
  ``perplexity`` = exp(loss).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, ContextManager, Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..losses import IGNORE_INDEX, token_mask
from .batching import batches, call_model, check_batch, to_device
from .distributed import DistEnv

__all__ = ["evaluate", "measure_inference_ms", "time_inference"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Any], *, task: str, env: DistEnv,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             where: str = "evaluation") -> Dict[str, float]:
    """Test metrics of ``model`` over ``loader`` (each process its shard; sums all-reduced)."""
    was_training = model.training
    model.eval()
    device = env.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for batch in batches(loader, device, where):
            with autocast():
                logits = call_model(model, batch).logits
            logits = logits.float()
            labels = batch["labels"]
            mask = token_mask(logits, batch)
            flat = logits.reshape(-1, logits.shape[-1])
            flat_labels = labels.reshape(-1)
            counted = flat_labels != IGNORE_INDEX
            if mask is not None:
                counted = counted & mask.reshape(-1)
            targets = torch.where(counted, flat_labels, torch.full_like(flat_labels, IGNORE_INDEX))
            loss_sum += F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            correct += ((flat.argmax(-1) == flat_labels) & counted).sum()
            count += counted.sum()
    finally:
        model.train(was_training)
    totals = torch.stack([loss_sum, correct.to(torch.float64), count.to(torch.float64)])
    env.all_reduce_sum(totals)
    loss_total, correct_total, n = (float(v) for v in totals.cpu())
    n_safe = max(n, 1.0)
    metrics = {"accuracy": correct_total / n_safe, "loss": loss_total / n_safe}
    if task == "lm":
        metrics["token_accuracy"] = metrics["accuracy"]
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
        metrics["tokens"] = int(n)
    else:
        metrics["samples"] = int(n)
    return metrics


@torch.no_grad()
def measure_inference_ms(model: torch.nn.Module, batch: Dict[str, Any], *,
                         autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                         repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of one eval-mode forward over ``batch`` (already on the device)."""
    was_training = model.training
    model.eval()
    device = batch["inputs"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            with autocast():
                call_model(model, batch)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    return statistics.median(times)


def time_inference(results: Sequence[Any], test: Dataset, collate: Callable, batch_size: int,
                   autocast: Callable[[], ContextManager], env: DistEnv) -> Optional[int]:
    """Sets each result's ``inference_ms_per_batch`` (measured by rank 0 on the first test batch;
    None for a result without a model, such as a cached teacher). Returns that batch's size."""
    timings: Dict[str, float] = {}
    size = None
    if env.is_main:
        batch = to_device(check_batch(next(iter(DataLoader(
            test, batch_size=batch_size, collate_fn=collate))), "evaluation"), env.device)
        size = int(batch["labels"].shape[0])
        for result in results:
            if result.model is not None:
                timings[result.phase] = round(measure_inference_ms(result.model, batch,
                                                                   autocast=autocast), 4)
    timings = env.broadcast(timings)
    for result in results:
        result.inference_ms_per_batch = timings.get(result.phase)
    return env.broadcast(size)
