"""Datasets as uint8 tensors: MNIST, Fashion-MNIST and CIFAR-10.

Reads torchvision's layouts from a data root (``$TENDIFF_DATA``, else ``../shared/data`` when it
exists, else ``~/.cache/tendiff/data``), downloading with torchvision where the network allows.
CIFAR-10 is read from the official pickles when present, else from an ImageFolder layout
``CIFAR10/{train,test}/<class>/*.jpg``. Each decoded split is cached once as a tensor file
(``$TENDIFF_CACHE``, default ``~/.cache/tendiff``), so an epoch never decodes 50,000 JPEGs again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = ("mnist", "fashion_mnist", "cifar10")
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"],
}
IMAGE_SHAPE = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def data_root() -> Path:
    env = os.environ.get("TENDIFF_DATA")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "tendiff" / "data"


def cache_dir() -> Path:
    return Path(os.environ.get("TENDIFF_CACHE", Path.home() / ".cache" / "tendiff"))


@dataclass
class TensorData:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, idx=slice(None)) -> torch.Tensor:
        """Images in [0, 1] as float32."""
        return self.images[idx].float() / 255.0

    def subset(self, n: int) -> "TensorData":
        return TensorData(self.images[:n], self.labels[:n])


def _load_mnist_like(name: str, root: Path, train: bool) -> TensorData:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        ds = cls(str(root), train=train, download=True)
    return TensorData(ds.data.unsqueeze(1).contiguous(), ds.targets.long())


def _load_cifar10(root: Path, train: bool) -> TensorData:
    from torchvision import datasets

    split = "train" if train else "test"
    folder = root / "CIFAR10" / split
    if folder.is_dir():
        return _decode_image_folder(folder)
    try:
        ds = datasets.CIFAR10(str(root), train=train, download=False)
    except RuntimeError:
        ds = datasets.CIFAR10(str(root), train=train, download=True)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return TensorData(images, torch.tensor(ds.targets, dtype=torch.long))


def _decode_image_folder(folder: Path) -> TensorData:
    from torchvision.datasets import ImageFolder
    from torchvision.io import ImageReadMode, decode_image

    ds = ImageFolder(str(folder))
    expected = CLASS_NAMES["cifar10"]
    if ds.classes != expected:
        raise ValueError(f"{folder}: class folders {ds.classes} are not CIFAR-10's {expected}")
    images = torch.empty((len(ds.samples), 3, 32, 32), dtype=torch.uint8)
    for i, (path, _) in enumerate(ds.samples):
        images[i] = decode_image(path, mode=ImageReadMode.RGB)
    return TensorData(images, torch.tensor(ds.targets, dtype=torch.long))


def load_dataset(name: str, split: str = "test", root: str | Path | None = None) -> TensorData:
    """A whole split as uint8 tensors, decoded once and cached."""
    check_dataset(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cache = cache_dir() / f"{name}_{split}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
        return TensorData(blob["images"], blob["labels"])
    root = Path(root) if root is not None else data_root()
    train = split == "train"
    data = _load_cifar10(root, train) if name == "cifar10" else _load_mnist_like(name, root, train)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save({"images": data.images, "labels": data.labels}, tmp)
    tmp.replace(cache)
    return data


def dataset_available(name: str) -> bool:
    """True when a split can be loaded without the network (cached or on disk)."""
    try:
        load_dataset(name, "test")
        return True
    except Exception:
        return False
