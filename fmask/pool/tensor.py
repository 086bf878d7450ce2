"""A pool held in memory: a float tensor (N, C, H, W) of inputs the model takes as they are, its samples named by
their positions 0..N-1. What :func:`fmask.select` runs on when it is given a tensor instead of a built pool."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fmask.core.errors import FmaskError


class TensorPool:
    """Positions 0..N-1 of ``images`` are the sample ids; ``inputs`` gives the rows unchanged (already normalised
    the way the model expects). Nothing is known of paths or labels."""

    has_paths = False

    def __init__(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise FmaskError(f"a pool tensor must be float (N, C, H, W), got {shape}; pass normalised images, or a "
                             "pool from fmask.load_pool")
        self.images = images

    @property
    def ids(self) -> list[int]:
        return list(range(len(self.images)))

    def positions(self, ids: Sequence[int], what: str) -> list[int]:
        """``ids`` as ints, each a position of the tensor; anything else is refused naming ``what``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.images)),
                   None)
        if bad is not None:
            raise FmaskError(f"{what} {bad!r} is not a position of the pool tensor (0..{len(self.images) - 1}); with "
                             "a tensor pool, samples are named by their row")
        return [int(i) for i in ids]

    def inputs(self, ids: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        rows = self.images[torch.as_tensor(list(ids), dtype=torch.long)]
        return rows if device is None else rows.to(device)

    def paths(self, ids: Sequence[int]) -> list[Optional[str]]:
        return [None] * len(ids)
