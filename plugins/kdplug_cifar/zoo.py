"""The CIFAR model zoo of the distillation benchmarks (RepDistiller, CRD, mdistiller, DKD).

``resnet20``, ``resnet56``, ``resnet8x4``, ``resnet32x4``: CIFAR ResNets (He et al. 2016, §4.2) of
basic blocks, a 3×3 stem without max-pool and three stages at strides 1, 2, 2; the ``x4`` models
are four times wider (stem 32, stages 64/128/256). ``wrn_16_2``, ``wrn_40_2``: pre-activation
wide ResNets (Zagoruyko & Komodakis 2016), depth 6n+4 and widths 16·k, 32·k, 64·k.

The block definitions, module names and parameter counts are those of the benchmark repositories,
so their published checkpoints load into these models (``weights=PATH``). One change: global
average pooling is adaptive (``avgpool``), so inputs other than 32×32 work too; at 32×32 it is the
same 8×8 average. Called with ``output_hidden_states=True`` a model returns a ModelOutput whose
``hidden_states`` are its three stage outputs ``[B, C, H, W]`` (the features AT and SP distil).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import kdplug
from kdplug.outputs import ModelOutput

__all__ = ["CifarResNet", "WideResNet", "ZOO", "build_zoo_model"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, plus the shortcut (a 1×1 conv + BN where the shape changes), ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class _ZooModel(nn.Module):
    """What both families share: input checks, the stages, hidden states on request."""

    stage_names: Tuple[str, str, str] = ("layer1", "layer2", "layer3")

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.conv1.in_channels:
            raise kdplug.KdplugError(
                f"{self.arch} expects images [B, {self.conv1.in_channels}, H, W] (in_channels "
                f"{self.conv1.in_channels}), got {list(x.shape)}")

    def forward(self, x: torch.Tensor, *, output_hidden_states: bool = False,
                output_attentions: bool = False, **unused) -> Union[torch.Tensor, ModelOutput]:
        if output_attentions:
            raise kdplug.KdplugError(f"{self.arch} is a CNN: it has no attention maps "
                                     "(output_attentions=True); use a loss that needs none")
        self._check_input(x)
        out = self.stem(x)
        stages = []
        for name in self.stage_names:
            out = getattr(self, name)(out)
            stages.append(out)
        logits = self.fc(torch.flatten(self.avgpool(self.head(out)), 1))
        if output_hidden_states:
            return ModelOutput(logits=logits, hidden_states=tuple(stages))
        return logits


class CifarResNet(_ZooModel):
    """ResNet-(6n+2) for 32×32 images: stem conv 3×3, three stages of n basic blocks, fc."""

    def __init__(self, depth: int, widths: Tuple[int, int, int, int], *, num_classes: int = 100,
                 in_channels: int = 3, arch: str = "") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise kdplug.KdplugError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.arch = arch or f"resnet{depth}"
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        planes = widths[0]
        for index, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(planes, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(n - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            planes = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return x


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv, BN-ReLU-conv; a 1×1 conv shortcut where widths change
    (then fed the pre-activated input, as in the reference implementation)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal_in_out else self.convShortcut(pre))


class _WideStage(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(_ZooModel):
    """WRN-depth-k: stem conv 16, three stages of n pre-activation blocks, BN-ReLU, pool, fc."""

    stage_names = ("block1", "block2", "block3")

    def __init__(self, depth: int, widen_factor: int, *, num_classes: int = 100,
                 in_channels: int = 3, arch: str = "") -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise kdplug.KdplugError(f"a wide ResNet has depth 6n+4 (16, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        self.arch = arch or f"wrn_{depth}_{widen_factor}"
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(x))


#: name -> builder(num_classes=, in_channels=)
ZOO: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": lambda **o: CifarResNet(20, (16, 16, 32, 64), arch="resnet20", **o),
    "resnet56": lambda **o: CifarResNet(56, (16, 16, 32, 64), arch="resnet56", **o),
    "resnet8x4": lambda **o: CifarResNet(8, (32, 64, 128, 256), arch="resnet8x4", **o),
    "resnet32x4": lambda **o: CifarResNet(32, (32, 64, 128, 256), arch="resnet32x4", **o),
    "wrn_16_2": lambda **o: WideResNet(16, 2, arch="wrn_16_2", **o),
    "wrn_40_2": lambda **o: WideResNet(40, 2, arch="wrn_40_2", **o),
}


def build_zoo_model(name: str, *, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """One zoo model by name, for ``num_classes`` classes and ``in_channels`` input channels."""
    for option, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise kdplug.KdplugError(f"{name}: {option} must be a positive int, got {value!r}")
    return ZOO[name](num_classes=num_classes, in_channels=in_channels)
