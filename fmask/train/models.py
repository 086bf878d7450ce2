"""Model zoo. Every model exposes ``forward_features(x) -> (n, E)`` and a final ``head`` (nn.Linear),
so strategies can read penultimate embeddings and the Fisher step can find the classifier layer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from fmask.core.errors import FmaskError

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


class Classifier(nn.Module):
    """A feature body and a linear ``head``: forward(x) = head(head_dropout(forward_features(x))).

    ``head_dropout`` is the identity unless :func:`set_head_dropout` gives it a rate (``fmask train --mc-dropout``,
    for BALD's Monte Carlo dropout passes); it has no parameters, so checkpoints' state_dicts do not change."""

    head: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.head_dropout: nn.Module = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.forward_features(x)))


class SmallCNN(Classifier):
    """A small CNN for CPU runs and tests: two conv blocks, global pooling, one hidden layer."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, embed_dim: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width * 4, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.preprocess: nn.Module = nn.Identity()  # an InputAdapter for pretrained weights

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.preprocess(x))))
        x = F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 4 else x
        x = F.relu(self.bn2(self.conv2(x)))
        x = adaptive_avg_pool2d(x, 2).flatten(1)
        return F.relu(self.fc(x))


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


class CifarResNet18(Classifier):
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
        self.preprocess: nn.Module = nn.Identity()  # an InputAdapter for pretrained weights

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.preprocess(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class TorchvisionClassifier(Classifier):
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
        embed_dim, self.classifier_name = _strip_classifier(body, name)
        if in_channels != 3:
            _adapt_stem(body, in_channels, name)
        self.body = body
        self.head = nn.Linear(embed_dim, num_classes)
        self.preprocess: nn.Module = nn.Identity()  # an InputAdapter for pretrained weights

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(x)).flatten(1)


def _strip_classifier(body: nn.Module, name: str) -> tuple[int, str]:
    """Replace the model's last Linear layer with Identity; returns its input width and its name in ``body``
    (the keys of a pretrained state dict that the new head replaces)."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(body, attr, None)
        if isinstance(module, nn.Linear):
            setattr(body, attr, nn.Identity())
            return module.in_features, attr
        if isinstance(module, nn.Sequential):
            for child_name, child in reversed(list(module.named_children())):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, nn.Identity())
                    return child.in_features, f"{attr}.{child_name}"
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


class HeadOnly(Classifier):
    """A classifier ``head`` on precomputed features: ``forward_features`` is the identity, so the head's are the
    only parameters (what strategies and the Fisher pass see of a frozen-backbone model)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


TIMM_INSTALL = "pip install 'fmask[timm]'"


def import_timm():
    """The timm module, or one line saying how to install it (timm is an optional extra)."""
    try:
        import timm
    except ImportError as exc:
        raise FmaskError(f"timm models need the timm package; install it with {TIMM_INSTALL}") from exc
    return timm


class TimmClassifier(Classifier):
    """A timm model built without its classifier (``num_classes=0``: it returns pooled features) and a ``head``."""

    def __init__(self, name: str, in_channels: int, num_classes: int) -> None:
        super().__init__()
        timm = import_timm()
        if not timm.is_model(name):
            raise FmaskError(f"unknown timm model {name!r}; pick one of timm.list_models()")
        body = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
        classifier = body.pretrained_cfg.get("classifier") or "head"
        self.classifier_name = classifier if isinstance(classifier, str) else classifier[0]
        self.body = body
        # head_hidden_size: the width of the pre-logits features where the head has a hidden layer.
        self.head = nn.Linear(getattr(body, "head_hidden_size", None) or body.num_features, num_classes)
        self.preprocess: nn.Module = nn.Identity()  # an InputAdapter for pretrained weights

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(x)).flatten(1)


class InputAdapter(nn.Module):
    """Turns the pool's normalised input into what a pretrained backbone expects: resized on the device to
    ``size`` (bilinear, antialiased) and normalised with the backbone's mean and std instead of the pool's.

    (x·s_pool + m_pool − m)/s = x·(s_pool/s) + (m_pool − m)/s: one per-channel affine map. The buffers are
    derived, not stored: checkpoints keep the plain weights and the preprocessing in their config."""

    def __init__(self, *, pool_mean: list[float], pool_std: list[float], mean: list[float], std: list[float],
                 size: Optional[tuple[int, int]]) -> None:
        super().__init__()
        pool_mean_t, pool_std_t, mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                                  for v in (pool_mean, pool_std, mean, std))
        self.register_buffer("scale", pool_std_t / std_t, persistent=False)
        self.register_buffer("shift", (pool_mean_t - mean_t) / std_t, persistent=False)
        self.size = tuple(size) if size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return x


MODEL_NAMES = ("resnet18", "cnn", "torchvision:NAME", "timm:NAME")


def build_model(name: str, *, in_channels: int, num_classes: int, preprocessing: Optional[dict] = None,
                normalization: Optional[dict] = None) -> nn.Module:
    """Build an untrained model by name: ``resnet18``, ``cnn``, ``torchvision:NAME`` or ``timm:NAME``.

    ``preprocessing`` (``{"input_size": [H, W] or None, "mean": [...], "std": [...]}``, what pretrained weights
    expect) with the pool's ``normalization`` puts an :class:`InputAdapter` in front of the backbone."""
    if name == "resnet18":
        model: nn.Module = CifarResNet18(in_channels, num_classes)
    elif name == "cnn":
        model = SmallCNN(in_channels, num_classes)
    elif name.startswith("torchvision:") and len(name) > len("torchvision:"):
        model = TorchvisionClassifier(name.split(":", 1)[1], in_channels, num_classes)
    elif name.startswith("timm:") and len(name) > len("timm:"):
        model = TimmClassifier(name.split(":", 1)[1], in_channels, num_classes)
    else:
        raise FmaskError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if preprocessing is not None:
        if normalization is None:
            raise ValueError("an input adapter needs the pool's normalization")
        model.preprocess = InputAdapter(pool_mean=normalization["mean"], pool_std=normalization["std"],
                                        mean=preprocessing["mean"], std=preprocessing["std"],
                                        size=preprocessing.get("input_size"))
    return model


def set_head_dropout(model: nn.Module, rate: float) -> nn.Module:
    """Put a dropout layer of ``rate`` before the head of a :class:`Classifier` (0: none); returns the model."""
    if not 0.0 <= rate < 1.0:
        raise FmaskError(f"--mc-dropout {rate} must be at least 0 and below 1; pass e.g. --mc-dropout 0.3")
    if rate > 0.0:
        if not isinstance(model, Classifier):
            raise FmaskError(f"--mc-dropout needs a feature body under the head; {type(model).__name__} has none: "
                             "drop --mc-dropout")
        model.head_dropout = nn.Dropout(rate)
    return model


def head_dropout_rate(model: nn.Module) -> float:
    """The rate of the dropout layer before the model's head (0.0 when it has none)."""
    layer = getattr(model, "head_dropout", None)
    return float(layer.p) if isinstance(layer, nn.Dropout) else 0.0
