"""Where the mask lands: the share of each layer's parameters that is masked (the paper's Fig. 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch

from fmask.core.errors import FmaskError


class MaskProfileRow(NamedTuple):
    layer: str  # the module holding the parameters, e.g. "layer1.0.conv1"
    parameters: int  # how many parameters the layer has
    masked: int  # how many of them are in the mask
    share: float  # masked / parameters


def layer_of(parameter_name: str) -> str:
    """'layer1.0.conv1.weight' -> 'layer1.0.conv1'; a parameter on the root module is its own layer."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


def mask_profile(masks: Mapping[str, torch.Tensor], order: Sequence[str] | None = None) -> list[MaskProfileRow]:
    """One row per layer, in parameter order (``order``, default the mapping's): weight and bias together."""
    totals: dict[str, list[int]] = {}
    for name in order if order is not None else masks:
        counts = totals.setdefault(layer_of(name), [0, 0])
        counts[0] += masks[name].numel()
        counts[1] += int(masks[name].sum())
    return [MaskProfileRow(layer, n, m, m / n if n else 0.0) for layer, (n, m) in totals.items()]


def mask_profile_from_file(path: str | os.PathLike) -> list[MaskProfileRow]:
    """The profile of a mask file written by ``fmask fisher``."""
    from fmask.fisher.step import FISHER, MASK_KIND
    from fmask.core.readers import read_safetensors

    tensors, metadata = read_safetensors(path, what="Fisher mask", made_by=FISHER)
    if metadata.get("kind") != MASK_KIND or "parameters" not in metadata:
        raise FmaskError(f"{path} is not an fmask Fisher mask; pass the file `{FISHER}` wrote")
    order = json.loads(metadata["parameters"])
    return mask_profile({name: tensors[f"mask.{name}"] for name in order}, order)


def plot_mask_profile(rows: Sequence[MaskProfileRow], path: str | os.PathLike) -> Path:
    """Bar chart of each layer's masked share (percent), layers in network order; writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(max(6.0, 0.22 * len(rows) + 2.0), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = range(len(rows))
    axes.bar(positions, [100.0 * row.share for row in rows], color="tab:blue")
    axes.set_xticks(list(positions), [row.layer for row in rows], rotation=90, fontsize=7)
    axes.set_ylabel("masked parameters of the layer (%)")
    masked = sum(row.masked for row in rows)
    total = sum(row.parameters for row in rows)
    axes.set_title(f"Fisher mask per layer: {masked:,} of {total:,} parameters")
    axes.grid(axis="y", alpha=0.3)
    figure.savefig(path, dpi=120)
    return path
