"""Built-in kdplug plugin: image models and data.

teachers/students  cnn-teacher, cnn-student (the CIFAR-10 sketch's pair), cnn-tiny-student
                   (a 5k-parameter student); the CIFAR zoo of the
                   distillation benchmarks (resnet20, resnet56, resnet8x4, resnet32x4, wrn_16_2,
                   wrn_40_2), each as teacher and student; torchvision:NAME (any torchvision
                   classifier)
datasets           cifar10, cifar100 (torchvision's on-disk formats), digits (scikit-learn)
"""
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


def cnn_tiny_student(*, in_channels: int = 3, num_classes: int = 10):
    """The tiny student: conv 16, 32 (BatchNorm, ReLU), global average pool, fc."""
    from .models import cnn_tiny_student as build

    return build(in_channels=in_channels, num_classes=num_classes)


def zoo_factory(name: str):
    """The factory of one CIFAR zoo model (see kdplug_cifar.zoo)."""

    def factory(*, num_classes: int = 100, in_channels: int = 3, weights: Optional[str] = None):
        from .zoo import build_zoo_model

        model = build_zoo_model(name, num_classes=num_classes, in_channels=in_channels)
        if weights is not None:
            from .weights import load_matching, read_state_dict

            load_matching(model, read_state_dict(weights), f"weights file {weights!r}")
        return model

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{name} from the CIFAR distillation benchmarks; options num_classes, " \
                      "in_channels, weights (a local state_dict, e.g. a published checkpoint)"
    return factory


def torchvision_factory(**options):
    """torchvision:NAME; see kdplug_cifar.torchvision_models for the options."""
    from .torchvision_models import torchvision_model

    return torchvision_model(**options)


_TORCHVISION_INFO = dict(
    argument="name", options="num_classes, in_channels, weights, cifar_stem, image_size",
    description="any torchvision.models classifier (torchvision:NAME, e.g. "
                "torchvision:resnet50); weights=PATH or a torchvision weights name already in "
                "the torch hub cache; cifar_stem=true for 32x32 images")


#: The CIFAR zoo: name -> (published parameter count in millions at 100 classes, description).
#: (Here, not in .zoo, so that listing plugins imports no torch.)
ZOO_MODELS = {
    "resnet20": (0.28, "CIFAR ResNet-20 (16/32/64 channels)"),
    "resnet56": (0.86, "CIFAR ResNet-56 (16/32/64 channels)"),
    "resnet8x4": (1.23, "CIFAR ResNet-8, 4x wider (64/128/256 channels)"),
    "resnet32x4": (7.43, "CIFAR ResNet-32, 4x wider (64/128/256 channels)"),
    "wrn_16_2": (0.70, "wide ResNet WRN-16-2 (32/64/128 channels)"),
    "wrn_40_2": (2.26, "wide ResNet WRN-40-2 (32/64/128 channels)"),
}


def _register_models(register, builtin_name: str, builtin, builtin_description: str) -> None:
    register(builtin_name, builtin, description=builtin_description,
             options="in_channels, image_size, num_classes, dropout")
    for name, (millions, description) in ZOO_MODELS.items():
        register(name, zoo_factory(name), options="num_classes, in_channels, weights",
                 description=f"{description}, {millions:.2f}M parameters at 100 classes "
                             "(RepDistiller/mdistiller CIFAR zoo)")
    register("torchvision", torchvision_factory, **_TORCHVISION_INFO)


def cifar10(*, root: Optional[str] = None, download: bool = True, verify: bool = True,
            augment: bool = True, train_size: Optional[int] = None,
            test_size: Optional[int] = None):
    """CIFAR-10 via torchvision; see kdplug_cifar.data.cifar10 for the options."""
    from .data import cifar10 as build

    return build(root=root, download=download, verify=verify, augment=augment,
                 train_size=train_size, test_size=test_size)


def cifar100(*, root: Optional[str] = None, download: bool = True, verify: bool = True,
             augment: bool = True, train_size: Optional[int] = None,
             test_size: Optional[int] = None):
    """CIFAR-100 via torchvision; the options are those of cifar10."""
    from .data import cifar100 as build

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
    _register_models(register, "cnn-teacher", cnn_teacher,
                     "CNN: conv 32, 64 (BatchNorm, ReLU), fc 512 (CIFAR-10 sketch's teacher)")


@kdplug.hookimpl
def register_students(register):
    _register_models(register, "cnn-student", cnn_student,
                     "CNN: conv 16, 32 (BatchNorm, ReLU), fc 256 (CIFAR-10 sketch's student)")
    register("cnn-tiny-student", cnn_tiny_student, options="in_channels, num_classes",
             description="CNN: conv 16, 32 (BatchNorm, ReLU), global average pool, fc "
                         "(5.2k parameters; the showcase's student)")


@kdplug.hookimpl
def register_datasets(register):
    register("cifar10", cifar10,
             description="CIFAR-10 via torchvision (3x32x32, 10 classes; augmented, normalized)",
             options="root, download, verify, augment, train_size, test_size")
    register("cifar100", cifar100,
             description="CIFAR-100 via torchvision (3x32x32, 100 classes; augmented, normalized)",
             options="root, download, verify, augment, train_size, test_size")
    register("digits", digits,
             description="scikit-learn's handwritten digits (1x8x8, 10 classes; no download)",
             options="image_size, channels, test_fraction, split_seed, train_size, augment")
