"""Feature and relation methods: AT, SP (feature maps) and RKD, PKT (embeddings).

Each term reads pairs of (student, teacher) features: module paths ``student_layers`` /
``teacher_layers`` captured with forward hooks (paired in order), or the models'
``hidden_states`` (asked for with ``output_hidden_states=True``) matched by a layer map
(``"uniform"``, ``"last"``, ``"middle"`` or pairs ``"s:t,..."``, as for ``hint``). The teacher
side is detached. The weights
default to the published CIFAR-100 recipes (CRD/RepDistiller, mdistiller), whose total loss is
cross-entropy + weight × term; the formulas are the authors' code's, noted per term where the code
and the paper's text differ.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KdplugError
from ..feature_losses import LayerMap, parse_layer_map, resolve_layer_map
from ..feature_source import FeatureSource

from .composite import check_weight

__all__ = ["ATTerm", "SPTerm", "RKDTerm", "PKTTerm", "attention_map", "pooled"]

POOLS = ("avg", "flatten")


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pooled(feature: torch.Tensor, pool: str) -> torch.Tensor:
    """An embedding [B, d]: "avg" averages a map [B, C, H, W] over positions (a sequence [B, L, d]
    over tokens); "flatten" keeps every value."""
    if pool == "flatten" or feature.dim() == 2:
        return feature.reshape(feature.shape[0], -1)
    if feature.dim() == 4:
        return feature.mean((2, 3))
    if feature.dim() == 3:
        return feature.mean(1)
    return feature.reshape(feature.shape[0], -1)


class _PairedTerm(nn.Module):
    """weight × Σ over the mapped (student, teacher) feature pairs of ``pair_loss``.

    Features: the models' hidden_states matched by ``layer_map`` (each method's default), or
    module paths ``student_layers``/``teacher_layers`` captured by forward hooks, the i-th
    student path with the i-th teacher path unless ``layer_map`` is given.
    """

    option_names: Tuple[str, ...] = ("weight", "layer_map", "student_layers", "teacher_layers")
    default_layer_map: str = "uniform"

    def __init__(self, weight: float, layer_map: Optional[LayerMap], student_layers: Any = None,
                 teacher_layers: Any = None) -> None:
        super().__init__()
        self.weight = check_weight("weight", weight)
        self.feature_source = FeatureSource("hidden_states", student_layers, teacher_layers)
        if layer_map is None:
            layer_map = "uniform" if self.feature_source.by_path else self.default_layer_map
        self.layer_map = parse_layer_map(layer_map)

    @property
    def requires(self) -> frozenset:
        return self.feature_source.requires

    def pairs(self, student_out: Any, teacher_out: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        s_feats = self.feature_source.get(student_out, "student")
        t_feats = self.feature_source.get(teacher_out, "teacher")
        pairs = resolve_layer_map(self.layer_map, len(s_feats), len(t_feats))
        return [(s_feats[s], t_feats[t].detach()) for s, t in pairs]

    def forward(self, student_out: Any, teacher_out: Any, batch: Any) -> torch.Tensor:
        total = None
        for s_feat, t_feat in self.pairs(student_out, teacher_out):
            if s_feat.shape[0] != t_feat.shape[0]:
                raise KdplugError(f"{type(self).__name__}: student feature "
                                         f"{tuple(s_feat.shape)} and teacher feature "
                                         f"{tuple(t_feat.shape)} differ in batch size")
            acc = _acc(s_feat)
            term = self.pair_loss(s_feat.to(acc), t_feat.to(acc))
            total = term if total is None else total + term
        return self.weight * total

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------- AT

def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: the channel mean of |A|^p per position, as a
    unit-L2 vector per sample ([B, H·W]; a [B, L, d] sequence gives [B, L])."""
    channel_dim = 1 if feature.dim() == 4 else -1
    return F.normalize(feature.abs().pow(p).mean(channel_dim).reshape(feature.shape[0], -1), dim=1)


class ATTerm(_PairedTerm):
    """Attention transfer (ICLR 2017): Σ_pairs mean over samples and positions of
    (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², Q = Σ_c |A_c|^p. The paper writes the p-norm of the difference;
    the authors' code (and every CIFAR benchmark) takes this squared mean, with weight 1000.
    Maps of different sizes: the larger is average-pooled to the smaller.

    weight 1000, p 2, layer_map "uniform" (every stage to its counterpart).
    """

    option_names = _PairedTerm.option_names + ("p",)

    def __init__(self, weight: float = 1000.0, layer_map: Optional[LayerMap] = None,
                 p: float = 2.0, **paths: Any) -> None:
        super().__init__(weight, layer_map, **paths)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise KdplugError(f"AT's p must be a number > 0, got {p!r}")
        self.p = float(p)

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if s.dim() == 4 and t.dim() == 4 and s.shape[-2:] != t.shape[-2:]:
            size = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:]))
            s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        a_s, a_t = attention_map(s, self.p), attention_map(t, self.p)
        if a_s.shape != a_t.shape:
            raise KdplugError(f"AT: student feature {tuple(s.shape)} and teacher feature "
                                     f"{tuple(t.shape)} give attention maps of different sizes")
        return (a_s - a_t).pow(2).mean()


# ----------------------------------------------------------------------------- SP

class SPTerm(_PairedTerm):
    """Similarity-preserving KD (ICCV 2019): G = F·Fᵀ over the batch (F: each sample's flattened
    feature), rows L2-normalized; Σ_pairs ‖G_t − G_s‖²_F / b². Student and teacher widths may
    differ (only b×b matrices are compared).

    weight 3000, layer_map "last".
    """

    default_layer_map = "last"

    def __init__(self, weight: float = 3000.0, layer_map: Optional[LayerMap] = None,
                 **paths: Any) -> None:
        super().__init__(weight, layer_map, **paths)

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = s.shape[0]
        s, t = s.reshape(b, -1), t.reshape(b, -1)
        g_s = F.normalize(s @ s.t(), dim=1)
        g_t = F.normalize(t @ t.t(), dim=1)
        return (g_t - g_s).pow(2).sum() / (b * b)


# ----------------------------------------------------------------------------- RKD

def _distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    square = e.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [j, i] = unit(e_i − e_j)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


class RKDTerm(_PairedTerm):
    """Relational KD (CVPR 2019) on embeddings: distance_weight · Huber(ψ_D) + angle_weight ·
    Huber(ψ_A). ψ_D: pairwise distances divided by their mean over distinct pairs; ψ_A: cosines
    of the angle at every vertex of every triplet (degenerate ones, with a repeated sample, are 0
    on both sides). Huber is smooth-L1 with δ = 1, averaged over all pairs / triplets.

    weight 1, distance_weight 25, angle_weight 50 (the CIFAR recipes; the paper's 1 and 2 are for
    metric learning), layer_map "last", pool "avg" (the penultimate, pooled feature).
    """

    option_names = _PairedTerm.option_names + ("distance_weight", "angle_weight", "pool")
    default_layer_map = "last"

    def __init__(self, weight: float = 1.0, layer_map: Optional[LayerMap] = None,
                 distance_weight: float = 25.0, angle_weight: float = 50.0,
                 pool: str = "avg", **paths: Any) -> None:
        super().__init__(weight, layer_map, **paths)
        self.distance_weight = check_weight("distance_weight", distance_weight)
        self.angle_weight = check_weight("angle_weight", angle_weight)
        self.pool = _check_pool(pool)

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = pooled(s, self.pool), pooled(t, self.pool)
        loss = s.new_zeros(())
        if self.distance_weight:
            d_s, d_t = _distances(s), _distances(t)
            d_s = d_s / d_s[d_s > 0].mean().clamp_min(1e-12)
            d_t = d_t / d_t[d_t > 0].mean().clamp_min(1e-12)
            loss = loss + self.distance_weight * F.smooth_l1_loss(d_s, d_t)
        if self.angle_weight:
            loss = loss + self.angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
        return loss


# ----------------------------------------------------------------------------- PKT

class PKTTerm(_PairedTerm):
    """Probabilistic knowledge transfer (ECCV 2018): each sample's conditional distribution over
    the batch, p_{j|i} ∝ (cos(e_i, e_j) + 1)/2, matched by KL(teacher ‖ student). As in the
    authors' code, the sums include j = i and the KL is averaged over the b² entries (with
    eps = 1e-7 inside the log).

    weight 30000, layer_map "last", pool "avg".
    """

    option_names = _PairedTerm.option_names + ("pool",)
    default_layer_map = "last"

    def __init__(self, weight: float = 30000.0, layer_map: Optional[LayerMap] = None,
                 pool: str = "avg", eps: float = 1e-7, **paths: Any) -> None:
        super().__init__(weight, layer_map, **paths)
        self.pool = _check_pool(pool)
        self.eps = eps

    def _conditional(self, e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=1, eps=self.eps)
        similarity = (e @ e.t() + 1.0) / 2.0
        return similarity / similarity.sum(1, keepdim=True)

    def pair_loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        q = self._conditional(pooled(s, self.pool))
        p = self._conditional(pooled(t, self.pool))
        return (p * torch.log((p + self.eps) / (q + self.eps))).mean()


def _check_pool(pool: Any) -> str:
    if pool not in POOLS:
        raise KdplugError(f"pool must be one of {', '.join(POOLS)}, got {pool!r} (how a "
                                 "feature map becomes the embedding RKD/PKT relate)")
    return pool

