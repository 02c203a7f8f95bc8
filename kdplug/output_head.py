"""A language model's final hidden states and output head, for losses that compute the logits
themselves chunk by chunk (kdplug.ops.fused_linear_kd) instead of receiving them.

The contract a model meets to take part: ``get_output_embeddings()`` returns its output head, an
``nn.Linear`` (Hugging Face's name for it), and ``final_hidden_states(inputs,
attention_mask=None)`` returns the [B, L, H] states that head turns into its logits. A loss asks
for it by holding ``"output_head"`` in its ``requires`` set; the engine then calls
:func:`head_output` instead of the model's forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .outputs import ModelOutput

REQUIREMENT = "output_head"
EXTRA = "output_head"  # the ModelOutput.extras key holding a HeadOutput


@dataclass
class HeadOutput:
    """Final hidden states [B, L, H] and the head (weight [V, H], bias [V] or None) that gives
    ``logits = hidden @ weightᵀ + bias``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def missing_output_head(model: Optional[nn.Module]) -> Optional[str]:
    """None when the model meets the contract, else why not (for a log line or an error)."""
    if model is None:
        return "there is no model"
    model = _unwrapped(model)
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_head):
        return f"{name} has no get_output_embeddings()"
    head = get_head()
    if not isinstance(head, nn.Linear):
        return f"{name}.get_output_embeddings() is {type(head).__name__}, not an nn.Linear"
    if not callable(getattr(model, "final_hidden_states", None)):
        return f"{name} has no final_hidden_states(inputs, attention_mask)"
    why = getattr(model, "output_head_unsupported", None)  # e.g. logits rescaled after the head
    return why() if callable(why) else None


def head_output(model: nn.Module, inputs: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> ModelOutput:
    """The model's final hidden states and head as a ModelOutput without logits
    (``extras["output_head"]`` holds the HeadOutput)."""
    core = _unwrapped(model)
    head = core.get_output_embeddings()
    hidden = core.final_hidden_states(inputs, attention_mask=attention_mask)
    return ModelOutput(logits=None, extras={EXTRA: HeadOutput(hidden, head.weight, head.bias)})


def head_of(out) -> Optional[HeadOutput]:
    """The HeadOutput a model call returned, or None when it returned logits."""
    extras = getattr(out, "extras", None)
    return extras.get(EXTRA) if isinstance(extras, dict) else None
