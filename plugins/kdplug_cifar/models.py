"""The CNN teacher and student of the classic CIFAR-10 distillation sketch, done right.

Both are two 3×3 convolutions (padding 1, BatchNorm, ReLU; no pooling) and two linear layers:

    teacher: conv in→32, conv 32→64, fc 64·H·W→512, fc 512→classes
    student: conv in→16, conv 16→32, fc 32·H·W→256, fc 256→classes

``in_channels``, ``image_size`` (an int for square images or ``(H, W)``) and ``num_classes`` adapt
them to other data (e.g. 1×8×8 digits); the engine passes the data set's values. Called with
``output_hidden_states=True`` they return a :class:`kdplug.outputs.ModelOutput` whose
``hidden_states`` are the two conv feature maps ``[B, C, H, W]`` (after ReLU), for feature-hint
losses such as FitNets; plain calls return the logits tensor.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

import kdplug
from kdplug.outputs import ModelOutput

__all__ = ["CNN", "TinyCNN", "cnn_teacher", "cnn_student", "cnn_tiny_student"]


def _size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        try:
            size = tuple(int(s) for s in image_size)  # type: ignore[union-attr]
        except TypeError:
            size = ()
    if len(size) != 2 or min(size) < 1:
        raise kdplug.KdplugError(
            f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise kdplug.KdplugError(f"{name} must be a positive int, got {value!r}")
    return value


class CNN(nn.Module):
    """conv(in→c1)+BN+ReLU, conv(c1→c2)+BN+ReLU, fc(c2·H·W→hidden)+ReLU, fc(→classes)."""

    def __init__(self, channels: Tuple[int, int], hidden: int, *, in_channels: int = 3,
                 image_size: Union[int, Sequence[int]] = 32, num_classes: int = 10,
                 dropout: float = 0.0) -> None:
        super().__init__()
        c1, c2 = channels
        self.in_channels = _positive("in_channels", in_channels)
        self.num_classes = _positive("num_classes", num_classes)
        self.image_size = _size(image_size)
        if not 0.0 <= float(dropout) < 1.0:
            raise kdplug.KdplugError(f"dropout must be in [0, 1), got {dropout!r}")
        height, width = self.image_size
        self.conv1 = nn.Conv2d(self.in_channels, c1, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc1 = nn.Linear(c2 * height * width, hidden)
        self.dropout = nn.Dropout(float(dropout))
        self.fc2 = nn.Linear(hidden, self.num_classes)

    def forward(self, x: torch.Tensor, *, output_hidden_states: bool = False,
                output_attentions: bool = False, **unused) -> Union[torch.Tensor, ModelOutput]:
        if output_attentions:
            raise kdplug.KdplugError(f"{type(self).__name__} is a CNN: it has no attention maps "
                                     "(output_attentions=True); use a loss that needs none")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.image_size):
            raise kdplug.KdplugError(
                f"{type(self).__name__} expects inputs [B, {self.in_channels}, "
                f"{self.image_size[0]}, {self.image_size[1]}] (in_channels, image_size), got "
                f"{list(x.shape)}")
        h1 = F.relu(self.bn1(self.conv1(x)))
        h2 = F.relu(self.bn2(self.conv2(h1)))
        z = self.dropout(F.relu(self.fc1(h2.flatten(1))))
        logits = self.fc2(z)
        if output_hidden_states:
            return ModelOutput(logits=logits, hidden_states=(h1, h2))
        return logits


def cnn_teacher(*, in_channels: int = 3, image_size: Union[int, Sequence[int]] = 32,
                num_classes: int = 10, dropout: float = 0.0) -> CNN:
    """The teacher: 32 and 64 channels, 512 hidden units (33.6M parameters on 3×32×32)."""
    return CNN((32, 64), 512, in_channels=in_channels, image_size=image_size,
               num_classes=num_classes, dropout=dropout)


def cnn_student(*, in_channels: int = 3, image_size: Union[int, Sequence[int]] = 32,
                num_classes: int = 10, dropout: float = 0.0) -> CNN:
    """The student: 16 and 32 channels, 256 hidden units (8.4M parameters on 3×32×32)."""
    return CNN((16, 32), 256, in_channels=in_channels, image_size=image_size,
               num_classes=num_classes, dropout=dropout)


class TinyCNN(nn.Module):
    """conv(in→c1)+BN+ReLU, conv(c1→c2)+BN+ReLU, global average pool, fc(c2→classes).

    No wide fully connected layer: a few thousand parameters whatever the image size, and a
    forward costs a few hundred thousand multiply-adds on 8×8 digits. The showcase's student.
    """

    def __init__(self, channels: Tuple[int, int] = (16, 32), *, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.in_channels = _positive("in_channels", in_channels)
        self.num_classes = _positive("num_classes", num_classes)
        self.conv1 = nn.Conv2d(self.in_channels, c1, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, self.num_classes)

    def forward(self, x: torch.Tensor, *, output_hidden_states: bool = False,
                output_attentions: bool = False, **unused) -> Union[torch.Tensor, ModelOutput]:
        if output_attentions:
            raise kdplug.KdplugError("TinyCNN is a CNN: it has no attention maps "
                                     "(output_attentions=True); use a loss that needs none")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise kdplug.KdplugError(f"TinyCNN expects inputs [B, {self.in_channels}, H, W] "
                                     f"(in_channels), got {list(x.shape)}")
        h1 = F.relu(self.bn1(self.conv1(x)))
        h2 = F.relu(self.bn2(self.conv2(h1)))
        logits = self.fc(torch.flatten(self.pool(h2), 1))
        if output_hidden_states:
            return ModelOutput(logits=logits, hidden_states=(h1, h2))
        return logits


def cnn_tiny_student(*, in_channels: int = 3, num_classes: int = 10) -> TinyCNN:
    """conv 16, 32, global average pool, fc: 5,226 parameters for 1 channel and 10 classes."""
    return TinyCNN((16, 32), in_channels=in_channels, num_classes=num_classes)
