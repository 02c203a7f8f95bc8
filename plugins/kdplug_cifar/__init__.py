"""Built-in kdplug plugin: the CIFAR-10 CNN teacher/student pair and image data providers."""
from typing import Optional, Sequence, Union

import kdplug

# The factories import torch, torchvision and scikit-learn only when called, so that listing
# plugins (`kdplug plugins`) stays fast. The models live in .models, the data providers in .data.


def cnn_teacher(*, in_channels: int = 3, image_size: Union[int, Sequence[int]] = 32,
                num_classes: int = 10, dropout: float = 0.0):
    """The teacher: conv 32, 64 (BatchNorm, ReLU), fc 512 (33.6M parameters on 3×32×32)."""
    from .models import cnn_teacher as build

    return build(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                 dropout=dropout)


def cnn_student(*, in_channels: int = 3, image_size: Union[int, Sequence[int]] = 32,
                num_classes: int = 10, dropout: float = 0.0):
    """The student: conv 16, 32 (BatchNorm, ReLU), fc 256 (8.4M parameters on 3×32×32)."""
    from .models import cnn_student as build

    return build(in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                 dropout=dropout)


def cifar10(*, root: Optional[str] = None, download: bool = True, verify: bool = True,
            augment: bool = True, train_size: Optional[int] = None,
            test_size: Optional[int] = None):
    """CIFAR-10 via torchvision; see kdplug_cifar.data.cifar10 for the options."""
    from .data import cifar10 as build

    return build(root=root, download=download, verify=verify, augment=augment,
                 train_size=train_size, test_size=test_size)


def digits(*, image_size: int = 8, channels: int = 1, test_fraction: float = 0.25,
           split_seed: int = 0, train_size: Optional[int] = None, augment: Union[int, bool] = 0):
    """scikit-learn's digits; see kdplug_cifar.data.digits for the options."""
    from .data import digits as build

    return build(image_size=image_size, channels=channels, test_fraction=test_fraction,
                 split_seed=split_seed, train_size=train_size, augment=augment)


@kdplug.hookimpl
def register_teachers(register):
    register("cnn-teacher", cnn_teacher,
             description="CNN: conv 32, 64 (BatchNorm, ReLU), fc 512 (CIFAR-10 sketch's teacher)",
             options="in_channels, image_size, num_classes, dropout")


@kdplug.hookimpl
def register_students(register):
    register("cnn-student", cnn_student,
             description="CNN: conv 16, 32 (BatchNorm, ReLU), fc 256 (CIFAR-10 sketch's student)",
             options="in_channels, image_size, num_classes, dropout")


@kdplug.hookimpl
def register_datasets(register):
    register("cifar10", cifar10,
             description="CIFAR-10 via torchvision (3x32x32, 10 classes; augmented, normalized)",
             options="root, download, verify, augment, train_size, test_size")
    register("digits", digits,
             description="scikit-learn's handwritten digits (1x8x8, 10 classes; no download)",
             options="image_size, channels, test_fraction, split_seed, train_size, augment")
