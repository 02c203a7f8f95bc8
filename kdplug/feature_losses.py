"""Built-in loss plugin: intermediate-layer distillation (hidden states, attention maps, hints).

Registered, through the same ``register_losses`` hook a third-party plugin uses:

=========================  ==========================================================================
``hidden``                 MSE between student and teacher hidden states through a learned projection
                           (student width -> teacher width), TinyBERT-style, uniform layer map; for
                           CNN feature maps [B, C, H, W] the projection is a 1×1 convolution
``attention``              KL(teacher attention ‖ student attention) per query row, MiniLM-style,
                           last layer by default
``kd+ce+hidden``           the logit loss ``kd+ce`` plus ``hidden_weight`` × ``hidden``
``kd+ce+attention``        ``kd+ce`` plus ``attention_weight`` × ``attention``
``kd+ce+hidden+attention`` ``kd+ce`` plus both (TinyBERT's intermediate terms with Hinton's KD)
=========================  ==========================================================================

``hint`` and ``kd+ce+hint`` are FitNets' names for ``hidden`` and ``kd+ce+hidden``: the same
factories, registered under both names (``info["alias_of"]`` says which).

Every one of them is a :class:`FeatureDistillLoss`: ``base`` (a logit loss created by name through
``kdplug.create_loss``, e.g. ``"kd+ce"``; ``"none"`` for the feature terms alone) plus weighted
feature terms. Any of them takes every option, so ``hidden`` with ``base="kd+ce"`` is
``kd+ce+hidden``.
The model-agnostic mechanism: the loss's ``requires`` set makes the engine call the models with
``output_hidden_states=True`` / ``output_attentions=True``, and the loss reads
``ModelOutput.hidden_states`` / ``.attentions``: per layer ``[B, L, d]`` (Transformers), ``[B, C, H,
W]`` (CNNs) or ``[B, d]``; attention probabilities ``[B, heads, L, L]``.

The projections are parameters of the loss (an ``nn.Module``): the engine trains them with the
student's optimizer and keeps them in the checkpoint. They are sized from the first outputs the
loss sees, before any optimizer exists: ``kdplug.distill`` calls the loss once on two training
samples (its dry run) before it builds the optimizer; code of your own calls
:meth:`FeatureDistillLoss.prepare` (or the loss) once before building its optimizer (a warning
says so if the first call comes while training). Loading a ``state_dict`` creates them from the
saved shapes, so a resumed run needs no warm-up batch.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .api import create_loss
from .errors import KdplugError
from .feature_source import FeatureSource
from .hookspecs import hookimpl
from .outputs import as_model_output

LayerMap = Union[str, Sequence[Tuple[int, int]], Dict[int, int]]

__all__ = ["FeatureDistillLoss", "HiddenStateLoss", "AttentionKLLoss", "parse_layer_map",
           "resolve_layer_map", "create_base_loss", "hold_base_loss", "check_logits_match",
           "register_losses"]


# ----------------------------------------------------------------------------- layer maps

def parse_layer_map(layer_map: LayerMap) -> Union[str, List[Tuple[int, int]]]:
    """A layer map as given: "uniform", "last", "middle", or explicit pairs student:teacher.

    Explicit pairs may be a string ``"0:0,1:3,2:6"``, a dict ``{1: 3, 2: 6}`` or a list of pairs;
    negative indices count from the end (``"-1:-1"`` is last to last).
    """
    if isinstance(layer_map, str):
        text = layer_map.strip()
        if text in ("uniform", "last", "middle"):
            return text
        pairs = []
        for part in text.replace(";", ",").split(","):
            if not part.strip():
                continue
            try:
                s, t = part.split(":")
                pairs.append((int(s), int(t)))
            except ValueError:
                raise KdplugError(
                    f"layer map {layer_map!r}: expected 'uniform', 'last', 'middle' or pairs "
                    f"'student:teacher,...' such as '1:3,2:6'") from None
    elif isinstance(layer_map, dict):
        pairs = [(int(s), int(t)) for s, t in layer_map.items()]
    else:
        try:
            pairs = [(int(s), int(t)) for s, t in layer_map]
        except (TypeError, ValueError):
            raise KdplugError(f"layer map {layer_map!r}: expected 'uniform', 'last', "
                                     f"'middle' or (student, teacher) pairs") from None
    if not pairs:
        raise KdplugError(f"layer map {layer_map!r} is empty")
    return pairs


def resolve_layer_map(layer_map: Union[str, List[Tuple[int, int]]], n_student: int,
                      n_teacher: int, what: str = "hidden_states") -> List[Tuple[int, int]]:
    """(student_index, teacher_index) pairs for ``n_student`` and ``n_teacher`` layers.

    uniform: student i -> teacher round(i·(T−1)/(S−1)), so the first and the last align (for
        Transformers' num_layers+1 hidden states: embeddings to embeddings, then layer m of the
        student to layer m·T/S of the teacher, as TinyBERT); one student layer maps to the last.
    last: the last to the last. middle: the middle to the middle (FitNets' single hint).
    """
    if n_student < 1 or n_teacher < 1:
        raise KdplugError(f"no {what} to distil: the student gave {n_student} and the "
                                 f"teacher {n_teacher}")
    if layer_map == "uniform":
        if n_student == 1:
            return [(0, n_teacher - 1)]
        return [(i, round(i * (n_teacher - 1) / (n_student - 1))) for i in range(n_student)]
    if layer_map == "last":
        return [(n_student - 1, n_teacher - 1)]
    if layer_map == "middle":
        return [(n_student // 2, n_teacher // 2)]
    pairs = []
    for s, t in layer_map:
        if not (-n_student <= s < n_student and -n_teacher <= t < n_teacher):
            raise KdplugError(
                f"layer map pair {s}:{t} is out of range: the student gave {n_student} {what} "
                f"(indices 0..{n_student - 1}) and the teacher {n_teacher} "
                f"(0..{n_teacher - 1})")
        pairs.append((s % n_student, t % n_teacher))
    return pairs


def uniform_attention_map(n_student: int, n_teacher: int) -> List[Tuple[int, int]]:
    """Attention layers have no embedding entry: student layer i -> teacher (i+1)·T/S − 1."""
    return [(i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def _token_mask(batch: Any, shape: Tuple[int, int], device, *outs: Any) -> Optional[torch.Tensor]:
    """The bool [B, L] mask of real tokens for features of ``shape``: the batch's attention_mask,
    or one a model re-tokenized with (``ModelOutput.extras["attention_mask"]``); None if no mask
    has that shape (then every position counts)."""
    candidates = [batch.get("attention_mask") if isinstance(batch, dict) else None]
    candidates += [as_model_output(out).extras.get("attention_mask") for out in outs]
    for mask in candidates:
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape):
            return mask.to(device=device, dtype=torch.bool)
    return None


# ----------------------------------------------------------------------------- hidden states

class HiddenStateLoss(nn.Module):
    """Mean squared error between projected student features and teacher features.

    Per mapped pair: ``[B, L, d_s]`` -> Linear(d_s, d_t), MSE over real tokens (attention_mask);
    ``[B, C_s, H, W]`` -> 1×1 Conv(C_s, C_t) (a linear map over channels), and when the spatial
    sizes differ the larger map is average-pooled to the smaller; ``[B, d_s]`` -> Linear. The mean
    runs over counted positions and teacher features; the pairs' losses are averaged.

    projection: "auto" (as above), "linear" (a Linear over the feature axis for every rank: the
    same map as the 1×1 conv) or "none" (widths must match).
    source: where the features come from (default: the models' hidden_states; a FeatureSource
    with module paths takes them with forward hooks instead).
    """

    def __init__(self, layer_map: LayerMap = "uniform", projection: str = "auto",
                 source: Optional[FeatureSource] = None) -> None:
        super().__init__()
        self.feature_source = source or FeatureSource("hidden_states")
        if projection not in ("auto", "linear", "none"):
            raise KdplugError(f"projection must be 'auto', 'linear' or 'none', "
                                     f"got {projection!r}")
        self.layer_map = parse_layer_map(layer_map)
        self.projection = projection
        self.projections = nn.ModuleDict()
        self.pairs: Optional[List[Tuple[int, int]]] = None
        self._warned_lazy = False

    # -- projections, keyed "s{i}_t{j}"
    @staticmethod
    def _key(s: int, t: int) -> str:
        return f"s{s}_t{t}"

    def _make_projection(self, s_feat: torch.Tensor, t_feat: torch.Tensor) -> nn.Module:
        if s_feat.dim() != t_feat.dim():
            raise KdplugError(f"cannot match a student feature {tuple(s_feat.shape)} to a "
                                     f"teacher feature {tuple(t_feat.shape)}: different ranks")
        d_s, d_t = s_feat.shape[1 if s_feat.dim() == 4 else -1], t_feat.shape[
            1 if t_feat.dim() == 4 else -1]
        if self.projection == "none":
            if d_s != d_t:
                raise KdplugError(f"projection='none' needs equal widths, but the student "
                                         f"feature has {d_s} and the teacher's {d_t}")
            return nn.Identity()
        if s_feat.dim() == 4 and self.projection == "auto":
            return nn.Conv2d(d_s, d_t, kernel_size=1)
        return nn.Linear(d_s, d_t)

    def build(self, student_hidden: Sequence[torch.Tensor],
              teacher_hidden: Sequence[torch.Tensor]) -> int:
        """Resolve the layer map and create the missing projections; returns how many."""
        pairs = resolve_layer_map(self.layer_map, len(student_hidden), len(teacher_hidden))
        self.pairs = pairs
        created = 0
        for s, t in pairs:
            key = self._key(s, t)
            if key not in self.projections:
                ref = next((p for p in self.parameters()), None)
                proj = self._make_projection(student_hidden[s], teacher_hidden[t])
                device = ref.device if ref is not None else student_hidden[s].device
                # float32 parameters (float64 for float64 features), whatever autocast does
                dtype = torch.float64 if student_hidden[s].dtype == torch.float64 else (
                    ref.dtype if ref is not None else torch.float32)
                self.projections[key] = proj.to(device=device, dtype=dtype)
                created += 1
        return created

    def _project(self, key: str, feat: torch.Tensor) -> torch.Tensor:
        proj = self.projections[key]
        if isinstance(proj, nn.Identity):
            return feat
        feat = feat.to(proj.weight.dtype)
        if isinstance(proj, nn.Linear) and feat.dim() == 4:  # channels-last linear == 1×1 conv
            return proj(feat.movedim(1, -1)).movedim(-1, 1)
        return proj(feat)

    def forward(self, student_out: Any, teacher_out: Any, batch: Any) -> torch.Tensor:
        s_hidden = self.feature_source.get(student_out, "student")
        t_hidden = self.feature_source.get(teacher_out, "teacher")
        if self.pairs is None or any(self._key(s, t) not in self.projections
                                     for s, t in self.pairs):
            created = self.build(s_hidden, t_hidden)
            if created and self.training and not self._warned_lazy and torch.is_grad_enabled():
                self._warned_lazy = True
                warnings.warn("HiddenStateLoss created its projections on its first call: put "
                              "the loss's parameters in the optimizer after this call, or call "
                              "loss.prepare(student_out, teacher_out, batch) first",
                              stacklevel=3)
        total = None
        for s, t in self.pairs:
            term = self._pair_loss(self._key(s, t), s_hidden[s], t_hidden[t].detach(), batch, s, t,
                                   (student_out, teacher_out))
            total = term if total is None else total + term
        return total / len(self.pairs)

    def _pair_loss(self, key, s_feat, t_feat, batch, s, t, outs=()) -> torch.Tensor:
        acc = torch.float64 if s_feat.dtype == torch.float64 else torch.float32
        projected = self._project(key, s_feat).to(acc)
        target = t_feat.to(acc)
        if projected.dim() == 4 and projected.shape[-2:] != target.shape[-2:]:
            size = tuple(min(a, b) for a, b in zip(projected.shape[-2:], target.shape[-2:]))
            projected = F.adaptive_avg_pool2d(projected, size)
            target = F.adaptive_avg_pool2d(target, size)
        if projected.shape != target.shape:
            hint = (" (teacher and student use different tokenizations or sequence lengths?)"
                    if projected.dim() == 3 else "")
            raise KdplugError(
                f"hidden-state pair student[{s}] {tuple(s_feat.shape)} -> teacher[{t}] "
                f"{tuple(t_feat.shape)}: shapes differ after projection ({tuple(projected.shape)} "
                f"vs {tuple(target.shape)}){hint}")
        sq = (projected - target).pow(2)
        if sq.dim() == 3:
            mask = _token_mask(batch, sq.shape[:2], sq.device, *outs)
            if mask is not None:
                m = mask.unsqueeze(-1).to(sq.dtype)
                return (sq * m).sum() / (m.sum() * sq.shape[-1]).clamp_min(1.0)
        return sq.mean()

    # -- a state_dict saved after the projections existed recreates them on load
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        head = prefix + "projections."
        for name in state_dict:
            if not name.startswith(head) or not name.endswith(".weight"):
                continue
            key = name[len(head):-len(".weight")]
            if key in self.projections:
                continue
            weight = state_dict[name]
            has_bias = (name[:-len("weight")] + "bias") in state_dict
            if weight.dim() == 4:
                proj = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=has_bias)
            else:
                proj = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
            ref = next(self.parameters(), None)
            self.projections[key] = proj.to(ref.device if ref is not None else weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"layer_map={self.layer_map!r}, projection={self.projection!r}"


# ----------------------------------------------------------------------------- attention maps

class AttentionKLLoss(nn.Module):
    """KL(teacher ‖ student) between attention distributions, MiniLM-style.

    Per mapped layer pair, each query row of ``[B, heads, L, L]`` attention probabilities is a
    distribution over keys; the loss is Σ_k p_t·(log p_t − log p_s), averaged over the counted rows
    (real query tokens by the batch's attention_mask, all heads). With different head counts the
    maps are averaged over heads first (``heads="auto"``; ``"mean"`` always averages).

    layers: "last" (MiniLM: last to last, the default), "uniform" (student layer i to teacher
    layer (i+1)·T/S − 1) or explicit pairs "s:t,...".
    source: the models' attentions by default, or a FeatureSource with module paths whose
    captured tensors are attention probabilities (e.g. the input of an attention dropout).
    """

    def __init__(self, layers: LayerMap = "last", heads: str = "auto", eps: float = 1e-12,
                 source: Optional[FeatureSource] = None) -> None:
        super().__init__()
        self.feature_source = source or FeatureSource("attentions")
        if heads not in ("auto", "mean"):
            raise KdplugError(f"heads must be 'auto' or 'mean', got {heads!r}")
        self.layers = parse_layer_map(layers)
        self.heads = heads
        self.eps = eps

    def pairs_for(self, n_student: int, n_teacher: int) -> List[Tuple[int, int]]:
        if self.layers == "uniform":
            return uniform_attention_map(n_student, n_teacher)
        return resolve_layer_map(self.layers, n_student, n_teacher, "attention maps")

    def forward(self, student_out: Any, teacher_out: Any, batch: Any) -> torch.Tensor:
        s_att = self.feature_source.get(student_out, "student")
        t_att = self.feature_source.get(teacher_out, "teacher")
        pairs = self.pairs_for(len(s_att), len(t_att))
        total = None
        for s, t in pairs:
            term = self._pair_loss(s_att[s], t_att[t].detach(), batch, s, t,
                                   (student_out, teacher_out))
            total = term if total is None else total + term
        return total / len(pairs)

    def _pair_loss(self, p_s: torch.Tensor, p_t: torch.Tensor, batch: Any, s: int,
                   t: int, outs: Sequence[Any] = ()) -> torch.Tensor:
        if p_s.dim() != 4 or p_t.dim() != 4 or p_s.shape[-2:] != p_t.shape[-2:] or \
                p_s.shape[0] != p_t.shape[0]:
            raise KdplugError(
                f"attention pair student[{s}] {tuple(p_s.shape)} -> teacher[{t}] "
                f"{tuple(p_t.shape)}: expected [batch, heads, L, L] maps of the same batch and "
                f"length (teacher and student use different tokenizations?)")
        acc = torch.float64 if p_s.dtype == torch.float64 else torch.float32
        p_s, p_t = p_s.to(acc), p_t.to(acc)
        if self.heads == "mean" or p_s.shape[1] != p_t.shape[1]:
            p_s, p_t = p_s.mean(1, keepdim=True), p_t.mean(1, keepdim=True)
        log_s = p_s.clamp_min(self.eps).log()
        log_t = p_t.clamp_min(self.eps).log()
        rows = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)
        mask = _token_mask(batch, (rows.shape[0], rows.shape[-1]), rows.device, *outs)
        if mask is None:
            return rows.mean()
        m = mask[:, None, :].to(rows.dtype).expand_as(rows)
        return (rows * m).sum() / m.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"layers={self.layers!r}, heads={self.heads!r}"


# ----------------------------------------------------------------------------- the composite

def create_base_loss(base: Optional[str], temperature: float, alpha: float,
                     options: Dict[str, Any]) -> Any:
    """The logit loss a composite adds its terms to: ``create_loss(base, ...)`` with the
    same temperature/alpha and the options the composite does not know; None for base "none"."""
    if base in (None, "", "none"):
        if options:
            raise KdplugError(f"unknown loss option(s) {', '.join(sorted(options))} "
                                     "(no base loss to hand them to)")
        return None
    return create_loss(base, temperature=temperature, alpha=alpha, **options)


def hold_base_loss(owner: nn.Module, base_loss: Any) -> None:
    """Keep the base loss as a submodule (its parameters and state train and save with the
    owner) or, for a plain callable, as an attribute; ``owner.base_loss`` reads either."""
    if isinstance(base_loss, nn.Module):
        owner.base = base_loss
    else:
        owner.base = None
        owner._base_fn = base_loss


class FeatureDistillLoss(nn.Module):
    """``base`` logit loss + hidden_weight × HiddenStateLoss + attention_weight × AttentionKLLoss.

    Options (all from the CLI as key=value too):
      base: name of a registered logit loss built with the same temperature/alpha ("kd+ce",
        "kd", "ce"), or "none" for the feature terms alone.
      temperature, alpha: handed to ``base``; further unknown options go to ``base`` as well
        (e.g. ``backend=torch`` for ``kd+ce``).
      hidden_weight, layer_map ("uniform" | "last" | "middle" | "s:t,..."), projection
        ("auto" | "linear" | "none").
      attention_weight, attention_layers ("last" | "uniform" | "s:t,..."), attention_heads
        ("auto" | "mean").
      student_layers, teacher_layers: module paths (``"layer2,layer3"``, ``"features.6"``,
        ``"input:fc"``) whose outputs forward hooks capture for the one active feature term,
        instead of the models' hidden_states/attentions; the i-th student path pairs with the
        i-th teacher path unless a layer map says otherwise. The models are attached with
        ``kdplug.feature_source.attach_models`` (``kdplug.distill`` does it).

    After each call ``last_terms`` holds every term's value (a detached tensor), for logging.
    """

    def __init__(self, base: Optional[str] = "kd+ce", *, temperature: float = 4.0,
                 alpha: float = 0.9, hidden_weight: float = 0.0, attention_weight: float = 0.0,
                 layer_map: LayerMap = "uniform", projection: str = "auto",
                 attention_layers: Optional[LayerMap] = None, attention_heads: str = "auto",
                 student_layers: Any = None, teacher_layers: Any = None,
                 **base_options: Any) -> None:
        super().__init__()
        hidden_weight, attention_weight = float(hidden_weight), float(attention_weight)
        for name, w in (("hidden_weight", hidden_weight), ("attention_weight", attention_weight)):
            if not w >= 0:
                raise KdplugError(f"{name} must be >= 0, got {w}")
        base_loss = create_base_loss(base, temperature, alpha, base_options)
        if base_loss is None and hidden_weight == 0 and attention_weight == 0:
            raise KdplugError("this loss has no term: give a base loss, hidden_weight > 0 "
                                     "or attention_weight > 0")
        self.base_name = None if base_loss is None else base
        hold_base_loss(self, base_loss)
        self.hidden_weight = hidden_weight
        self.attention_weight = attention_weight
        by_path = student_layers is not None or teacher_layers is not None
        if by_path and hidden_weight > 0 and attention_weight > 0:
            raise KdplugError(
                "student_layers/teacher_layers feed one feature term, but both hidden_weight and "
                "attention_weight are > 0; use module paths with one of them")
        self.hidden = self.attention = None
        if hidden_weight > 0:
            self.hidden = HiddenStateLoss(layer_map, projection, FeatureSource(
                "hidden_states", student_layers, teacher_layers))
        if attention_weight > 0:
            if attention_layers is None:  # MiniLM's last-to-last; paths given pair one to one
                attention_layers = "uniform" if by_path else "last"
            self.attention = AttentionKLLoss(attention_layers, attention_heads, source=FeatureSource(
                "attentions", student_layers, teacher_layers))
        if by_path and self.hidden is None and self.attention is None:
            raise KdplugError("student_layers/teacher_layers need a feature term: "
                                     "hidden_weight > 0 or attention_weight > 0")
        requires = set(getattr(base_loss, "requires", ()) or ())
        for term in (self.hidden, self.attention):
            if term is not None:
                requires |= term.feature_source.requires
        self.requires = frozenset(requires)
        self.uses_teacher = True
        self.last_terms: Dict[str, torch.Tensor] = {}

    @property
    def base_loss(self):
        return self.base if self.base is not None else getattr(self, "_base_fn", None)

    def prepare(self, student_out: Any, teacher_out: Any, batch: Any) -> None:
        """Check the outputs fit and create the projections, before the optimizer is built.

        Call it once with both models' outputs on one batch (computed with the flags in
        ``requires``); it raises a clear error for a teacher/student vocabulary (or class count)
        mismatch before any training. (``kdplug.distill``'s dry run calls the loss itself, which
        does the same.)
        """
        if self.base_loss is not None:
            check_logits_match(student_out, teacher_out)
        if self.hidden is not None:
            source = self.hidden.feature_source
            self.hidden.build(source.get(student_out, "student"),
                              source.get(teacher_out, "teacher"))
        if self.attention is not None:
            source = self.attention.feature_source
            s_att = source.get(student_out, "student")
            t_att = source.get(teacher_out, "teacher")
            self.attention.pairs_for(len(s_att), len(t_att))

    def forward(self, student_out: Any, teacher_out: Any, batch: Any) -> torch.Tensor:
        terms: Dict[str, torch.Tensor] = {}
        base = self.base_loss
        if base is not None:
            check_logits_match(student_out, teacher_out)
            terms[self.base_name] = base(student_out, teacher_out, batch)
        if self.hidden is not None:
            terms["hidden"] = self.hidden_weight * self.hidden(student_out, teacher_out, batch)
        if self.attention is not None:
            terms["attention"] = self.attention_weight * self.attention(student_out, teacher_out,
                                                                        batch)
        total = None
        for value in terms.values():
            total = value if total is None else total + value
        self.last_terms = {k: v.detach() for k, v in terms.items()}  # no device sync here
        return total

    def extra_repr(self) -> str:
        return (f"base={self.base_name!r}, hidden_weight={self.hidden_weight:g}, "
                f"attention_weight={self.attention_weight:g}")


def check_logits_match(student_out: Any, teacher_out: Any) -> None:
    """A clear error when the teacher's and the student's logits cannot be compared."""
    s = as_model_output(student_out).logits
    t = as_model_output(teacher_out).logits
    if s.shape[-1] != t.shape[-1]:
        what = "vocabulary" if s.dim() >= 3 else "number of classes"
        raise KdplugError(
            f"teacher and student differ in {what}: teacher logits have {t.shape[-1]}, student "
            f"logits {s.shape[-1]} (shapes {tuple(t.shape)} and {tuple(s.shape)}); logit "
            f"distillation needs one {what} — use one tokenizer/vocab_size for both")
    if s.shape[:-1] != t.shape[:-1]:
        raise KdplugError(
            f"teacher logits {tuple(t.shape)} and student logits {tuple(s.shape)} differ in "
            f"their leading (batch/token) shape; do both models see the same tokenization?")


# ----------------------------------------------------------------------------- registration

def _factory(name: str, **defaults: Any):
    def factory(**options: Any) -> FeatureDistillLoss:
        merged = dict(defaults)
        merged.update(options)
        return FeatureDistillLoss(**merged)

    factory.__name__ = factory.__qualname__ = "loss_" + name.replace("+", "_")
    return factory


LOSSES: Dict[str, Tuple[Dict[str, Any], str]] = {
    "hidden": (dict(base="none", hidden_weight=1.0),
               "MSE of hidden states or feature maps through a learned projection (Linear for "
               "[B, L, d], 1×1 conv for [B, C, H, W]; TinyBERT), uniform layer map"),
    "attention": (dict(base="none", attention_weight=1.0),
                  "KL between attention maps (MiniLM), last layer by default"),
    "kd+ce+hidden": (dict(base="kd+ce", hidden_weight=1.0),
                     "kd+ce plus hidden_weight × hidden"),
    "kd+ce+attention": (dict(base="kd+ce", attention_weight=1.0),
                        "kd+ce plus attention_weight × attention"),
    "kd+ce+hidden+attention": (dict(base="kd+ce", hidden_weight=1.0, attention_weight=1.0),
                               "kd+ce plus hidden and attention terms (TinyBERT-style)"),
}
#: FitNets' name for the projected feature-map MSE: the same loss as its target, under that name.
ALIASES = {"hint": "hidden", "kd+ce+hint": "kd+ce+hidden"}


def _requires(defaults: Dict[str, Any]) -> List[str]:
    return ((["hidden_states"] if defaults.get("hidden_weight") else [])
            + (["attentions"] if defaults.get("attention_weight") else []))


@hookimpl
def register_losses(register):
    factories = {}
    for name, (defaults, description) in LOSSES.items():
        factories[name] = _factory(name, **defaults)
        register(name, factories[name], description=description, requires=_requires(defaults))
    for alias, target in ALIASES.items():
        register(alias, factories[target], alias_of=target,
                 description=f"{target} under FitNets' name (hints on CNN feature maps)",
                 requires=_requires(LOSSES[target][0]))
