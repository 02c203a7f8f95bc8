"""What a data provider gives: the splits and the facts the models must agree on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from torch.utils.data import Dataset

TASKS = ("classification", "lm")


@dataclass
class DataSplits:
    """Returned by a dataset factory (see `register_datasets`).

    Items of `train`/`test` are `(inputs, labels)` pairs; `collate_fn`, when given, turns a list
    of items into a batch dict (see `Batch` keys below), e.g. to pad token sequences.

    task: "classification" (logits [B, num_classes], labels [B]) or "lm" (next-token logits
        [B, L, vocab_size], labels [B, L] with -100 where no token is predicted).
    input_shape: the shape of one sample's inputs, e.g. (3, 32, 32), or (L,) for tokens.
    model_options: options every model built for this data should get (e.g. in_channels,
        image_size, num_classes, vocab_size); the engine passes them to the factories, and a
        user's explicit options win.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: Tuple[int, ...]
    task: str = "classification"
    vocab_size: Optional[int] = None
    collate_fn: Optional[Callable[[list], Dict[str, Any]]] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"DataSplits.task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"DataSplits.num_classes must be a positive int, "
                             f"got {self.num_classes!r}")
