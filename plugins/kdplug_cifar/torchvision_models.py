"""Any torchvision classifier as a teacher or student: ``torchvision:NAME``.

``--teacher torchvision:resnet50 --student torchvision:mobilenet_v3_small`` builds the models
with ``torchvision.models.get_model(NAME, num_classes=...)``; the data's ``num_classes`` and
``in_channels`` reach the factory as for the built-in models. The model is torchvision's own
module (no wrapper), so its module paths (``layer3``, ``features.6``) are torchvision's and its
state_dict saves and loads as torchvision's does. Options:

- ``weights``: a local state_dict file (``weights=PATH``), or one of torchvision's weights names
  for NAME (``IMAGENET1K_V1``, ``DEFAULT``, ``ResNet50_Weights.IMAGENET1K_V2``) whose file is
  already in the torch hub cache — kdplug downloads nothing. Tensors whose shape does not fit
  (the 1000-class head on a 100-class model, a replaced stem) stay freshly initialized.
- ``cifar_stem=true``: for 32×32 images, the first convolution becomes a 3×3 stride-1 one and a
  max-pool before the second convolution is dropped (ResNet's ``conv1``/``maxpool``, DenseNet's
  ``conv0``/``pool0``, MobileNet's first conv), as CIFAR ResNets do.
- ``in_channels`` other than 3 replaces the first convolution by one with that many inputs.
- ``image_size`` reaches the vision transformers (``vit_*``), whose position embeddings depend on
  it; the convolutional models take any size.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple
from urllib.parse import urlparse

from torch import nn

import kdplug

from .weights import load_matching, read_state_dict

__all__ = ["torchvision_model", "classifier_names", "hub_cache_file"]


def classifier_names() -> List[str]:
    """torchvision's image classifiers (``torchvision.models`` itself, not detection etc.)."""
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: Any) -> str:
    if not name:
        raise kdplug.KdplugError("a torchvision model is named as torchvision:NAME, e.g. "
                                 "torchvision:resnet18 (`kdplug plugins` lists the plugin)")
    known = classifier_names()
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
        raise kdplug.KdplugError(f"torchvision has no classifier {name!r}{hint} Known: "
                                 f"{', '.join(known)}")
    return str(name)


def _positive_int(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise kdplug.KdplugError(f"torchvision models: {option} must be a positive int, "
                                 f"got {value!r}")
    return value


def _modules_in_order(model: nn.Module, kind: type) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _first_conv(model: nn.Module, name: str) -> Tuple[str, nn.Conv2d]:
    convs = _modules_in_order(model, nn.Conv2d)
    if not convs:
        raise kdplug.KdplugError(f"torchvision:{name} has no convolution to adapt")
    return convs[0]


def adapt_stem(model: nn.Module, name: str, *, in_channels: int, cifar_stem: bool) -> None:
    """Give the first convolution ``in_channels`` inputs and, for ``cifar_stem``, a 3×3 stride-1
    kernel with no max-pool after it."""
    path, conv = _first_conv(model, name)
    if cifar_stem:
        if type(model).__name__ == "VisionTransformer":
            raise kdplug.KdplugError(
                f"cifar_stem does not apply to torchvision:{name}: a vision transformer's patch "
                "embedding is tied to its position embeddings; pass image_size instead")
        convs = _modules_in_order(model, nn.Conv2d)
        second = convs[1][0] if len(convs) > 1 else None
        names = [n for n, _ in model.named_modules()]
        for pool_path, _ in _modules_in_order(model, nn.MaxPool2d):
            if second is None or names.index(pool_path) < names.index(second):
                _replace(model, pool_path, nn.Identity())
            break
    if cifar_stem or in_channels != conv.in_channels:
        kernel, stride, padding = ((3, 3), (1, 1), (1, 1)) if cifar_stem else (
            conv.kernel_size, conv.stride, conv.padding)
        _replace(model, path, nn.Conv2d(in_channels, conv.out_channels, kernel, stride, padding,
                                        dilation=1 if cifar_stem else conv.dilation,
                                        groups=1, bias=conv.bias is not None))


def hub_cache_file(url: str) -> Path:
    """Where torch.hub keeps the file of ``url`` (torch.hub.load_state_dict_from_url's rule)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_weights(name: str, spec: str):
    """torchvision's weights enum member for ``spec`` (short or full name), or None."""
    import torchvision.models

    try:
        if "." in spec:
            return torchvision.models.get_weight(spec)
        return torchvision.models.get_model_weights(name)[spec]
    except (KeyError, ValueError, AttributeError):
        return None


def _load_weights(model: nn.Module, name: str, weights: Any) -> None:
    spec = str(weights)
    if Path(spec).expanduser().is_file():
        load_matching(model, read_state_dict(spec), f"weights file {spec!r}")
        return
    member = _torchvision_weights(name, spec) if "/" not in spec else None
    if member is None:
        import torchvision.models

        known = [m.name for m in torchvision.models.get_model_weights(name)]
        raise kdplug.KdplugError(
            f"torchvision:{name} weights={spec!r}: no such file, and not a torchvision weights "
            f"name for {name} (those are DEFAULT, {', '.join(known)})")
    file = hub_cache_file(member.url)
    if not file.is_file():
        raise kdplug.KdplugError(
            f"torchvision:{name} weights={spec!r} ({type(member).__name__}.{member.name}) are not "
            f"in the torch hub cache ({file} is missing) and kdplug downloads nothing at run "
            f"time. Fetch them once where there is network access, e.g. `python -c \"import "
            f"torchvision; torchvision.models.get_model('{name}', weights='{member.name}')\"`, or "
            f"save a state_dict and pass weights=PATH")
    load_matching(model, read_state_dict(file), f"{type(member).__name__}.{member.name} ({file})")


def torchvision_model(*, name: Optional[str] = None, num_classes: int = 1000,
                      in_channels: int = 3, weights: Optional[str] = None,
                      cifar_stem: bool = False, image_size: Any = None) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=...)`` adapted to the data; see the module
    docstring for the options."""
    import torchvision.models

    name = _check_name(name)
    num_classes = _positive_int("num_classes", num_classes)
    in_channels = _positive_int("in_channels", in_channels)
    if not isinstance(cifar_stem, bool):
        raise kdplug.KdplugError(f"torchvision:{name}: cifar_stem must be true or false, got "
                                 f"{cifar_stem!r}")
    extra = {}
    if name.startswith("vit_") and image_size is not None:
        extra["image_size"] = image_size if isinstance(image_size, int) else int(image_size[0])
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    adapt_stem(model, name, in_channels=in_channels, cifar_stem=cifar_stem)
    if weights is not None:
        _load_weights(model, name, weights)
    return model
