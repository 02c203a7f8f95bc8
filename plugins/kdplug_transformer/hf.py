"""Hugging Face interop (optional extra ``kdplug[hf]``): a local checkpoint folder as teacher/student.

``--teacher hf:PATH`` (or ``--student hf:PATH``) loads the folder with
``AutoModelForSequenceClassification`` or ``AutoModelForCausalLM`` and its own tokenizer, offline
(``local_files_only=True``: nothing is downloaded; a missing folder is a clear error naming it).

Tokenization: a classifier re-tokenizes each batch with its own tokenizer when the data was
tokenized with another one (the batch's token ids are decoded with the data's tokenizer and encoded
again), so a byte-level student can learn from a BERT-style teacher. A language model cannot do
that (its logits are per token of its own tokenization), so token-level distillation with an HF LM
needs the data tokenized with its tokenizer: ``tokenizer=hf:PATH`` as a data option.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import kdplug
from kdplug.outputs import ModelOutput

from .hf_folder import checkpoint_folder, require_transformers
from .tokenizer import HF_PREFIX, get_tokenizer

_LM_ARCHITECTURE_HINTS = ("CausalLM", "LMHeadModel")


def _same_folder(spec: Optional[str], folder: Path) -> bool:
    if not isinstance(spec, str) or not spec.startswith(HF_PREFIX):
        return False
    return Path(spec[len(HF_PREFIX):]).expanduser().resolve() == folder.resolve()


class HFModel(nn.Module):
    """Wraps a transformers model: kdplug's forward signature, a ModelOutput back."""

    def __init__(self, model: nn.Module, folder: Path, task: str, data_tokenizer: Optional[str],
                 max_len: Optional[int]) -> None:
        super().__init__()
        self.model = model
        self.folder = str(folder)
        self.task = task
        self.tokenizer = get_tokenizer(HF_PREFIX + str(folder))
        self.data_tokenizer = data_tokenizer
        # Re-tokenize a classifier's input when the data was tokenized with another tokenizer.
        self.retokenize = (task == "classification" and data_tokenizer is not None
                           and not _same_folder(data_tokenizer, folder))
        # re-tokenized text is cut to what the model's positions allow
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 512

    def _retokenized(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        source = get_tokenizer(self.data_tokenizer)
        rows = inputs.tolist()
        if attention_mask is not None:
            rows = [[i for i, m in zip(row, mask) if m]
                    for row, mask in zip(rows, attention_mask.tolist())]
        texts = [source.decode(row) for row in rows]
        enc = self.tokenizer.hf(texts, padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt")
        return enc["input_ids"].to(inputs.device), enc["attention_mask"].to(inputs.device)

    def forward(self, inputs: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> ModelOutput:
        extras = {}
        if self.retokenize:
            input_ids, mask = self._retokenized(inputs, attention_mask)
            extras["attention_mask"] = mask.bool()
        else:
            input_ids = inputs
            mask = None if attention_mask is None else attention_mask.long()
        if output_attentions and getattr(self.model.config, "_attn_implementation",
                                         "eager") != "eager":
            self.model.set_attn_implementation("eager")  # SDPA kernels return no maps
        out = self.model(input_ids=input_ids, attention_mask=mask,
                         output_hidden_states=output_hidden_states,
                         output_attentions=output_attentions)
        return ModelOutput(
            logits=out.logits,
            hidden_states=tuple(out.hidden_states) if output_hidden_states else None,
            attentions=tuple(out.attentions) if output_attentions else None, extras=extras)

    # What kdplug's fused linear loss needs (kdplug.output_head), for causal LMs: the base
    # model's last hidden state (after its final norm) is what lm_head turns into the logits.
    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.model.get_output_embeddings() if self.task == "lm" else None

    def final_hidden_states(self, inputs: torch.Tensor,
                            attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.long()
        return self.model.base_model(input_ids=inputs, attention_mask=mask).last_hidden_state

    def output_head_unsupported(self) -> Optional[str]:
        """Why lm_head(last hidden state) would not be this model's logits, or None."""
        config = self.model.config
        for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(config, name, None) not in (None, 1, 1.0):
                return f"hf:{self.folder} rescales its logits after the head ({name})"
        if self.model.base_model is self.model:
            return f"hf:{self.folder} has no separate base model to give its hidden states"
        return None

    def extra_repr(self) -> str:
        return f"folder={self.folder!r}, task={self.task!r}, retokenize={self.retokenize}"


def _task_of(config: Any, task: Optional[str]) -> str:
    if task is not None:
        if task not in ("classification", "lm"):
            raise kdplug.KdplugError(f"task must be 'classification' or 'lm', got {task!r}")
        return task
    architectures = getattr(config, "architectures", None) or []
    if any(hint in arch for arch in architectures for hint in _LM_ARCHITECTURE_HINTS):
        return "lm"
    return "classification"


def hf_model(path: Optional[str] = None, *, task: Optional[str] = None,
             num_classes: Optional[int] = None, vocab_size: Optional[int] = None,
             tokenizer: Optional[str] = None, max_len: Optional[int] = None,
             attn_implementation: Optional[str] = None) -> HFModel:
    """A local Hugging Face checkpoint as a kdplug model (``hf:PATH``).

    task: "classification" or "lm"; by default the data's task, else guessed from the config's
        architectures (…ForCausalLM / …LMHeadModel -> lm).
    num_classes, vocab_size, tokenizer, max_len: what the data provider tells every model; a
        classifier whose head has another number of labels gets a new head (with a warning), an LM
        whose vocabulary differs from the data's is an error naming both sizes. (max_len is
        accepted and unused: re-tokenized text is cut at the model's own position limit.)
    attn_implementation: passed to from_pretrained ("eager", "sdpa", ...); attention maps switch
        the model to "eager" when they are asked for.
    """
    folder = checkpoint_folder(path)
    transformers = require_transformers()
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    task = _task_of(config, task)
    kwargs = {"local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "lm":
        if vocab_size is not None and int(vocab_size) != config.vocab_size:
            advice = ("" if _same_folder(tokenizer, folder)
                      else f"; tokenize the data with this model's tokenizer: tokenizer=hf:{folder}")
            raise kdplug.KdplugError(
                f"vocabulary mismatch: the language model hf:{folder} has {config.vocab_size} "
                f"tokens but the data's tokenizer ({tokenizer or 'unknown'}) has {vocab_size}; "
                f"token-level distillation needs one vocabulary{advice}")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    else:
        if num_classes is not None and int(num_classes) != config.num_labels:
            kwargs.update(num_labels=int(num_classes), ignore_mismatched_sizes=True)
            warnings.warn(f"hf:{folder} has {config.num_labels} labels but the data has "
                          f"{num_classes} classes: its classification head is new (untrained)",
                          stacklevel=2)
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(folder), **kwargs)
        except ValueError as exc:
            raise kdplug.KdplugError(f"cannot load {str(folder)!r} as a sequence classifier: "
                                     f"{exc}") from exc
        if getattr(model.config, "pad_token_id", None) is None:
            pad = get_tokenizer(HF_PREFIX + str(folder)).pad_id
            model.config.pad_token_id = pad
    return HFModel(model, folder, task, tokenizer, max_len)

