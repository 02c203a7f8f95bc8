"""What a model's forward may return, and how the engine asks for intermediate outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch


@dataclass
class ModelOutput:
    """Logits plus, on request, intermediate outputs.

    A teacher or student forward returns either a logits tensor or a ModelOutput. The engine asks
    for intermediate outputs only when the loss needs them (a loss object's `requires` set holds
    "hidden_states" and/or "attentions"), by calling `model(inputs, output_hidden_states=True,
    output_attentions=True)`; models that cannot provide them raise a clear error.

    hidden_states: per layer, e.g. [B, L, d] for a Transformer or [B, C, H, W] for a CNN stage.
    attentions: per layer, attention probabilities [B, heads, L, L].
    """

    logits: torch.Tensor
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
    extras: Dict[str, Any] = field(default_factory=dict)


def as_model_output(out: Any) -> ModelOutput:
    """Normalizes what a forward returned (a tensor, a ModelOutput, or anything with .logits)."""
    if isinstance(out, ModelOutput):
        return out
    if isinstance(out, torch.Tensor):
        return ModelOutput(logits=out)
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return ModelOutput(logits=logits, hidden_states=getattr(out, "hidden_states", None),
                           attentions=getattr(out, "attentions", None))
    raise TypeError(f"a model's forward must return a logits tensor or an object with .logits, "
                    f"got {type(out).__name__}")
