"""Transformer teachers and students in plain torch.nn: an encoder classifier and a causal LM.

Both are pre-LayerNorm Transformers with learned positions whose attention runs through
``F.scaled_dot_product_attention``. When attention maps are asked for (``output_attentions=True``)
the attention is computed explicitly instead, since SDPA does not return its probabilities; the
result is the same up to rounding.

``forward(inputs, attention_mask=None, output_hidden_states=False, output_attentions=False)``
returns a ``kdplug.outputs.ModelOutput``:

  logits         [B, num_classes] (classifier) or [B, L, vocab_size] (LM: next-token logits)
  hidden_states  on request: num_layers + 1 tensors [B, L, d_model] (the embeddings, then the
                 output of each block), the Hugging Face convention
  attentions     on request: num_layers tensors [B, heads, L, L] of attention probabilities

``attention_mask`` is a bool [B, L] (True = real token). Padding never reaches a real token: keys
that are padding are masked out, and a padding query attends to itself only, so a padded batch
gives the real tokens exactly what the unpadded batch gives them.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import kdplug
from kdplug.outputs import ModelOutput

from .tokenizer import ByteTokenizer

BYTE_VOCAB = ByteTokenizer.vocab_size


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if d_model % num_heads:
            raise kdplug.KdplugError(f"d_model ({d_model}) must be divisible by num_heads "
                                     f"({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], need_weights: bool):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        probs = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is None and self.causal:
                mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            y = F.dropout(probs, dropout, self.training) @ v
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, L, D)), probs


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float,
                 causal: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, num_heads, dropout, causal)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, need_weights):
        a, probs = self.attn(self.ln1(x), mask, need_weights)
        x = x + self.drop(a)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, probs


class _TransformerBase(nn.Module):
    causal = False

    def __init__(self, vocab_size: int, max_len: int, num_layers: int, d_model: int,
                 num_heads: int, d_ff: Optional[int], dropout: float) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len),
                            ("num_layers", num_layers), ("d_model", d_model),
                            ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise kdplug.KdplugError(f"{type(self).__name__}: {name} must be a positive "
                                         f"int, got {value!r}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.num_layers = num_layers
        self.d_model = d_model
        self.num_heads = num_heads
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, d_ff or 4 * d_model, dropout, self.causal)
            for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(_init_weights)

    def _attention_mask(self, attention_mask: Optional[torch.Tensor], L: int, device):
        """None, or a bool mask [B, 1, L, L] (True = may attend) for SDPA / explicit attention."""
        if attention_mask is None:
            return None
        keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        eye = torch.eye(L, dtype=torch.bool, device=device)
        mask = keys | eye  # a padding query attends to itself: no all-masked row, no leak
        if self.causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        return mask

    def _encode(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor],
                output_hidden_states: bool, output_attentions: bool):
        if inputs.dim() != 2 or inputs.dtype not in (torch.int64, torch.int32):
            raise kdplug.KdplugError(f"{type(self).__name__} expects token ids [batch, length] "
                                     f"(int64), got {inputs.dtype} {tuple(inputs.shape)}")
        B, L = inputs.shape
        if L > self.max_len:
            raise kdplug.KdplugError(f"{type(self).__name__}: sequence length {L} exceeds "
                                     f"max_len={self.max_len}; build the model with a larger "
                                     f"max_len or shorten the data")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, L):
            raise kdplug.KdplugError(f"attention_mask must be [batch, length] = {(B, L)}, got "
                                     f"{tuple(attention_mask.shape)}")
        positions = torch.arange(L, device=inputs.device)
        x = self.drop(self.tok(inputs) + self.pos(positions))
        mask = self._attention_mask(attention_mask, L, inputs.device)
        hidden = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for block in self.blocks:
            x, probs = block(x, mask, output_attentions)
            if hidden is not None:
                hidden.append(x)
            if attentions is not None:
                attentions.append(probs)
        return (self.ln_f(x), tuple(hidden) if hidden is not None else None,
                tuple(attentions) if attentions is not None else None)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class TransformerClassifier(_TransformerBase):
    """Transformer encoder (bidirectional) + masked mean pooling + linear head: [B, num_classes]."""

    def __init__(self, num_classes: int = 2, vocab_size: int = BYTE_VOCAB, max_len: int = 512,
                 num_layers: int = 6, d_model: int = 256, num_heads: int = 8,
                 d_ff: Optional[int] = None, dropout: float = 0.1) -> None:
        super().__init__(vocab_size, max_len, num_layers, d_model, num_heads, d_ff, dropout)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise kdplug.KdplugError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(d_model, num_classes)
        _init_weights(self.head)

    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> ModelOutput:
        x, hidden, attentions = self._encode(inputs, attention_mask, output_hidden_states,
                                             output_attentions)
        if attention_mask is None:
            pooled = x.mean(dim=1)
        else:
            weights = attention_mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return ModelOutput(logits=self.head(pooled), hidden_states=hidden, attentions=attentions)


class TransformerLM(_TransformerBase):
    """Causal Transformer language model: next-token logits [B, L, vocab_size]."""

    causal = True

    def __init__(self, vocab_size: int = BYTE_VOCAB, max_len: int = 256, num_layers: int = 6,
                 d_model: int = 384, num_heads: int = 6, d_ff: Optional[int] = None,
                 dropout: float = 0.0, tie_weights: bool = True) -> None:
        super().__init__(vocab_size, max_len, num_layers, d_model, num_heads, d_ff, dropout)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok.weight
        else:
            _init_weights(self.head)

    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> ModelOutput:
        x, hidden, attentions = self._encode(inputs, attention_mask, output_hidden_states,
                                             output_attentions)
        return ModelOutput(logits=self.head(x), hidden_states=hidden, attentions=attentions)

    # What kdplug's fused linear loss needs (kdplug.output_head): logits = head(final states).
    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def final_hidden_states(self, inputs: torch.Tensor,
                            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._encode(inputs, attention_mask, False, False)[0]


# ----------------------------------------------------------------------------- presets

PRESETS: Dict[str, Dict[str, Any]] = {
    "transformer-cls-teacher": dict(num_layers=6, d_model=256, num_heads=8),
    "transformer-cls-student": dict(num_layers=2, d_model=128, num_heads=4),
    "transformer-lm-teacher": dict(num_layers=6, d_model=384, num_heads=6),
    "transformer-lm-student": dict(num_layers=2, d_model=128, num_heads=4),
}

_CLS_OPTIONS = {"num_classes", "vocab_size", "max_len", "num_layers", "d_model", "num_heads",
                "d_ff", "dropout"}
_LM_OPTIONS = {"vocab_size", "max_len", "num_layers", "d_model", "num_heads", "d_ff", "dropout",
               "tie_weights"}
# What text data providers put in model_options for every model; these models use only part of it.
_DATA_FACTS = {"tokenizer", "task", "num_classes"}


def _options(preset: str, allowed: set, options: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(options) - allowed - _DATA_FACTS)
    if unknown:
        raise kdplug.KdplugError(f"{preset}: unknown option(s) {', '.join(unknown)}; accepted: "
                                 f"{', '.join(sorted(allowed))}")
    merged = dict(PRESETS[preset])
    merged.update({k: v for k, v in options.items() if k in allowed})
    return merged


def _check_task(preset: str, expected: str, options: Dict[str, Any]) -> None:
    task = options.get("task")
    if task is not None and task != expected:
        kind = "a classifier" if expected == "classification" else "a language model"
        other = (preset.replace("-cls-", "-lm-") if expected == "classification"
                 else preset.replace("-lm-", "-cls-"))
        raise kdplug.KdplugError(f"{preset} is {kind} but the data's task is {task!r}; "
                                 f"use {other}")


def make_classifier(preset: str):
    def factory(**options: Any) -> TransformerClassifier:
        _check_task(preset, "classification", options)
        return TransformerClassifier(**_options(preset, _CLS_OPTIONS, options))

    factory.__name__ = factory.__qualname__ = preset.replace("-", "_")
    factory.__doc__ = f"{preset}: TransformerClassifier with {PRESETS[preset]} unless overridden."
    return factory


def make_lm(preset: str):
    def factory(**options: Any) -> TransformerLM:
        _check_task(preset, "lm", options)
        merged = _options(preset, _LM_OPTIONS, options)
        vocab, classes = merged.get("vocab_size"), options.get("num_classes")
        if vocab is None and classes is not None:
            merged["vocab_size"] = classes
        return TransformerLM(**merged)

    factory.__name__ = factory.__qualname__ = preset.replace("-", "_")
    factory.__doc__ = f"{preset}: TransformerLM with {PRESETS[preset]} unless overridden."
    return factory
