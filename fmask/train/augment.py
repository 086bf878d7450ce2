"""The batch pipeline on the device: uint8 images held in device memory (GPU, or RAM on CPU), batches built by
indexing, random crop with zero padding and horizontal flip applied to a whole batch in one gather (the same
distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip on PIL images), normalisation in
the same step, channels-last layout and autocast precision. Random draws come from a CPU generator, so a seed
gives the same batches on every device."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fmask.core.device import free_memory_bytes

RESIDENT_SHARE = 0.5  # device-resident images may use at most this share of free memory; the rest is for training


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of resident images leave enough of ``device``'s free memory for training."""
    return nbytes <= RESIDENT_SHARE * free_memory_bytes(device)


def padded_nbytes(images_shape: Sequence[int], pad: int) -> int:
    """Bytes of a uint8 image store (n, C, H, W) once padded by ``pad`` on each side."""
    n, channels, height, width = images_shape
    return n * channels * (height + 2 * pad) * (width + 2 * pad)


def draw_crop_flip(n: int, *, pad: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-sample crop offsets ``dy``, ``dx`` (uniform in 0..2*pad, as RandomCrop draws them) and flip flags (p=0.5)."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flips


def pad_nhwc(images: torch.Tensor, pad: int) -> torch.Tensor:
    """uint8 (n, C, H, W) -> zero-padded (n, H+2p, W+2p, C), contiguous: the layout the batch gather reads fastest."""
    return F.pad(images, (pad, pad, pad, pad)).permute(0, 2, 3, 1).contiguous()


def gather_crop_flip(padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                     flips: torch.Tensor, *, size: tuple[int, int]) -> torch.Tensor:
    """Rows ``index`` of the padded store (N, H+2p, W+2p, C), each cropped at (dy, dx) to ``size`` and mirrored
    where ``flips``: a single gather. Returns uint8 (n, C, H, W) with channels-last strides."""
    height, width = size
    device = padded.device
    rows = dy[:, None] + torch.arange(height, device=device)  # (n, H)
    ascending = torch.arange(width, device=device)
    # torchvision crops, then flips: column j of a mirrored crop is column W-1-j of the crop.
    cols = dx[:, None] + torch.where(flips[:, None], ascending.flip(0), ascending)  # (n, W)
    batch = padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return batch.permute(0, 3, 1, 2)


def random_crop_flip(images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Augment a uint8 batch (n, C, H, W) on its device: zero-pad, random crop back to (H, W), random mirror.

    Same output distribution as torchvision's RandomCrop((H, W), padding=pad) + RandomHorizontalFlip(); the draws
    come from the CPU ``generator``. Returns a contiguous (n, C, H, W) tensor.
    """
    n, _, height, width = images.shape
    dy, dx, flips = draw_crop_flip(n, pad=pad, flip=flip, generator=generator)
    dy, dx, flips = (t.to(images.device) for t in (dy, dx, flips))
    index = torch.arange(n, device=images.device)
    return gather_crop_flip(pad_nhwc(images, pad), index, dy, dx, flips, size=(height, width)).contiguous()


class Normalizer:
    """uint8 batch -> the float input the model takes, ``(x / 255 - mean) / std`` (bit-equal to Pool.normalize),
    optionally in channels-last layout."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(dtype=torch.float32, memory_format=self.memory_format)
        return x.div_(255.0).sub_(self.mean).div_(self.std)


class TrainBatches:
    """The labeled uint8 images and their batch step for training.

    Resident: the images are padded once and kept on ``device``; a batch is one gather (index + crop + flip).
    Streaming (the pool does not fit, or ``stream=True``): the images stay in host memory; each batch's rows are
    gathered there, copied to the device and augmented there. Both give the same batches for the same draws.
    """

    def __init__(self, images: torch.Tensor, *, pad: int, device: torch.device, stream: bool) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (n, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.size = (images.shape[2], images.shape[3])
        self.pad = pad
        self.device = device
        self.stream = stream
        if stream:
            self.host = images.cpu()
        else:
            # Pad once here, not every batch: the whole batch step becomes a single gather.
            self.store = pad_nhwc(images.to(device), pad)

    def __len__(self) -> int:
        return len(self.host) if self.stream else len(self.store)

    def batch(self, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """uint8 (n, C, H, W) on the device: rows ``index`` cropped at (dy, dx), mirrored where ``flips``.
        ``index`` lives on the CPU for streaming, on the device otherwise; the draws on the device."""
        if not self.stream:
            return gather_crop_flip(self.store, index, dy, dx, flips, size=self.size)
        rows = self.host[index.cpu()]
        if self.device.type == "cuda":
            rows = rows.pin_memory()  # pinned: the copy runs asynchronously while the host gathers the next batch
        rows = rows.to(self.device, non_blocking=True)
        local = torch.arange(len(rows), device=self.device)
        return gather_crop_flip(pad_nhwc(rows, self.pad), local, dy, dx, flips, size=self.size)


def device_images(images: torch.Tensor, device: torch.device, *,
                  stream: Optional[bool] = None) -> tuple[torch.Tensor, bool]:
    """``images`` moved to ``device`` once, unless ``stream`` (None: when they do not fit) leaves them on the host
    for the caller to copy batch by batch; returns (tensor, streamed)."""
    if stream is None:
        stream = device.type != "cpu" and not fits_on_device(images.numel() * images.element_size(), device)
    return (images if stream else images.to(device)), stream
