"""The FisherMask parameter mask: top-k parameters by diagonal Fisher information, and the column order
of the masked gradient embeddings.

Ranking rule (deterministic): parameters are ranked by their Fisher value as stored (float32),
highest first; equal values go to the parameter that comes first in ``model.named_parameters()``
order, then to the lower row-major flat index inside the parameter. With ``head=True`` every
parameter of the final classifier layer (names starting ``head.``) is in the mask and counts toward
k; the remaining k - (head size) entries are the top of the ranking over all other parameters. (Should
the head alone hold k or more entries, the mask is the head's own top k.)

A sparsity *works* with ``head=True`` when k is at least twice the head's size, so the mask holds at least as many
entries outside the classifier layer as in it; below that FisherMask degenerates into BAIT on part of the head.
:func:`check_sparsity_works` refuses such a sparsity, except for a frozen backbone (the head the only trainable
part), where the head's own top k is the intended mask.

Column order of the embeddings: parameters in ``model.named_parameters()`` order; inside a
parameter, the row-major flat indices of its True entries, ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from fmask.core.errors import FmaskError
from fmask.train.models import HEAD_PREFIX


def mask_size(sparsity: float, num_parameters: int) -> int:
    """k = round(sparsity × num_parameters), halves rounded up, for 0 < sparsity ≤ 1."""
    if not (isinstance(sparsity, (int, float)) and 0.0 < float(sparsity) <= 1.0):
        raise FmaskError(f"--sparsity must be in (0, 1], got {sparsity}; e.g. --sparsity 0.002")
    k = int(math.floor(float(sparsity) * num_parameters + 0.5))
    if k < 1:
        raise FmaskError(
            f"--sparsity {sparsity} keeps no parameter of {num_parameters}; use at least {1 / num_parameters:.2g}"
        )
    return k


def is_head_parameter(name: str, head_prefix: str = HEAD_PREFIX) -> bool:
    return name.startswith(head_prefix)


def smallest_working_sparsity(head_size: int, num_parameters: int) -> Optional[float]:
    """The smallest sparsity, rounded up to two significant digits, whose k is at least 2 x ``head_size``;
    None when no sparsity can (the head is more than half the model)."""
    need = 2 * head_size
    if need > num_parameters:
        return None
    exact = (need - 0.5) / num_parameters  # k = floor(s P + 0.5) >= need  <=>  s >= (need - 0.5) / P
    scale = 10.0 ** (1 - math.floor(math.log10(exact)))
    candidate = math.ceil(exact * scale) / scale
    while mask_size(min(candidate, 1.0), num_parameters) < need:  # float rounding of the division above
        candidate += 1 / scale
    return min(candidate, 1.0)


def check_sparsity_works(*, sparsity: float, k: int, head_size: int, num_parameters: int,
                         head_only_trainable: bool) -> None:
    """Refuse (one FmaskError line) a ``--head`` mask of k entries that the classifier layer would mostly fill:
    k < 2 x head size. A frozen backbone (``head_only_trainable``) is exempt: there the head's top k is the mask."""
    if head_only_trainable or k >= 2 * head_size:
        return
    smallest = smallest_working_sparsity(head_size, num_parameters)
    fix = f"use --sparsity {smallest:g} or more, or --no-head" if smallest is not None else "use --no-head"
    raise FmaskError(
        f"--sparsity {sparsity:g} keeps k={k} of {num_parameters} parameters, fewer than twice the classifier "
        f"layer's {head_size}, so the mask would hold little but head weights; {fix}"
    )


def top_k_mask(
    fisher: Mapping[str, torch.Tensor],
    k: int,
    *,
    head: bool = True,
    order: Sequence[str] | None = None,
    head_prefix: str = HEAD_PREFIX,
) -> dict[str, torch.Tensor]:
    """Boolean masks (one per parameter, its shape) holding exactly ``k`` True entries in total.

    ``order`` is the model's parameter order (``named_parameters()``); it defaults to the mapping's
    order. Ranking and ties follow the module docstring.
    """
    names = list(order) if order is not None else list(fisher)
    missing = [name for name in names if name not in fisher]
    if missing or len(names) != len(fisher):
        raise ValueError(f"parameter order and Fisher entries disagree (missing: {missing[:3]})")
    # Rank on the float32 values that get stored, so the mask can be re-derived from the file.
    values = [fisher[name].detach().to("cpu", torch.float32).reshape(-1) for name in names]
    sizes = [v.numel() for v in values]
    total = sum(sizes)
    if not 1 <= k <= total:
        raise FmaskError(f"mask size k={k} must be between 1 and the model's {total} parameters; change --sparsity")
    flat = torch.cat(values) if values else torch.empty(0)
    if not bool(torch.isfinite(flat).all()):
        raise FmaskError("the Fisher diagonal has NaN/inf entries: the model outputs non-finite logits; retrain it")

    is_head = torch.zeros(total, dtype=torch.bool)
    if head:
        start = 0
        for name, size in zip(names, sizes):
            if is_head_parameter(name, head_prefix):
                is_head[start : start + size] = True
            start += size
        if not bool(is_head.any()):
            raise FmaskError(f"--head needs parameters named '{head_prefix}*' and the model has none; use --no-head")
    n_head = int(is_head.sum())
    if n_head >= k:
        # The head has priority: when it alone fills k, its own top-k entries form the mask.
        return _split(_top(flat.masked_fill(~is_head, -math.inf), k), names, sizes, fisher)
    chosen = is_head | _top(flat.masked_fill(is_head, -math.inf), k - n_head)
    return _split(chosen, names, sizes, fisher)


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` largest values; equal values go to the lowest positions."""
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    if count <= 0:
        return chosen
    threshold = torch.topk(values, count).values[-1]
    above = values > threshold
    ties = torch.nonzero(values == threshold).flatten()[: count - int(above.sum())]
    chosen |= above
    chosen[ties] = True
    return chosen


def _split(chosen: torch.Tensor, names: list[str], sizes: list[int], fisher: Mapping[str, torch.Tensor]
           ) -> dict[str, torch.Tensor]:
    masks, start = {}, 0
    for name, size in zip(names, sizes):
        masks[name] = chosen[start : start + size].reshape(fisher[name].shape).clone()
        start += size
    return masks


@dataclass(frozen=True)
class MaskColumns:
    """Where each masked parameter entry lands among the k embedding columns.

    ``names`` lists every parameter (model order), ``indices[i]`` the ascending row-major flat
    indices of ``names[i]``'s masked entries, which occupy columns ``offsets[i] : offsets[i+1]``.
    """

    names: tuple[str, ...]
    indices: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]  # len(names) + 1 entries

    @property
    def k(self) -> int:
        return self.offsets[-1]

    def of(self, name: str) -> tuple[torch.Tensor, int, int]:
        """(flat indices, first column, end column) of parameter ``name``."""
        i = self.names.index(name)
        return self.indices[i], self.offsets[i], self.offsets[i + 1]

    @classmethod
    def from_masks(cls, masks: Mapping[str, torch.Tensor], order: Sequence[str] | None = None) -> "MaskColumns":
        names = tuple(order) if order is not None else tuple(masks)
        if set(names) != set(masks):
            raise ValueError("mask names and parameter order disagree")
        indices, offsets = [], [0]
        for name in names:
            idx = torch.nonzero(masks[name].detach().cpu().reshape(-1)).flatten()
            indices.append(idx)
            offsets.append(offsets[-1] + idx.numel())
        return cls(names=names, indices=tuple(indices), offsets=tuple(offsets))

