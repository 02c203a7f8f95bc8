"""Built-in loss plugin: published distillation methods, each one registered loss.

=========  ================================  ========  ====================================================
name       paper                             kind      options (defaults)
=========  ================================  ========  ====================================================
``dkd``    Zhao et al., CVPR 2022            logit     tckd_weight α (1), nckd_weight β (8), temperature
                                                       (4), warmup_epochs (20)
``dist``   Huang et al., NeurIPS 2022        logit     inter_weight β (1), intra_weight γ (1), temperature
``at``     Zagoruyko & Komodakis, ICLR 2017  feature   weight (1000), p (2), layer_map ("uniform")
``sp``     Tung & Mori, ICCV 2019            relation  weight (3000), layer_map ("last")
``rkd``    Park et al., CVPR 2019            relation  weight (1), distance_weight (25), angle_weight (50),
                                                       layer_map ("last"), pool ("avg")
``pkt``    Passalis & Tefas, ECCV 2018       relation  weight (30000), layer_map ("last"), pool ("avg")
=========  ================================  ========  ====================================================

Each is a :class:`MethodLoss`: ``base`` (a logit loss by name: ``"ce"`` by default, as in the
published CIFAR recipes whose loss is cross-entropy + the method's term; ``"kd+ce"``, ``"none"``)
plus the method's term. The feature and relation methods read the models' ``hidden_states``
through a layer map, as ``hint`` does. DKD's warm-up follows the epoch the engine gives through
``loss.set_epoch(epoch)``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from ..hookspecs import hookimpl
from .composite import MethodLoss

__all__ = ["MethodLoss", "METHODS", "register_losses"]


def _term_class(name: str) -> type:
    from . import feature_terms, logit_terms  # torch is imported only when a loss is built

    return {"dkd": logit_terms.DKDTerm, "dist": logit_terms.DISTTerm,
            "at": feature_terms.ATTerm, "sp": feature_terms.SPTerm,
            "rkd": feature_terms.RKDTerm, "pkt": feature_terms.PKTTerm}[name]


#: name -> (kind, takes the temperature, description)
METHODS: Dict[str, Tuple[str, bool, str]] = {
    "dkd": ("logit", True, "Decoupled KD (Zhao et al. 2022): ce + warm-up·(α·TCKD + β·NCKD)"),
    "dist": ("logit", True, "DIST (Huang et al. 2022): ce + inter- and intra-class Pearson "
                            "correlation of the soft predictions"),
    "at": ("feature", False, "Attention transfer (Zagoruyko & Komodakis 2017): ce + 1000 × "
                             "distance of normalized spatial attention maps"),
    "sp": ("relation", False, "Similarity-preserving KD (Tung & Mori 2019): ce + 3000 × "
                              "distance of batch similarity matrices"),
    "rkd": ("relation", False, "Relational KD (Park et al. 2019): ce + distance (25) and angle "
                               "(50) relations of embeddings"),
    "pkt": ("relation", False, "Probabilistic knowledge transfer (Passalis & Tefas 2018): ce + "
                               "30000 × KL of cosine-kernel conditional distributions"),
}


def method_factory(name: str) -> Callable[..., MethodLoss]:
    """The factory of one method: the term's options go to the term, the rest to MethodLoss."""
    _, uses_temperature, _ = METHODS[name]

    def factory(*, base: Any = "ce", temperature: float = 4.0, alpha: float = 0.9,
                **options: Any) -> MethodLoss:
        term_class = _term_class(name)
        own = {k: options.pop(k) for k in list(options) if k in term_class.option_names}
        if uses_temperature:
            own["temperature"] = temperature
        return MethodLoss(name, term_class(**own), base=base, temperature=temperature,
                          alpha=alpha, **options)

    factory.__name__ = factory.__qualname__ = f"loss_{name}"
    factory.__doc__ = METHODS[name][2]
    return factory


@hookimpl
def register_losses(register):
    for name, (kind, _, description) in METHODS.items():
        register(name, method_factory(name), description=description, kind=kind,
                 requires=["hidden_states"] if kind != "logit" else [])
