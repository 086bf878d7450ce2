"""Pretrained backbones: where the weights come from (a local state-dict file, or with ``--weights default`` the
library's own cache: torch hub for torchvision, the Hugging Face cache for timm), how they are loaded into fmask's
models (every key must match except the classifier, which is replaced for the pool's classes) and the input size
and normalisation they expect (the library's default config for the model, overridable)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from fmask.core.errors import FmaskError
from fmask.core.hashing import sha256_file
from fmask.train.models import build_model, import_timm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHOWN_KEYS = 3  # how many mismatched keys a refusal names


@dataclass(frozen=True)
class WeightsFile:
    """A located weights file: what was asked for (a path or ``default``), the file read and its sha256."""

    requested: str
    path: Path
    sha256: str

    def record(self) -> dict:
        """What checkpoints and caches write down about the weights."""
        return {"requested": self.requested, "source": str(self.path.resolve()), "sha256": self.sha256}


def split_model_name(name: str) -> tuple[str, str]:
    """``torchvision:NAME`` -> ("torchvision", NAME), ``timm:NAME`` -> ("timm", NAME), else ("fmask", name)."""
    library, _, arch = name.partition(":")
    if arch and library in ("torchvision", "timm"):
        return library, arch
    return "fmask", name


# ---- where the weights come from ------------------------------------------------------------------------------


def locate_weights(model: str, weights: str | os.PathLike) -> WeightsFile:
    """The weights file for ``--weights`` (a path, or ``default``), hashed; one FmaskError line when it is missing."""
    requested = str(weights)
    if requested == "default":
        path = default_weights_file(model)
    else:
        path = Path(requested)
        if not path.is_file():
            raise FmaskError(f"weights file {path} does not exist; pass a .safetensors, .pt or .pth state dict, "
                             "or --weights default for the library's pretrained weights")
    return WeightsFile(requested, path, sha256_file(path))


def default_weights_file(model: str) -> Path:
    """The library's default pretrained weights for ``model``, from its cache (downloaded into it when online)."""
    library, arch = split_model_name(model)
    if library == "torchvision":
        import torchvision

        try:
            url = torchvision.models.get_model_weights(arch).DEFAULT.url
        except (ValueError, KeyError, AttributeError) as exc:
            raise FmaskError(f"torchvision has no pretrained weights for {arch!r}; pass --weights FILE") from exc
        return _hub_cached(url, model)
    if library == "timm":
        timm = import_timm()
        config = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
        if config is None:
            raise FmaskError(f"timm has no pretrained weights for {arch!r}; pass --weights FILE")
        if config.hf_hub_id:
            return _hf_cached(config.hf_hub_id, model)
        if config.url:
            return _hub_cached(config.url, model)
        raise FmaskError(f"timm names no download for {arch!r}'s weights; pass --weights FILE")
    raise FmaskError(f"--weights default exists only for torchvision:NAME and timm:NAME models; pass --weights FILE "
                     f"for {model}")


def _hub_cached(url: str, model: str) -> Path:
    """``url``'s file in torch hub's cache ($TORCH_HOME/hub/checkpoints), fetched there by torch hub if missing."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as exc:  # offline (URLError), refused, disk full: the user can place the file by hand
            raise FmaskError(f"the default weights of {model} are not in torch hub's cache and could not be "
                             f"downloaded ({exc.__class__.__name__}); download {url} and put it at {target}, "
                             "or pass --weights FILE") from exc
    return target


def _hf_cached(repo_id: str, model: str) -> Path:
    """timm's weights file (model.safetensors of ``repo_id``) from the Hugging Face cache, fetched if missing."""
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename="model.safetensors"))
    except Exception as exc:  # offline, HF_HUB_OFFLINE=1, no such file: the user can place the file by hand
        raise FmaskError(
            f"the default weights of {model} are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and could "
            f"not be downloaded ({exc.__class__.__name__}); download https://huggingface.co/{repo_id}/resolve/main/"
            f"model.safetensors and pass it with --weights FILE") from exc


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``
    (a dict holding ``state_dict`` or ``model``, as fmask checkpoints and many training scripts write, is opened)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise FmaskError(f"weights file {path} is corrupt or not a safetensors file; pass a valid state dict") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # whatever the unpickler refuses: the file is never run
            raise FmaskError(f"weights file {path} is not a state dict that loads with torch.load(weights_only=True) "
                             f"({exc.__class__.__name__}); save it with torch.save(model.state_dict(), FILE) or as "
                             ".safetensors") from exc
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise FmaskError(f"weights file {path} holds no state dict (a mapping of names to tensors); save it with "
                         "torch.save(model.state_dict(), FILE)")
    return state


# ---- loading them into a model --------------------------------------------------------------------------------


def _weights_target(model: nn.Module) -> tuple[nn.Module, str]:
    """The module a library state dict describes and the name of its classifier in it."""
    if hasattr(model, "body") and hasattr(model, "classifier_name"):
        return model.body, model.classifier_name
    return model, "head"


def _first_few(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, model_name: str) -> None:
    """Load ``state`` into ``model``'s backbone; the classifier's entries are dropped (the model's ``head`` is
    the pool's). Keys must otherwise match one to one (missing BatchNorm step counters are tolerated); a 3-channel
    stem is summed over its input channels for a 1-channel pool. Refusals name the first few keys."""
    target, classifier = _weights_target(model)
    if target is not model and state and all(k.startswith(("body.", "head.")) for k in state):
        state = {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}  # fmask's own layout
    own = target.state_dict()
    kept = {k: v for k, v in state.items() if k != classifier and not k.startswith(classifier + ".")}
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in kept:
            kept[key] = value
    stem = next((k for k, v in own.items() if v.dim() == 4), None)
    if stem in kept and kept[stem].dim() == 4 and kept[stem].shape[1] == 3 and own[stem].shape[1] == 1 \
            and kept[stem].shape[2:] == own[stem].shape[2:]:
        kept[stem] = kept[stem].sum(dim=1, keepdim=True)  # grayscale x (r, g, b) weights: the same response
    missing = [k for k in own if k not in kept]
    unexpected = [k for k in kept if k not in own]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing ({_first_few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({_first_few(unexpected)})"] if unexpected else [])
        raise FmaskError(f"weights {source} do not fit {model_name}: keys {'; '.join(parts)}; pass weights saved "
                         f"from {model_name} (its state_dict)")
    wrong = [f"{k} {tuple(kept[k].shape)} vs {tuple(own[k].shape)}" for k in own if kept[k].shape != own[k].shape]
    if wrong:
        raise FmaskError(f"weights {source} do not fit {model_name}: shapes differ for {_first_few(wrong)}; pass "
                         f"weights saved from {model_name}")
    target.load_state_dict({k: kept[k].to(own[k].dtype) for k in own})


def pretrained_model(name: str, weights: WeightsFile, *, in_channels: int, num_classes: int,
                     preprocessing: dict, normalization: dict) -> nn.Module:
    """``name`` built with an input adapter for ``preprocessing``, its backbone loaded from ``weights`` and a
    fresh ``head`` for ``num_classes`` (initialised from torch's global generator)."""
    model = build_model(name, in_channels=in_channels, num_classes=num_classes, preprocessing=preprocessing,
                        normalization=normalization)
    load_backbone_weights(model, read_state_dict(weights.path), source=str(weights.path), model_name=name)
    return model


# ---- what the weights expect ----------------------------------------------------------------------------------


def default_preprocessing(model: str) -> dict:
    """Input size, mean and std from the library's default config for ``model``: torchvision's weights meta,
    timm's pretrained config, ImageNet's mean and std at the pool's own size for other models."""
    library, arch = split_model_name(model)
    size, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
    if library == "torchvision":
        import torchvision

        try:
            transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
            size = list(transforms.crop_size) * (2 if len(transforms.crop_size) == 1 else 1)
            mean, std = transforms.mean, transforms.std
        except (ValueError, KeyError, AttributeError, TypeError):
            pass  # a model without published weights: ImageNet statistics at the pool's size
    elif library == "timm":
        timm = import_timm()
        config = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
        if config is not None:
            size, mean, std = list(config.input_size[1:]), config.mean, config.std
    return {"input_size": size, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def resolve_preprocessing(model: str, *, channels: int, input_size: Optional[int | Sequence[int]] = None,
                          mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> dict:
    """The library defaults for ``model`` with ``--input-size``, ``--mean``, ``--std`` laid over them, fitted to
    the pool's ``channels`` (a 1-channel pool takes the mean of 3-channel statistics)."""
    chosen = default_preprocessing(model)
    if input_size is not None:
        size = [int(input_size)] * 2 if isinstance(input_size, int) else [int(v) for v in input_size]
        if len(size) != 2 or min(size) < 1:
            raise FmaskError(f"--input-size {input_size} must be a positive size in pixels, e.g. 224")
        chosen["input_size"] = size
    for key, value in (("mean", mean), ("std", std)):
        if value is not None:
            chosen[key] = [float(v) for v in value]
        if len(chosen[key]) not in (1, 3, channels):
            raise FmaskError(f"--{key} needs {channels} values (one per channel), got {len(chosen[key])}")
        if len(chosen[key]) != channels:
            average = sum(chosen[key]) / len(chosen[key])
            chosen[key] = [average] * channels
    if any(v <= 0 for v in chosen["std"]):
        raise FmaskError(f"--std {chosen['std']} must be positive")
    return chosen


@dataclass(frozen=True)
class Backbone:
    """A model name with its located weights and resolved preprocessing: what a pretrained run starts from."""

    model: str
    weights: WeightsFile
    preprocessing: dict

    @classmethod
    def resolve(cls, model: str, weights: str | os.PathLike, *, channels: int,
                input_size: Optional[int | Sequence[int]] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> "Backbone":
        preprocessing = resolve_preprocessing(model, channels=channels, input_size=input_size, mean=mean, std=std)
        return cls(model, locate_weights(model, weights), preprocessing)

    def build(self, pool: Any) -> nn.Module:
        """The pretrained model for ``pool`` (its channels, classes and normalisation), with a fresh head."""
        return pretrained_model(self.model, self.weights, in_channels=pool.image_shape[0],
                                num_classes=pool.num_classes, preprocessing=self.preprocessing,
                                normalization=pool.manifest["normalization"])

    @property
    def features_step(self) -> dict:
        """What a frozen backbone's features depend on besides the pool."""
        return {"model": self.model, "weights": self.weights.sha256, "preprocessing": self.preprocessing}

    def record(self) -> dict:
        """The checkpoint keys that say what the run started from."""
        return {"weights": self.weights.record(), "preprocessing": self.preprocessing}


def checkpoint_backbone(state: dict, path: Path, *, weights: Optional[str | os.PathLike] = None) -> Backbone:
    """The backbone a ``--finetune head`` checkpoint was trained on: the weights file it records (or ``weights``),
    refused unless its sha256 is the recorded one."""
    record, preprocessing = state.get("weights"), state.get("preprocessing")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or not isinstance(preprocessing, dict):
        raise FmaskError(f"checkpoint {path} is a head checkpoint without its backbone record; retrain it with "
                         "`fmask train --finetune head`")
    expected = record["sha256"]
    source = Path(weights) if weights is not None else Path(str(record.get("source")))
    if not source.is_file():
        raise FmaskError(f"checkpoint {path} is a head on the backbone weights {source} (sha256 {expected[:12]}), "
                         "which are missing; pass --weights with that file")
    digest = sha256_file(source)
    if digest != expected:
        raise FmaskError(f"backbone weights {source} (sha256 {digest[:12]}) are not the ones checkpoint {path} was "
                         f"trained on (sha256 {expected[:12]}); pass --weights with that file")
    return Backbone(state["arch"], WeightsFile(str(record.get("requested", source)), source, digest), preprocessing)


def head_checkpoint_model(state: dict, backbone: Backbone, path: Path) -> nn.Module:
    """The whole model of a head checkpoint: ``backbone``'s weights and the checkpoint's head."""
    model = pretrained_model(state["arch"], backbone.weights, in_channels=int(state["in_channels"]),
                             num_classes=int(state["num_classes"]), preprocessing=backbone.preprocessing,
                             normalization=state["normalization"])
    head = state["state_dict"]
    try:
        model.head.load_state_dict({"weight": head["head.weight"], "bias": head["head.bias"]})
    except (KeyError, RuntimeError) as exc:
        raise FmaskError(f"checkpoint {path} has a malformed head; retrain it with `fmask train --finetune head`") from exc
    return model


def parse_channel_values(text: Optional[str], option: str) -> Optional[list[float]]:
    """``"0.485,0.456,0.406"`` -> [0.485, 0.456, 0.406] (``--mean``/``--std``); None stays None."""
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise FmaskError(f"{option} {text!r} is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406") from exc
    if not values:
        raise FmaskError(f"{option} {text!r} is empty; give one number per channel, e.g. 0.485,0.456,0.406")
    return values
