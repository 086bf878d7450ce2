"""Exact diagonal Fisher and masked per-class gradient embeddings, batched.

For a sample x with class probabilities p, the softmax Hessian diag(p) - p pᵀ has the square root
whose columns are s_v = sqrt(p_v)(e_v - p), v = 1..r. The vector-Jacobian product Jᵀ s_v is the
gradient sqrt(p_v) ∇_θ log p_v(x): row v of the embedding V_x, and the Fisher diagonal is
F_i = mean_x Σ_v (Jᵀ s_v)_i². Both come from r backward passes per batch; the Fisher from r - 1, through a
factor of the rank-(r - 1) Hessian with one column fewer (softmax_hessian_factor).

How the per-sample, per-class gradients are formed without materializing per-sample Jacobians:
one forward pass records each supported layer's input and output (forward hooks); then r backward
passes, one per column s_v, ask autograd for the gradients with respect to those outputs only (the
weights are frozen meanwhile, so autograd forms no weight gradient, and a pass stops at the deepest
layer it needs). A tensor hook on each output turns (input, output gradient) into the layer's
per-sample parameter gradients as soon as the gradient exists: in Fisher mode squared and summed over
the batch at once, in embedding mode only the masked entries.
A layer output the model later modifies in place (ReLU(inplace=True)) is handed on as a copy, so the
kept tensor still is the layer's output.

* ``nn.Linear``: grad W = g aᵀ per sample (summed over any extra sequence dimensions).
* ``nn.Conv2d`` (any stride, padding incl. 'same' and non-zero padding modes, dilation, groups):
  grad W = g · unfold(a)ᵀ per sample, or a grouped weight-gradient convolution for large feature maps.
* ``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics: grad γ = Σ g·x̂, grad β = Σ g.

Generic fallback: every other parameter (other module types, parameters registered directly on a
container, shared parameters, layers called more or less than once per forward) gets exact per-sample
gradients through ``torch.func`` (vmap over samples of a vjp over the r columns). It costs a full
per-sample backward, so it is meant for the few parameters such modules hold; none is dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fmask.core.cpu_allocator import tune_cpu_allocator
from fmask.core.device import usable_memory_bytes
from fmask.core.errors import FmaskError
from fmask.fisher.mask import MaskColumns
from fmask.core.progress import ProgressFn

# Either the inputs themselves (N, ...) or a loader mapping positions 0..N-1 to an input batch.
InputSource = Union[torch.Tensor, Callable[[Sequence[int]], torch.Tensor]]

DEFAULT_BATCH_SIZE = 64  # on a CPU: cache-sized work (see plan_fisher_pass for accelerators)
# Upper bound on the elements of any per-sample intermediate (per-sample gradients, unfolded inputs), on a CPU.
DEFAULT_MAX_ELEMENTS = 1 << 22
# On an accelerator, launches are what costs: batches of up to MAX_DEVICE_BATCH samples and intermediates of up
# to MAX_DEVICE_ELEMENTS elements (1 GiB of float32), as far as the memory fmask may use there allows.
MAX_DEVICE_BATCH = 1024
MAX_DEVICE_ELEMENTS = 1 << 28

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def softmax_hessian_sqrt(logits: torch.Tensor) -> torch.Tensor:
    """(n, r, r): entry [i, v] is sqrt(p_v)(e_v - p) for sample i, so Σ_v s_v s_vᵀ = diag(p) - p pᵀ."""
    return _hessian_sqrt(torch.softmax(logits, dim=-1))


def _hessian_sqrt(p: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return p.sqrt().unsqueeze(-1) * (eye - p.unsqueeze(-2))


def softmax_log_jacobian(logits: torch.Tensor) -> torch.Tensor:
    """(n, r, r): entry [i, v] is e_v - p, so row v of an embedding is ∇_θ log p_v(x) itself (no √p_v weight)."""
    p = torch.softmax(logits, dim=-1)
    eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
    return (eye - p.unsqueeze(-2)).expand(p.shape[0], -1, -1).contiguous()


# Rows of the masked gradient embeddings: "scaled" √p_y ∇ log p_y (the paper's text, so Σ_y rows' outer products
# is the Fisher), "unscaled" ∇ log p_y (the authors' code).
EMBEDDING_ROWS = {"scaled": softmax_hessian_sqrt, "unscaled": softmax_log_jacobian}


def check_embedding_rows(rows: str) -> None:
    if rows not in EMBEDDING_ROWS:
        raise FmaskError(f"unknown --embedding-rows {rows!r}; use one of: {', '.join(EMBEDDING_ROWS)}")


def softmax_hessian_factor(logits: torch.Tensor) -> torch.Tensor:
    """(n, r-1, r): rows t_j with Σ_j t_j t_jᵀ = diag(p) - p pᵀ, one fewer than softmax_hessian_sqrt.

    The Hessian has rank r-1 (its square root S maps √p to zero: Σ_v √p_v s_v = p - p = 0), so S Q has a zero
    column for an orthogonal Q whose last column is √p. Q is a per-sample Householder reflection; the Fisher
    diagonal, a sum of squares over the columns, then needs r-1 backward passes instead of r.
    """
    p = torch.softmax(logits, dim=-1)
    s, u = _hessian_sqrt(p), p.sqrt()
    # The reflection taking the unit vector u = √p to -e_r: w = u + e_r, and wᵀw = 2(1 + u_r) ≥ 2 as u_r ≥ 0.
    w = u.clone()
    w[:, -1] += 1
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    q = eye - 2 * w.unsqueeze(-1) * w.unsqueeze(-2) / (w * w).sum(-1)[:, None, None]  # (n, r, r), symmetric
    # Row j of the result is Σ_v q[v, j] s_v; the last (j = r-1) would be the zero one.
    return torch.einsum("nvj,nvc->njc", q[:, :, :-1], s)


def _sample_chunks(n: int, per_sample: int, max_elements: int) -> Iterator[tuple[int, int]]:
    """Split n samples so that (chunk length × per_sample) stays within max_elements."""
    step = max(1, max_elements // max(1, per_sample))
    for start in range(0, n, step):
        yield start, min(n, start + step)


class _Tap(ABC):
    """One supported layer: turns (layer input, output gradient) into per-sample parameter gradients."""

    def __init__(self, module: nn.Module, weight_name: Optional[str], bias_name: Optional[str]) -> None:
        self.module = module
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        self.calls = 0
        self.output_requires_grad = True
        self.output_version = 0
        self.modified_in_place = False
        self.cols: dict[str, tuple[torch.Tensor, int, int]] = {}
        self.cache: dict = {}  # per-batch values reused by the r backward passes; cleared with the input
        self.static: dict = {}  # per-mask index tensors (built once, reused by every batch of the same shapes)

    @property
    def names(self) -> list[str]:
        return [n for n in (self.weight_name, self.bias_name) if n is not None]

    def prepare(self, columns: Optional[MaskColumns], device: torch.device) -> None:
        """Keep the masked flat indices and column ranges of this layer's parameters."""
        self.cols = {}
        self.static.clear()
        if columns is None:
            return
        for name in self.names:
            idx, start, end = columns.of(name)
            self.cols[name] = (idx.to(device), start, end)

    def release(self) -> None:
        self.input = None
        self.output = None
        self.cache.clear()

    @abstractmethod
    def fisher(self, g: torch.Tensor, acc: dict[str, torch.Tensor], max_elements: int) -> None:
        """Add Σ over the batch of squared per-sample gradients (current class) into acc."""

    @abstractmethod
    def embed(self, g: torch.Tensor, out: torch.Tensor, max_elements: int) -> None:
        """Write this layer's masked per-sample gradient entries into out (n, k) for the current class."""


def _accumulate(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    acc[name] += value.reshape(acc[name].shape).to(acc[name].dtype)


class _BatchNormTap(_Tap):
    def _xhat(self, n: int, c: int) -> torch.Tensor:
        """The normalized input (n, C, positions), from the running statistics; once per batch."""
        if "xhat" not in self.cache:
            m = self.module
            shape = (1, -1) + (1,) * (self.input.dim() - 2)
            xhat = (self.input - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
            self.cache["xhat"] = xhat.reshape(n, c, -1)
        return self.cache["xhat"]

    def fisher(self, g, acc, max_elements):
        n, c = g.shape[0], g.shape[1]
        g3 = g.reshape(n, c, -1)
        if self.weight_name is not None:
            _accumulate(acc, self.weight_name, torch.linalg.vecdot(g3, self._xhat(n, c)).square().sum(0))
        if self.bias_name is not None:
            _accumulate(acc, self.bias_name, g3.sum(-1).square().sum(0))

    def embed(self, g, out, max_elements):
        n, c = g.shape[0], g.shape[1]
        g3 = g.reshape(n, c, -1)
        # Only the masked channels are formed: grad γ_c = Σ g_c·x̂_c, grad β_c = Σ g_c per sample.
        if self.weight_name is not None and self.cols[self.weight_name][0].numel():
            idx, start, end = self.cols[self.weight_name]
            if "xhat_masked" not in self.cache:
                self.cache["xhat_masked"] = self._xhat(n, c).index_select(1, idx)
            out[:, start:end] = torch.linalg.vecdot(g3.index_select(1, idx), self.cache["xhat_masked"])
        if self.bias_name is not None and self.cols[self.bias_name][0].numel():
            idx, start, end = self.cols[self.bias_name]
            out[:, start:end] = g3.index_select(1, idx).sum(-1)


# How many matmul flops one gathered element pair costs as much as (measured on CPU: ~2.5 ns per pair,
# ~0.01 ns per flop): gathers are memory bound, so a whole submatrix by matmul often beats gathering pairs.
_MATMUL_PER_GATHER = 200
_GATHER_BLOCK = 1 << 20  # elements per gathered block in the pairwise path


class _PairDots:
    """out[n, i] = Σ_l left[n, rows[i], l] · right[n, cols[i], l] for the masked (row, col) pairs of a
    per-sample gradient left·rightᵀ, without forming the rest of it when that is cheaper.

    ``right`` is passed already restricted to the distinct columns ``ucols`` (so a layer can build and
    cache just those rows of its unfolded input once per batch).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, left_rows: int, length: int) -> None:
        self.rows = rows
        self.urows, rows_inv = torch.unique(rows, return_inverse=True)
        self.ucols, self.cols_inv = torch.unique(cols, return_inverse=True)
        self.all_rows = self.urows.numel() == left_rows
        self.pair = rows_inv * self.ucols.numel() + self.cols_inv
        m, nr, nc = rows.numel(), self.urows.numel(), self.ucols.numel()
        submatrix_cost = (0 if self.all_rows else nr * length) + 2 * nr * nc * length / _MATMUL_PER_GATHER
        self.submatrix = submatrix_cost <= 2 * m * length

    def __call__(self, left: torch.Tensor, right_u: torch.Tensor, out: torch.Tensor, max_elements: int) -> None:
        n, length = left.shape[0], left.shape[2]
        m = self.rows.numel()
        if self.submatrix:
            lsub = left if self.all_rows else left.index_select(1, self.urows)
            per_sample = self.urows.numel() * self.ucols.numel()
            for s, e in _sample_chunks(n, per_sample, max_elements):
                prod = torch.bmm(lsub[s:e], right_u[s:e].transpose(1, 2))
                out[s:e] = prod.reshape(e - s, -1).index_select(1, self.pair)
            return
        # Small gathered blocks: they stay in cache and the allocator reuses them.
        step = max(1, min(max_elements, _GATHER_BLOCK) // max(1, n * length))
        for c0 in range(0, m, step):
            c1 = min(m, c0 + step)
            lg = left.index_select(1, self.rows[c0:c1])
            rg = right_u.index_select(1, self.cols_inv[c0:c1])
            out[:, c0:c1] = torch.linalg.vecdot(lg, rg)


class _LinearTap(_Tap):
    def _flat(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input (n, T, I) and output gradient (n, T, O); T = 1 for plain (n, I) inputs."""
        n = g.shape[0]
        a = self.input
        return a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])

    def fisher(self, g, acc, max_elements):
        a, g = self._flat(g)
        if self.bias_name is not None:
            _accumulate(acc, self.bias_name, g.sum(1).square().sum(0))
        if self.weight_name is None:
            return
        if a.shape[1] == 1:
            # Per-sample grad is an outer product, so its square is (g²)(a²)ᵀ: one matmul for the batch.
            if "a2" not in self.cache:
                self.cache["a2"] = a[:, 0].square()
            acc[self.weight_name].addmm_(g[:, 0].square().T, self.cache["a2"])
            return
        total = None
        for s, e in _sample_chunks(a.shape[0], g.shape[2] * a.shape[2], max_elements):
            part = torch.bmm(g[s:e].transpose(1, 2), a[s:e]).square_().sum(0)
            total = part if total is None else total.add_(part)
        _accumulate(acc, self.weight_name, total)

    def embed(self, g, out, max_elements):
        a, g = self._flat(g)
        if self.bias_name is not None:
            idx, start, end = self.cols[self.bias_name]
            out[:, start:end] = g.sum(1).index_select(1, idx)
        if self.weight_name is None:
            return
        idx, start, end = self.cols[self.weight_name]
        if idx.numel() == 0:
            return
        width = a.shape[2]
        key = ("linear", width, g.shape[2], a.shape[1])
        if key not in self.static:  # once per mask: the masked entries' rows and columns, the pair structure
            rows, cols = idx // width, idx % width
            dots = _PairDots(rows, cols, g.shape[2], a.shape[1]) if a.shape[1] > 1 else None
            self.static[key] = (rows, cols, dots)
        rows, cols, dots = self.static[key]
        if a.shape[1] == 1:
            # index_select, not advanced indexing (about 15x slower here); the input's columns serve all r classes.
            if "input_cols" not in self.cache:
                self.cache["input_cols"] = a[:, 0].index_select(1, cols)
            torch.mul(g[:, 0].index_select(1, rows), self.cache["input_cols"], out=out[:, start:end])
            return
        if "right" not in self.cache:
            self.cache["right"] = a.transpose(1, 2).index_select(1, dots.ucols)
        dots(g.transpose(1, 2), self.cache["right"], out[:, start:end], max_elements)


class _Conv2dTap(_Tap):
    # Feature maps with at least this many output positions use the grouped weight-gradient kernel
    # for per-sample gradients; smaller ones an unfold and per-sample matmuls (faster there).
    GROUPED_MIN_POSITIONS = 256
    FEW_INPUTS = 32  # C/G·kh·kw up to this: large feature maps use a cached unfold and batched matmuls
    KEEP_UNFOLDED = 1 << 24  # elements: a batch's unfolded input up to this size is kept for the r passes
    CACHE_BLOCK = 1 << 19  # elements of one per-sample gradient block (fits a core's L2 cache)
    SMALL_MAPS_BATCHED: Optional[bool] = None  # None: batched on accelerators, per-sample blocks on CPU

    def _prepared_input(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """The input padded as the convolution sees it, and the symmetric zero padding left to apply."""
        m = self.module
        a = self.input
        if m.padding_mode != "zeros":
            return F.pad(a, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0, 0)
        if isinstance(m.padding, str):
            if m.padding == "valid":
                return a, (0, 0)
            pads = []  # 'same': the extra pixel of an odd total goes to the right/bottom, as PyTorch does
            for d, k in zip(reversed(m.dilation), reversed(m.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return F.pad(a, pads), (0, 0)
        return a, tuple(m.padding)

    def _unfold(self, a: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        m = self.module
        return F.unfold(a, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)

    def _unfolded_rows(self, a: torch.Tensor, padding: tuple[int, int], start: int, end: int,
                       positions: int, max_elements: int) -> torch.Tensor:
        """(end-start, G, L, C/G·kh·kw): the unfolded input of samples start..end, one row per output position
        (L = positions). When the whole batch's fits in KEEP_UNFOLDED elements (or 4 x max_elements, when larger:
        a GPU's plan) it is formed once and reused by all r passes."""
        m = self.module
        per_group_in = m.weight[0].numel()

        def rows_of(part: torch.Tensor) -> torch.Tensor:
            cols = self._unfold(part, padding)
            cols = cols.reshape(part.shape[0], m.groups, per_group_in, cols.shape[-1])
            return cols.transpose(2, 3).contiguous()

        if a.shape[0] * m.groups * per_group_in * positions > max(self.KEEP_UNFOLDED, 4 * max_elements):
            return rows_of(a[start:end])
        if "unfolded" not in self.cache:
            self.cache["unfolded"] = rows_of(a)
        return self.cache["unfolded"][start:end]

    def fisher(self, g, acc, max_elements):
        m = self.module
        n, out_ch = g.shape[0], g.shape[1]
        positions = g.shape[2] * g.shape[3]
        if self.bias_name is not None:
            _accumulate(acc, self.bias_name, g.sum((2, 3)).square().sum(0))
        if self.weight_name is None:
            return
        if "prepared" not in self.cache:
            self.cache["prepared"] = self._prepared_input()
        a, padding = self.cache["prepared"]
        groups = m.groups
        weight_shape = m.weight.shape  # (O, C/G, kh, kw)
        per_group_in = weight_shape[1] * weight_shape[2] * weight_shape[3]
        numel = m.weight.numel()
        if positions >= self.GROUPED_MIN_POSITIONS and groups == 1 and per_group_in <= self.FEW_INPUTS:
            # Few input channels (a stem): the unfolded input is small, so it is formed once per batch and each
            # class's per-sample gradients are one batched matmul (faster than the grouped kernel there).
            total = None
            for s, e in _sample_chunks(n, max(numel, per_group_in * positions), max_elements):
                cols = self._unfolded_rows(a, padding, s, e, positions, max_elements)[:, 0]
                part = torch.bmm(g[s:e].reshape(e - s, out_ch, positions), cols).square_().sum(0)
                total = part if total is None else total.add_(part)
            _accumulate(acc, self.weight_name, total)
            return
        if positions >= self.GROUPED_MIN_POSITIONS:
            # A convolution's weight gradient with the batch folded into groups gives one gradient per sample.
            total = None
            in_ch, h, w = a.shape[1:]
            for s, e in _sample_chunks(n, numel + a[0].numel(), max_elements):
                k = e - s
                per_sample = torch.nn.grad.conv2d_weight(
                    a[s:e].reshape(1, k * in_ch, h, w),
                    (k * out_ch,) + tuple(weight_shape[1:]),
                    g[s:e].reshape(1, k * out_ch, g.shape[2], g.shape[3]),
                    stride=m.stride, padding=padding, dilation=m.dilation, groups=k * groups,
                )
                part = per_sample.reshape(k, numel).square_().sum(0)
                total = part if total is None else total.add_(part)
            _accumulate(acc, self.weight_name, total)
            return
        # Small feature maps: per-sample gradients are large next to the matmuls forming them. On a CPU each
        # sample's gradient is formed in cache-sized row blocks and squared into the sum right away; on an
        # accelerator (bandwidth to spare, launches costly) a chunk of samples goes through one batched matmul.
        batched = self.SMALL_MAPS_BATCHED if self.SMALL_MAPS_BATCHED is not None else g.device.type != "cpu"
        total = torch.zeros(groups, out_ch // groups, per_group_in, dtype=g.dtype, device=g.device)
        rows = out_ch if groups > 1 else max(1, min(out_ch, self.CACHE_BLOCK // per_group_in))
        per_sample = per_group_in * groups * positions + (numel if batched else 0)
        for s, e in _sample_chunks(n, per_sample, max_elements):
            k = e - s
            cols = self._unfolded_rows(a, padding, s, e, positions, max_elements)
            grads = g[s:e].reshape(k, groups, out_ch // groups, positions)
            if batched:
                total += torch.matmul(grads, cols).square_().sum(0)
                continue
            for i in range(k):
                for r0 in range(0, out_ch // groups, rows):
                    block = torch.matmul(grads[i, :, r0 : r0 + rows], cols[i])
                    total[:, r0 : r0 + rows].addcmul_(block, block)
        _accumulate(acc, self.weight_name, total)

    def _patch_index(self, dots: _PairDots, padded_shape: torch.Size, out_hw: tuple[int, int]) -> torch.Tensor:
        """Flat positions in one padded input sample of the unfolded rows ``dots.ucols``: (|ucols|·L,)."""
        m = self.module
        _, hp, wp = padded_shape
        kh, kw = m.kernel_size
        u = dots.ucols
        channel, i, j = u // (kh * kw), (u // kw) % kh, u % kw
        oh = torch.arange(out_hw[0], device=u.device) * m.stride[0]
        ow = torch.arange(out_hw[1], device=u.device) * m.stride[1]
        rows = (i * m.dilation[0]).unsqueeze(1) + oh  # (U, Ho)
        cols = (j * m.dilation[1]).unsqueeze(1) + ow  # (U, Wo)
        flat = channel[:, None, None] * (hp * wp) + rows[:, :, None] * wp + cols[:, None, :]
        return flat.reshape(-1)

    def embed(self, g, out, max_elements):
        m = self.module
        n, out_ch = g.shape[0], g.shape[1]
        g3 = g.reshape(n, out_ch, -1)
        if self.bias_name is not None:
            idx, start, end = self.cols[self.bias_name]
            out[:, start:end] = g3.index_select(1, idx).sum(2)
        if self.weight_name is None:
            return
        idx, start, end = self.cols[self.weight_name]
        if idx.numel() == 0:
            return
        positions = g3.shape[2]
        if "flat_input" not in self.cache:
            a, padding = self._prepared_input()
            a = F.pad(a, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else a
            key = ("conv", tuple(a.shape[1:]), tuple(g.shape[2:]))
            if key not in self.static:  # once per mask (and input size): pair structure and patch positions
                per_group_in = m.weight[0].numel()
                rows = idx // per_group_in
                # Unfolded rows run over (channel, kh, kw) of all input channels; group q's starts at q·per_group_in.
                cols = (rows // (out_ch // m.groups)) * per_group_in + idx % per_group_in
                dots = _PairDots(rows, cols, out_ch, positions)
                self.static[key] = (dots, self._patch_index(dots, a.shape[1:], tuple(g.shape[2:])))
            self.cache["dots"], self.cache["patch_index"] = self.static[key]
            self.cache["flat_input"] = a.reshape(n, -1)
            flat = self.cache["patch_index"]
            if n * flat.numel() <= max_elements:  # the masked patches of the whole batch, kept for all r classes
                self.cache["patches"] = self.cache["flat_input"].index_select(1, flat).reshape(n, -1, positions)
        dots = self.cache["dots"]
        if "patches" in self.cache:
            dots(g3, self.cache["patches"], out[:, start:end], max_elements)
            return
        flat = self.cache["patch_index"]
        for s, e in _sample_chunks(n, flat.numel(), max_elements):
            patches = self.cache["flat_input"][s:e].index_select(1, flat).reshape(e - s, -1, positions)
            dots(g3[s:e], patches, out[s:e, start:end], max_elements)


def _make_tap(module: nn.Module, names: dict[int, str]) -> Optional[_Tap]:
    weight = module._parameters.get("weight")
    bias = module._parameters.get("bias")
    weight_name = names.get(id(weight)) if weight is not None else None
    bias_name = names.get(id(bias)) if bias is not None else None
    if weight_name is None and bias_name is None:
        return None
    kind = type(module)
    if kind is nn.Linear:
        return _LinearTap(module, weight_name, bias_name)
    if kind is nn.Conv2d:
        return _Conv2dTap(module, weight_name, bias_name)
    if kind in _BATCHNORMS:
        if module.running_mean is None or module.running_var is None:
            return None  # normalizes with batch statistics even in eval mode: the fallback handles it
        return _BatchNormTap(module, weight_name, bias_name)
    return None


class PerSampleGradients:
    """Per-sample, per-class gradients of a classifier, reduced to a Fisher diagonal or masked embeddings.

    Use as a context manager: on entry the model is put in eval mode, its parameters are frozen so that
    autograd forms no weight gradient (the layer formulas do), and forward hooks are installed; all is
    restored on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        columns: Optional[MaskColumns] = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        self.model = model
        self.columns = columns
        self.max_elements = max_elements
        self.params = dict(model.named_parameters())
        names = {id(p): name for name, p in self.params.items()}
        owners = Counter(
            id(p) for module in model.modules() for p in module._parameters.values() if p is not None
        )
        self.taps: list[_Tap] = []
        for module in model.modules():
            if hasattr(module, "parametrizations"):
                continue  # weights computed from other tensors: the fallback sees the real dependence
            tap = _make_tap(module, names)
            if tap is not None and all(owners[id(self.params[n])] == 1 for n in tap.names):
                self.taps.append(tap)
        self._active = False
        self._probing = False
        self._probed = False
        self._handles: list = []
        self._fallback: list[str] = []
        self._fallback_cols: dict[str, tuple[torch.Tensor, int, int]] = {}
        self._batch_sums: dict[str, torch.Tensor] = {}

    @property
    def fallback_names(self) -> list[str]:
        """Parameters whose per-sample gradients come from the generic torch.func path."""
        covered = {name for tap in self.taps for name in tap.names}
        return [name for name in self.params if name not in covered]

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> "PerSampleGradients":
        self._was_training = self.model.training
        self._requires_grad = {name: p.requires_grad for name, p in self.params.items()}
        self.model.eval()
        for p in self.params.values():
            p.requires_grad_(False)
        for tap in self.taps:
            self._handles.append(tap.module.register_forward_hook(self._make_forward_hook(tap)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, p in self.params.items():
            p.requires_grad_(self._requires_grad[name])
        self.model.train(self._was_training)

    def _make_forward_hook(self, tap: _Tap):
        def hook(module, inputs, output):
            if not self._active:
                return None
            tap.calls += 1
            # (No copy of the input: autograd itself forbids modifying it in place, as these layers save it.)
            tap.input = inputs[0].detach()
            tap.output = output
            if self._probing:
                tap.output_requires_grad = isinstance(output, torch.Tensor) and output.requires_grad
                tap.output_version = output._version if isinstance(output, torch.Tensor) else 0
                return None
            # The model modifies this output in place later (e.g. ReLU(inplace=True)): hand it a copy so
            # the tensor kept here still is the layer's output when its gradient is asked for.
            return output.clone() if tap.modified_in_place else None

        return hook

    # -- planning -------------------------------------------------------------------------------
    def _probe(self, x: torch.Tensor) -> None:
        """Run one sample through the model to find taps the hook path cannot serve exactly."""
        self._probing = True
        self._active = True
        try:
            for tap in self.taps:
                tap.calls = 0
            with torch.enable_grad():
                self.model(x[:1].detach().requires_grad_(x.is_floating_point()))
            for tap in self.taps:
                tap.modified_in_place = tap.calls == 1 and tap.output._version != tap.output_version
        finally:
            self._active = False
            self._probing = False
            for tap in self.taps:
                tap.release()
        # Called twice (shared layer) or never (weights used functionally elsewhere), or cut off from
        # the input's autograd graph: those parameters go through the generic path instead.
        self.taps = [t for t in self.taps if t.calls == 1 and t.output_requires_grad]

    def _start(self, x: torch.Tensor) -> None:
        if self._probed:
            return
        self._probe(x)
        for tap in self.taps:
            tap.prepare(self.columns, x.device)
        self._fallback = self.fallback_names
        if self.columns is not None:
            for name in self._fallback:
                idx, start, end = self.columns.of(name)
                self._fallback_cols[name] = (idx.to(x.device), start, end)
        self._probed = True

    # -- passes ---------------------------------------------------------------------------------
    def _passes(self, x: torch.Tensor, taps: list[_Tap], on_grad: Callable[[_Tap, torch.Tensor, int], None],
                cotangents: Callable[[torch.Tensor], torch.Tensor] = softmax_hessian_sqrt) -> None:
        """Forward once, then per row v of ``cotangents(logits)`` (n, rows, r) one backward pass that stops at
        the outputs of ``taps``, calling ``on_grad(tap, output gradient, v)`` as each gradient is formed (while
        it is still in cache). Sets ``self.cot``. A layer whose output does not reach the logits gets no call:
        its gradients are zero."""
        self._active = True
        handles = []
        try:
            with torch.enable_grad():
                logits = self.model(x.detach().requires_grad_(x.is_floating_point()))
            self._active = False
            self.cot = cotangents(logits.detach())
            current = [0]
            for tap in taps:
                handles.append(tap.output.register_hook(
                    lambda grad, tap=tap: on_grad(tap, grad, current[0])))  # returns None: the gradient flows on
            outputs = [tap.output for tap in taps]
            r = self.cot.shape[1]
            for v in range(r if taps else 0):
                current[0] = v
                torch.autograd.grad(logits, outputs, grad_outputs=self.cot[:, v], retain_graph=v < r - 1,
                                    allow_unused=True)
        finally:
            self._active = False
            for handle in handles:
                handle.remove()
            for tap in self.taps:
                tap.release()

    def _fallback_grads(self, x: torch.Tensor, cot: torch.Tensor) -> Iterator[tuple[int, int, dict]]:
        """Exact per-sample, per-class gradients (k, r, *shape) of the fallback parameters, in sample chunks."""
        if not self._fallback:
            return
        params = {name: self.params[name].detach() for name in self._fallback}
        model = self.model

        def one_sample(x1: torch.Tensor, cot1: torch.Tensor) -> dict:
            def logits_of(p: dict) -> torch.Tensor:
                return torch.func.functional_call(model, p, (x1.unsqueeze(0),)).squeeze(0)

            _, pull = torch.func.vjp(logits_of, params)
            return torch.func.vmap(pull)(cot1)[0]

        r = cot.shape[-1]
        per_sample = r * sum(p.numel() for p in params.values())
        for s, e in _sample_chunks(x.shape[0], per_sample, self.max_elements):
            yield s, e, torch.func.vmap(one_sample)(x[s:e], cot[s:e])

    def accumulate_fisher(self, x: torch.Tensor, acc: dict[str, torch.Tensor]) -> None:
        """Add Σ over the batch and classes of squared per-sample gradients into acc[name]."""
        self._start(x)
        # Summed over the batch's r classes in the model's dtype first, so acc (float64) is converted into and
        # added to once per batch rather than once per class.
        if not self._batch_sums:
            self._batch_sums = {name: torch.zeros_like(p) for name, p in self.params.items()}
        sums = self._batch_sums
        for value in sums.values():
            value.zero_()
        self._passes(x, self.taps, lambda tap, g, v: tap.fisher(g, sums, self.max_elements),
                     cotangents=softmax_hessian_factor)
        for _, _, grads in self._fallback_grads(x, self.cot):
            for name, grad in grads.items():
                _accumulate(sums, name, grad.reshape(-1, *grad.shape[2:]).square().sum(0))
        for name, value in sums.items():
            _accumulate(acc, name, value)

    def embeddings(self, x: torch.Tensor, out: torch.Tensor, rows: str = "scaled") -> None:
        """Fill out (n, r, k), zero on entry, with the masked per-class gradient embeddings of the batch x
        (``rows``: see EMBEDDING_ROWS)."""
        if self.columns is None:
            raise ValueError("embeddings need the mask columns")
        self._start(x)
        # Only layers holding masked entries need gradients, so the backward passes stop at the deepest one.
        needed = [tap for tap in self.taps if any(tap.cols[name][0].numel() for name in tap.names)]
        self._passes(x, needed, lambda tap, g, v: tap.embed(g, out[:, v], self.max_elements),
                     cotangents=EMBEDDING_ROWS[rows])
        for s, e, grads in self._fallback_grads(x, self.cot):
            for name, grad in grads.items():
                idx, start, end = self._fallback_cols[name]
                out[s:e, :, start:end] = grad.reshape(e - s, grad.shape[1], -1).index_select(2, idx).to(out.dtype)


def fallback_parameters(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the parameters whose per-sample gradients take the generic torch.func path (see module doc),
    found by running ``example`` (a batch of at least one input) through the model."""
    engine = PerSampleGradients(model)
    with engine:
        device, dtype = _model_device_dtype(model, None)
        engine._start(_as_model_input(example, device, dtype))
    return engine.fallback_names


def _batches(inputs: InputSource, num_samples: Optional[int]) -> tuple[int, Callable[[int, int], torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0], lambda s, e: inputs[s:e]
    if num_samples is None:
        raise ValueError("num_samples is required when inputs is a loader")
    return num_samples, lambda s, e: inputs(list(range(s, e)))


def _model_device_dtype(model: nn.Module, device: Optional[torch.device]) -> tuple[torch.device, torch.dtype]:
    first = next(model.parameters(), None)
    if first is None:
        raise FmaskError("the model has no parameters, so it has no Fisher information; check the checkpoint")
    device = torch.device(device) if device is not None else first.device
    if device.type == "cpu":
        tune_cpu_allocator()  # r backward passes per batch churn through multi-MiB buffers
    return device, first.dtype


class FisherPassPlan(NamedTuple):
    """How the Fisher and embedding passes batch their work on a device."""

    batch_size: int  # samples per forward pass and its r backward passes
    max_elements: int  # bound on the elements of any per-layer intermediate (chunks samples within a batch)


def _graph_elements_per_sample(model: nn.Module, sample_shape: Sequence[int]) -> int:
    """Elements the r backward passes keep per sample: every layer's output, its gradient and one saved tensor
    (input, x̂ or mask), and the unfolded inputs a convolution may cache; from a one-sample forward pass."""
    counts = [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and not (inputs and output is inputs[0]):  # Identity keeps no copy
            counts[0] += 3 * output[0].numel()
        if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
            counts[0] += module.weight[0].numel() * module.groups * output[0, 0].numel()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    first = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *sample_shape, device=first.device, dtype=first.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts[0]


def plan_fisher_pass(model: nn.Module, sample_shape: Optional[Sequence[int]] = None, *,
                     device: Optional[torch.device] = None, batch_size: Optional[int] = None,
                     max_elements: Optional[int] = None) -> FisherPassPlan:
    """Batch size and per-layer chunk bound of the Fisher and embedding passes (given values are kept).

    On a CPU: DEFAULT_BATCH_SIZE and DEFAULT_MAX_ELEMENTS, cache-sized work (results bit-identical to every
    earlier version). On an accelerator, from the memory fmask may use there (``usable_memory_bytes``: 80% of
    the free memory, or ``--memory-limit``): per-layer intermediates up to a sixteenth of it (at most
    MAX_DEVICE_ELEMENTS), and as many samples per batch as half of it holds of what the passes keep per sample
    (``sample_shape``, the input's (C, H, W), is needed for that), at most MAX_DEVICE_BATCH, in multiples of 64:
    a few large kernels instead of many small ones."""
    device, dtype = _model_device_dtype(model, device)
    if device.type == "cpu":
        return FisherPassPlan(batch_size or DEFAULT_BATCH_SIZE, max_elements or DEFAULT_MAX_ELEMENTS)
    usable = usable_memory_bytes(device)
    element = torch.empty(0, dtype=dtype).element_size()
    if max_elements is None:
        max_elements = int(min(MAX_DEVICE_ELEMENTS, max(DEFAULT_MAX_ELEMENTS, usable // (16 * element))))
    if batch_size is None:
        if sample_shape is None:
            raise ValueError("plan_fisher_pass needs sample_shape to size batches on an accelerator")
        per_sample = element * _graph_elements_per_sample(model, sample_shape)
        batch_size = int(max(1, min(MAX_DEVICE_BATCH, (usable // 2) // max(per_sample, 1))))
        if batch_size > 64:
            batch_size -= batch_size % 64
    return FisherPassPlan(batch_size, max_elements)


def _plan_for(model: nn.Module, device: torch.device, load: Callable[[int, int], torch.Tensor], total: int,
              batch_size: Optional[int], max_elements: Optional[int]) -> FisherPassPlan:
    """plan_fisher_pass, reading the sample shape from the first sample only when it is needed."""
    needs_shape = device.type != "cpu" and batch_size is None and total > 0
    return plan_fisher_pass(model, tuple(load(0, 1).shape[1:]) if needs_shape else None, device=device,
                            batch_size=batch_size, max_elements=max_elements)


def _as_model_input(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if x.is_inference():
        x = x.clone()  # inference-mode tensors cannot enter autograd
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


def fisher_diagonal(
    model: nn.Module,
    inputs: InputSource,
    *,
    num_samples: Optional[int] = None,
    batch_size: Optional[int] = None,
    device: Optional[torch.device] = None,
    max_elements: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    sums: bool = False,
) -> dict[str, torch.Tensor]:
    """Exact diagonal Fisher F_i = mean_x Σ_y p_y(x) (∂ log p_y(x)/∂θ_i)², model in eval mode.

    Returns one float64 CPU tensor per parameter (its shape), in ``model.named_parameters()`` order.
    ``inputs`` is a tensor (N, ...) or a loader ``positions -> batch`` with ``num_samples``.
    The model must already be on ``device`` (default: where its parameters are). ``batch_size`` and
    ``max_elements`` default to :func:`plan_fisher_pass`'s for the device. ``sums``: the sums over the samples
    instead of their mean, left on the device, zeros without samples (a rank's shard, summed over the ranks next).
    """
    total, load = _batches(inputs, num_samples)
    if total < 1 and not sums:
        raise FmaskError("no samples to estimate the Fisher diagonal from; the unlabeled pool is empty")
    device, dtype = _model_device_dtype(model, device)
    acc = {name: torch.zeros(p.shape, dtype=torch.float64, device=device) for name, p in model.named_parameters()}
    if total == 0:
        return acc
    batch_size, max_elements = _plan_for(model, device, load, total, batch_size, max_elements)
    engine = PerSampleGradients(model, max_elements=max_elements)
    with engine:
        for start in range(0, total, batch_size):
            end = min(total, start + batch_size)
            engine.accumulate_fisher(_as_model_input(load(start, end), device, dtype), acc)
            if progress is not None:
                progress("Fisher diagonal", end, total)
    return acc if sums else {name: (value / total).cpu() for name, value in acc.items()}


def masked_embeddings(
    model: nn.Module,
    inputs: InputSource,
    columns: MaskColumns,
    *,
    num_samples: Optional[int] = None,
    batch_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    max_elements: Optional[int] = None,
    num_classes: Optional[int] = None,
    rows: str = "scaled",
    progress: Optional[ProgressFn] = None,
) -> torch.Tensor:
    """V (N, r, k): row y of sample x is sqrt(p_y(x)) ∇_θ log p_y(x) (``rows="scaled"``; ``"unscaled"``:
    ∇_θ log p_y(x)) restricted to the masked entries, columns in ``columns`` order (see fmask.fisher.mask).
    Returned on CPU in ``dtype`` (in pinned memory when computed on a GPU: each batch is copied there without
    waiting). ``num_classes`` only sets the shape of an empty result (no samples). ``batch_size`` and
    ``max_elements`` default to :func:`plan_fisher_pass`'s."""
    check_embedding_rows(rows)
    total, load = _batches(inputs, num_samples)
    device, model_dtype = _model_device_dtype(model, device)
    if list(columns.names) != [name for name, _ in model.named_parameters()]:
        raise FmaskError("the mask's parameter names do not match this model; rerun `fmask fisher` on its checkpoint")
    for (name, parameter), indices in zip(model.named_parameters(), columns.indices):  # ascending flat indices
        if indices.numel() and int(indices[-1]) >= parameter.numel():
            raise FmaskError(f"the mask's entries of {name} lie outside this model's parameter (another shape); "
                             "rerun `fmask fisher` on its checkpoint")
    batch_size, max_elements = _plan_for(model, device, load, total, batch_size, max_elements)
    engine = PerSampleGradients(model, columns=columns, max_elements=max_elements)
    direct = device.type == "cpu" and dtype == model_dtype  # batches filled in place in the result, no copy
    pinned = device.type == "cuda"  # copies into page-locked memory run asynchronously
    result: Optional[torch.Tensor] = None
    with engine:
        for start in range(0, total, batch_size):
            end = min(total, start + batch_size)
            x = _as_model_input(load(start, end), device, model_dtype)
            if result is None:
                with torch.no_grad():
                    classes = model(x[:1]).shape[-1]
                result, pinned = _host_result((total, classes, columns.k), dtype, zeros=direct, pinned=pinned)
            if direct:
                engine.embeddings(x, result[start:end], rows)
            else:
                chunk = torch.zeros(end - start, result.shape[1], columns.k, dtype=model_dtype, device=device)
                engine.embeddings(x, chunk, rows)
                # Stream-ordered: a later batch reusing chunk's memory runs after this copy has read it.
                result[start:end].copy_(chunk.to(dtype), non_blocking=pinned)
            if progress is not None:
                progress("gradient embeddings", end, total)
    if pinned and result is not None:
        torch.cuda.synchronize(device)  # every copy has landed before the caller reads the result
    if result is None:
        return torch.empty(0, num_classes or 0, columns.k, dtype=dtype)
    return result


def _host_result(shape: tuple[int, ...], dtype: torch.dtype, *, zeros: bool, pinned: bool) -> tuple[torch.Tensor, bool]:
    """The CPU tensor the embeddings are gathered into: page-locked when asked and possible; (tensor, pinned)."""
    make = torch.zeros if zeros else torch.empty
    if pinned:
        try:
            return make(shape, dtype=dtype, pin_memory=True), True
        except RuntimeError:  # page-locking refused (limits, no driver): ordinary memory and blocking copies
            pass
    return make(shape, dtype=dtype), False
