"""Classifiers that take images in [0, 1] and normalise them inside the model.

Keeping the normalisation inside means every attack (torchattacks, the adaptive attack) works in
[0, 1] pixel space, where eps budgets are defined.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Per-channel statistics of each training split.
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "convnet"  # "convnet" (28x28 gray) or "resnet" (32x32 RGB)
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __post_init__(self):
        for name in ("widths", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        return cls(**d)


def classifier_config(dataset: str) -> ClassifierConfig:
    mean, std = NORMALISATION[dataset]
    if dataset == "cifar10":
        return ClassifierConfig("resnet", 3, 10, (32, 64, 128), mean, std)
    return ClassifierConfig("convnet", 1, 10, (32, 64), mean, std)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvNet(nn.Module):
    """LeNet-5 in spirit (two conv stages, pooling, two dense layers), widened and with
    batch norm so it clears 99% on MNIST in a few CPU minutes."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        w1, w2 = cfg.widths
        self.features = nn.Sequential(
            _conv_bn(cfg.in_channels, w1), _conv_bn(w1, w1), nn.MaxPool2d(2),
            _conv_bn(w1, w2), _conv_bn(w2, w2), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(w2 * 7 * 7, 128), nn.ReLU(inplace=True),
                                        nn.Dropout(0.3), nn.Linear(128, cfg.num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class _ResidualStage(nn.Module):
    """conv -> pool -> two residual convs (the layout of the fast CIFAR-10 ResNets)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.MaxPool2d(2),
                                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.res = nn.Sequential(_conv_bn(cout, cout), _conv_bn(cout, cout))

    def forward(self, x):
        x = self.entry(x)
        return x + self.res(x)


class SmallResNet(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        stem = cfg.widths[0] // 2
        layers = [_conv_bn(cfg.in_channels, stem)]
        cin = stem
        for w in cfg.widths:
            layers.append(_ResidualStage(cin, w))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, cfg.num_classes)

    def forward(self, x):
        h = self.features(x)
        return self.head(F.adaptive_max_pool2d(h, 1).flatten(1))


class NormalizedClassifier(nn.Module):
    """(x in [0, 1]) -> logits; the normalisation is part of the model."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1))
        self.net = ConvNet(cfg) if cfg.arch == "convnet" else SmallResNet(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_classifier(dataset_or_config) -> NormalizedClassifier:
    cfg = dataset_or_config if isinstance(dataset_or_config, ClassifierConfig) else classifier_config(dataset_or_config)
    return NormalizedClassifier(cfg)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Softmax probabilities for images in [0, 1], in batches."""
    model.eval()
    out = [F.softmax(model(images[i:i + batch_size]), dim=1) for i in range(0, len(images), batch_size)]
    return torch.cat(out)
