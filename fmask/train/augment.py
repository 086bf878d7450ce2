"""Batch augmentation on the device: random crop with zero padding and horizontal flip, the same
distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, applied to a whole uint8
batch at once instead of one PIL image at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """images: (n, C, H, W) on any device; the random draws come from a CPU ``generator`` (reproducible)."""
    n, _, height, width = images.shape
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[batch, channels, rows, cols]
    if flip:
        flip_mask = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        out = torch.where(flip_mask[:, None, None, None], out.flip(-1), out)
    return out
