"""Image data providers: CIFAR-10 and CIFAR-100 (torchvision), scikit-learn's digits (no download).

Both return a :class:`kdplug.data.DataSplits` whose items are ``(image [C, H, W] float32, label)``
and whose ``model_options`` (``in_channels``, ``image_size``, ``num_classes``) shape the CNNs.
"""
from __future__ import annotations

import importlib.util
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

import kdplug
from kdplug.data import DataSplits

__all__ = ["cifar10", "cifar100", "digits", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10_FILES",
           "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR100_FILES", "DATA_DIR_ENV"]

#: Per-channel mean and standard deviation of the CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
#: The same for CIFAR-100 (training images).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
#: Where `cifar10` looks when no ``root`` is given (default: ./data).
DATA_DIR_ENV = "KDPLUG_DATA_DIR"


def _subset(dataset: Dataset, size: Optional[int], option: str) -> Dataset:
    if size is None:
        return dataset
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise kdplug.KdplugError(f"{option} must be a positive int, got {size!r}")
    return Subset(dataset, range(min(size, len(dataset))))  # the first `size` items: deterministic


# ----------------------------------------------------------------------------- CIFAR-10/100

@dataclass(frozen=True)
class CifarSpec:
    """What tells CIFAR-10 and CIFAR-100 apart: their torchvision class, files and statistics."""

    name: str  # "CIFAR-10"
    torchvision_class: str  # "CIFAR10"
    folder: str  # "cifar-10-batches-py"
    files: Tuple[str, ...]
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    size_mb: int
    format: str  # the on-disk format, for error messages

    def dataset_class(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)


CIFAR10 = CifarSpec(
    "CIFAR-10", "CIFAR10", CIFAR10_FOLDER, CIFAR10_FILES, 10, CIFAR10_MEAN, CIFAR10_STD, 163,
    "pickled dicts with 'data' uint8 [N, 3072] and 'labels'; batches.meta with 'label_names'")
CIFAR100 = CifarSpec(
    "CIFAR-100", "CIFAR100", CIFAR100_FOLDER, CIFAR100_FILES, 100, CIFAR100_MEAN, CIFAR100_STD,
    161, "pickled dicts with 'data' uint8 [N, 3072] and 'fine_labels'; meta with "
         "'fine_label_names'")


def _download(root: Path, spec: CifarSpec = CIFAR10) -> None:
    """Fetch and extract the official archive into root (torchvision checks its md5)."""
    from torchvision.datasets.utils import download_and_extract_archive

    cls = spec.dataset_class()
    download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)


def _missing(folder: Path, spec: CifarSpec = CIFAR10) -> List[str]:
    return [name for name in spec.files if not (folder / name).is_file()]


def _cifar_dataset_class(spec: CifarSpec = CIFAR10):
    base = spec.dataset_class()

    class CifarFiles(base):
        """torchvision's CIFAR class, whose integrity check can be the format instead of the md5.

        ``verify=True`` keeps torchvision's check: each file's md5 must be the official one.
        ``verify=False`` accepts any files in the same on-disk format (e.g. a small locally
        generated copy for tests); the format is checked when the files load.
        """

        def __init__(self, root: str, train: bool, transform: Any, verify: bool) -> None:
            self.verify = verify
            super().__init__(root, train=train, transform=transform, download=False)

        def _check_integrity(self) -> bool:
            if self.verify:
                return super()._check_integrity()
            return not _missing(Path(self.root) / self.base_folder, spec)

        def _load_meta(self) -> None:
            if self.verify:
                return super()._load_meta()
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            with open(path, "rb") as infile:
                self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    CifarFiles.__name__ = CifarFiles.__qualname__ = f"{spec.torchvision_class}Files"
    return CifarFiles


def _how_to_get(root: Path, spec: CifarSpec = CIFAR10) -> str:
    cls = spec.dataset_class()
    return (f"To get it: download {cls.url} ({spec.size_mb} MB) on a machine with network access "
            f"and extract it with `tar xzf {cls.filename} -C {root}` (that creates "
            f"{spec.folder}/), or point --data-option root=DIR at a folder that holds "
            f"{spec.folder}/.")


def _open_cifar(root: Path, download: bool, verify: bool, transforms: Sequence[Any],
                spec: CifarSpec = CIFAR10) -> tuple:
    folder = root / spec.folder
    missing = _missing(folder, spec)
    if missing and download:
        try:
            _download(root, spec)
        except Exception as exc:  # no network, proxy, disk full, bad archive, ...
            raise kdplug.KdplugError(
                f"{spec.name} not found: looked in {folder} for {', '.join(spec.files)} "
                f"(missing: {', '.join(missing)}), and downloading it failed: "
                f"{type(exc).__name__}: {exc}. {_how_to_get(root, spec)}") from None
        missing = _missing(folder, spec)
    if missing:
        why = ("download=true did not produce them" if download else
               "download=false, so nothing was downloaded (--data-option download=true fetches "
               "it when there is network access)")
        raise kdplug.KdplugError(
            f"{spec.name} not found: looked in {folder} for {', '.join(spec.files)} (missing: "
            f"{', '.join(missing)}); {why}. {_how_to_get(root, spec)}")
    cls = _cifar_dataset_class(spec)
    splits = []
    for train, transform in zip((True, False), transforms):
        try:
            dataset = cls(str(root), train=train, transform=transform, verify=verify)
        except RuntimeError as exc:
            if verify and "corrupted" in str(exc):
                raise kdplug.KdplugError(
                    f"the {spec.name} files in {folder} fail torchvision's md5 check (corrupted, "
                    "or not the official files). Download them again, or, for a locally "
                    "generated copy in the same format, pass --data-option verify=false (checks "
                    "the format instead).") from None
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
            raise kdplug.KdplugError(
                f"the {spec.name} files in {folder} are not in the {spec.name} python format "
                f"({spec.format}): {type(exc).__name__}: {exc}") from None
        labels = torch.as_tensor(dataset.targets)
        if len(labels) != len(dataset.data) or (len(labels) and (
                int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes)):
            raise kdplug.KdplugError(
                f"the {spec.name} files in {folder} hold {len(dataset.data)} images but "
                f"{len(labels)} labels, or labels outside 0..{spec.num_classes - 1}")
        splits.append(dataset)
    return tuple(splits)


def _cifar(spec: CifarSpec, root: Optional[str], download: bool, verify: bool, augment: bool,
           train_size: Optional[int], test_size: Optional[int]) -> DataSplits:
    from torchvision import transforms as T

    root_path = Path(root if root is not None else os.environ.get(DATA_DIR_ENV, "data"))
    root_path = root_path.expanduser().resolve()
    normalize = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
                          if augment else []) + normalize)
    train, test = _open_cifar(root_path, bool(download), bool(verify),
                              (train_tf, T.Compose(normalize)), spec)
    classes = spec.num_classes
    return DataSplits(
        train=_subset(train, train_size, "train_size"), test=_subset(test, test_size, "test_size"),
        num_classes=classes, input_shape=(3, 32, 32),
        model_options={"in_channels": 3, "image_size": 32, "num_classes": classes},
        info={"source": str(root_path / spec.folder), "classes": list(train.classes),
              "augment": bool(augment), "verify": bool(verify)},
    )


def cifar10(*, root: Optional[str] = None, download: bool = True, verify: bool = True,
            augment: bool = True, train_size: Optional[int] = None,
            test_size: Optional[int] = None) -> DataSplits:
    """CIFAR-10 through torchvision: 50,000 training and 10,000 test images, 3×32×32, 10 classes.

    Options:
        root: the folder that holds (or will hold) ``cifar-10-batches-py/``; default
            ``$KDPLUG_DATA_DIR`` or ``./data``.
        download: fetch the official archive when the files are missing (default true).
        verify: torchvision's md5 check of every file (default true). ``verify=false`` checks the
            on-disk format instead, for locally generated data in the same format.
        augment: random crop (padding 4) and horizontal flip for training (default true).
        train_size, test_size: use only the first N images of a split (quick runs).
    """
    return _cifar(CIFAR10, root, download, verify, augment, train_size, test_size)


def cifar100(*, root: Optional[str] = None, download: bool = True, verify: bool = True,
             augment: bool = True, train_size: Optional[int] = None,
             test_size: Optional[int] = None) -> DataSplits:
    """CIFAR-100 through torchvision: 50,000 training and 10,000 test images, 3×32×32, 100 (fine)
    classes; the folder is ``cifar-100-python/``. The options are those of :func:`cifar10`."""
    return _cifar(CIFAR100, root, download, verify, augment, train_size, test_size)


# ----------------------------------------------------------------------------- digits

class _Shifted(Dataset):
    """Training images translated by a random offset of up to ``shift`` pixels each way (the
    uncovered border gets the background value); the offset comes from torch's global RNG, which
    the engine seeds per item, so it is reproducible."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int, fill: float) -> None:
        self.images, self.labels, self.shift, self.fill = images, labels, shift, fill

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        image, s = self.images[index], self.shift
        dy, dx = (torch.randint(-s, s + 1, (2,)) + s).tolist()
        height, width = image.shape[-2:]
        padded = F.pad(image, (s, s, s, s), value=self.fill)
        return padded[:, dy:dy + height, dx:dx + width], self.labels[index]


def _digits_arrays() -> tuple:
    """The 1,797 digits as (pixels float32 [N, 64] in 0..16, labels int64 [N]): the CSV file
    scikit-learn ships, read without importing scikit-learn (seconds of start-up for one file)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise kdplug.KdplugError("the digits data set comes with scikit-learn, which is not "
                                 "installed: pip install 'kdplug[data]'")
    folders = list(spec.submodule_search_locations or [])
    found = [Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders]
    found = [f for f in found if f.is_file()]
    if found:
        table = torch.as_tensor(np.loadtxt(found[0], delimiter=","), dtype=torch.float32)
        return table[:, :-1].contiguous(), table[:, -1].to(torch.int64)
    from sklearn.datasets import load_digits  # a scikit-learn that keeps the file elsewhere

    bunch = load_digits()
    return (torch.as_tensor(bunch.data, dtype=torch.float32),
            torch.as_tensor(bunch.target, dtype=torch.int64))


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int) -> tuple:
    """(train, test) indices: ``test_fraction`` of every class held out (ceil(N·fraction) in
    all, spread over the classes by largest remainder), each class's pick and both orders drawn
    from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    share = counts.double() * test_fraction
    n_test = share.floor().long()
    short = math.ceil(len(labels) * test_fraction) - int(n_test.sum())
    n_test[torch.argsort(share - share.floor(), descending=True, stable=True)[:short]] += 1
    train, test = [], []
    for label, n in zip(classes.tolist(), n_test.tolist()):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        test.append(members[:n])
        train.append(members[n:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    return (train_idx[torch.randperm(len(train_idx), generator=g)],
            test_idx[torch.randperm(len(test_idx), generator=g)])


def digits(*, image_size: int = 8, channels: int = 1, test_fraction: float = 0.25,
           split_seed: int = 0, train_size: Optional[int] = None,
           augment: Union[int, bool] = 0) -> DataSplits:
    """scikit-learn's handwritten digits: 1,797 real 8×8 grey images, 10 classes, no download.

    A stratified split (``test_fraction`` of each class held out, fixed by ``split_seed``),
    standardized with the training split's mean and std. Options:
        image_size: upsample (bilinear) to this size; 8 is native.
        channels: 1, or 3 to repeat the grey channel (for models fixed to RGB input).
        train_size: keep only the first N training images (after the shuffled split).
        augment: translate each training image by a random offset of up to this many (8×8)
            pixels each way; 0 (the default) turns augmentation off. ``true``/``false`` read as
            1 and 0, as the switch of cifar10's ``augment``.
    """
    if isinstance(augment, bool):  # a switch, as for cifar10: on is the smallest shift
        augment = int(augment)
    for name, value, low in (("image_size", image_size, 1), ("channels", channels, 1),
                             ("augment", augment, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise kdplug.KdplugError(f"digits: {name} must be an int >= {low}, got {value!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise kdplug.KdplugError(f"digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    pixels, y = _digits_arrays()
    x = pixels.reshape(-1, 1, 8, 8) / 16.0
    train_idx, test_idx = _stratified_split(y, float(test_fraction), int(split_seed))
    if train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, int) or train_size < 1:
            raise kdplug.KdplugError(
                f"digits: train_size must be a positive int, got {train_size!r}")
        train_idx = train_idx[:train_size]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if channels != 1:
        x = x.repeat(1, channels, 1, 1)
    x = x.contiguous()
    if augment:
        shift = max(1, round(augment * image_size / 8))
        train: Dataset = _Shifted(x[train_idx], y[train_idx], shift, float(-mean / std))
    else:
        train = TensorDataset(x[train_idx], y[train_idx])
    return DataSplits(
        train=train, test=TensorDataset(x[test_idx], y[test_idx]),
        num_classes=10, input_shape=(channels, image_size, image_size),
        model_options={"in_channels": channels, "image_size": image_size, "num_classes": 10},
        info={"source": "scikit-learn's digits (sklearn/datasets/data/digits.csv.gz)",
              "train_samples": len(train_idx), "test_samples": len(test_idx), "augment": augment},
    )
