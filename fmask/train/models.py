"""Model zoo. Every model exposes ``forward_features(x) -> (n, E)`` and a final ``head`` (nn.Linear),
so strategies can read penultimate embeddings and the Fisher step can find the classifier layer."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from fmask.errors import FmaskError

HEAD_PREFIX = "head."


def window_avg_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """What F.adaptive_avg_pool2d(x, size) computes (output cell i averages rows floor(i·H/size) to
    ceil((i+1)·H/size), likewise columns), from slices and means, whose backward is deterministic on GPUs."""
    height, width = x.shape[-2:]

    def windows(length: int) -> list[tuple[int, int]]:
        return [(i * length // size, -(-(i + 1) * length // size)) for i in range(size)]

    return torch.stack([torch.stack([x[..., r0:r1, c0:c1].mean((-2, -1)) for c0, c1 in windows(width)], -1)
                        for r0, r1 in windows(height)], -2)


def adaptive_avg_pool2d(x: torch.Tensor, size: int) -> torch.Tensor:
    """F.adaptive_avg_pool2d, or under deterministic algorithms its deterministic equivalent: PyTorch's CUDA
    backward of adaptive average pooling accumulates atomically and has no deterministic kernel."""
    if torch.are_deterministic_algorithms_enabled():
        return window_avg_pool2d(x, size)
    return F.adaptive_avg_pool2d(x, size)


class SmallCNN(nn.Module):
    """A small CNN for CPU runs and tests: two conv blocks, global pooling, one hidden layer."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, embed_dim: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 4 else x
        x = F.relu(self.bn2(self.conv2(x)))
        x = adaptive_avg_pool2d(x, 2).flatten(1)
        return F.relu(self.fc(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), about 11.2M parameters as in the paper."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, in_planes = [], 64
        for planes, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = nn.Linear(512, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model split into a feature body and a linear ``head``."""

    def __init__(self, name: str, in_channels: int, num_classes: int) -> None:
        super().__init__()
        import torchvision

        try:
            body = torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError) as exc:
            raise FmaskError(
                f"unknown torchvision model {name!r}; pick one of torchvision.models.list_models()"
            ) from exc
        embed_dim = _strip_classifier(body, name)
        if in_channels != 3:
            _adapt_stem(body, in_channels, name)
        self.body = body
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _strip_classifier(body: nn.Module, name: str) -> int:
    """Replace the model's last Linear layer with Identity and return its input width."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(body, attr, None)
        if isinstance(module, nn.Linear):
            setattr(body, attr, nn.Identity())
            return module.in_features
        if isinstance(module, nn.Sequential):
            for i in reversed(range(len(module))):
                if isinstance(module[i], nn.Linear):
                    width = module[i].in_features
                    module[i] = nn.Identity()
                    return width
    raise FmaskError(f"torchvision model {name!r} has no final Linear layer fmask can replace; use resnet18 or cnn")


def _adapt_stem(body: nn.Module, in_channels: int, name: str) -> None:
    """Give the first convolution ``in_channels`` inputs (grayscale datasets)."""
    for parent in body.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(
                    parent,
                    child_name,
                    nn.Conv2d(in_channels, child.out_channels, child.kernel_size, child.stride,
                              child.padding, child.dilation, child.groups, child.bias is not None),
                )
                return
    raise FmaskError(f"torchvision model {name!r} has no Conv2d stem to adapt to {in_channels} channels")


MODEL_NAMES = ("resnet18", "cnn", "torchvision:NAME")


def build_model(name: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """Build an untrained model by name: ``resnet18``, ``cnn`` or ``torchvision:NAME``."""
    if name == "resnet18":
        return CifarResNet18(in_channels, num_classes)
    if name == "cnn":
        return SmallCNN(in_channels, num_classes)
    if name.startswith("torchvision:") and len(name) > len("torchvision:"):
        return TorchvisionClassifier(name.split(":", 1)[1], in_channels, num_classes)
    raise FmaskError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
