"""BatchBALD (Kirsch, van Amersfoort & Gal 2019): a batch whose labels are jointly most informative about the weights.

The batch {x_1..x_n} is scored by the mutual information between its labels and the weights,
a = H[y_1, .., y_n] − Σ_i E_w H[y_i | w], and built greedily: each step adds the candidate that maximises a for the
batch so far plus itself. With S Monte Carlo dropout passes w_s (fmask.query.mc_dropout), the joint entropy of the
picked labels with a candidate's label splits by the chain rule:

    H[y_1..y_n, y_x] = H[y_1..y_n] + Σ_ŷ P(ŷ) H[y_x | ŷ],    p(y_x = c | ŷ) = Σ_s P(w_s | ŷ) p_s(c | x),

over the configurations ŷ of the picked labels, with P(ŷ | w_s) = Π_i p_s(ŷ_i | x_i), P(ŷ) = mean_s P(ŷ | w_s)
and P(w_s | ŷ) = P(ŷ | w_s) / (S · P(ŷ)). While the C^n configurations number at most ``num_samples`` they are
all enumerated (exact). Beyond that, as in the BatchBALD paper, M = S·⌊num_samples / S⌋ configurations are drawn
from the joint (⌊num_samples / S⌋ from each pass, one label per picked point) and the sums over ŷ become
importance-weighted means over the draws: H[y_1..y_n] ≈ mean_m −log P(ŷ_m) and Σ_ŷ P(ŷ) H[y_x | ŷ] ≈
mean_m H[y_x | ŷ_m]; each new pick extends every drawn configuration by one label from its own pass. The posterior
form keeps every quantity a probability of order one, so nothing underflows however long the batch.

Candidates are rescored lazily: a candidate's gain can only shrink as the batch grows (conditioning on more labels
lowers H[y_x | ŷ]; BatchBALD's objective is submodular), so each step rescores candidates in the order of their
last gains, a block at a time, and stops once the best fresh gain beats every stale one. The picks are the full
greedy's (up to rounding in near-ties; with drawn configurations, up to their sampling noise) at a fraction of
the work: the first step scores all N candidates, later steps usually a few blocks.

Memory: S × num_samples for the configurations, candidates are scored in blocks of at most 2^22 (candidate,
configuration, class) entries; never C^batch. Work per scored candidate: S · K · C multiply-adds and K · C
logarithms with K ≤ num_samples.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fmask.core.errors import FmaskError
from fmask.query.base import QueryContext, Selection, read_option
from fmask.core.progress import ProgressFn
from fmask.query.mc_dropout import McDropoutStrategy
from fmask.query.registry import register_strategy
from fmask.query.strategies.bald import expected_entropies

DEFAULT_NUM_SAMPLES = 1000
BLOCK_ELEMENTS = 1 << 22  # candidates × configurations × classes scored at once


class JointLabels:
    """The labels of the points picked so far, as configurations ŷ with log P(ŷ | w_s) under each of the S passes.

    ``generator`` (CPU) draws the configurations once their exact number would exceed ``num_samples``.
    """

    def __init__(self, passes: int, classes: int, *, num_samples: int, generator: torch.Generator,
                 device: torch.device) -> None:
        self.passes, self.classes, self.num_samples = passes, classes, num_samples
        self.generator, self.device = generator, device
        self.log_joint = torch.zeros(passes, 1, dtype=torch.float64, device=device)  # (S, K): no label yet
        self.picked: list[torch.Tensor] = []  # log p_s(· | x_i) (S, C) of every picked point
        self.drawn: Optional[torch.Tensor] = None  # (M, n) drawn configurations; None while exact

    @property
    def exact(self) -> bool:
        return self.drawn is None

    @property
    def draws_per_pass(self) -> int:
        return max(1, self.num_samples // self.passes)

    def add(self, log_probs: torch.Tensor) -> None:
        """Add the label of a picked point, given its log p_s(· | x) (S, C)."""
        log_probs = log_probs.to(self.device, torch.float64)
        self.picked.append(log_probs)
        if self.exact and self.log_joint.shape[1] * self.classes <= self.num_samples:
            self.log_joint = (self.log_joint[:, :, None] + log_probs[:, None, :]).reshape(self.passes, -1)
            return
        if self.exact:  # too many configurations: draw them, every picked label so far
            self.drawn = torch.empty(self.passes * self.draws_per_pass, 0, dtype=torch.long)
            self.log_joint = torch.zeros(self.passes, self.drawn.shape[0], dtype=torch.float64, device=self.device)
            for earlier in self.picked:
                self._extend(earlier)
        else:
            self._extend(log_probs)

    def _extend(self, log_probs: torch.Tensor) -> None:
        """Draw one more label for every configuration, from the pass that drew it (pass-major order)."""
        probs = log_probs.exp().cpu()
        labels = torch.multinomial(probs, self.draws_per_pass, replacement=True, generator=self.generator).reshape(-1)
        self.drawn = torch.cat([self.drawn, labels[:, None]], dim=1)
        self.log_joint += log_probs[:, labels.to(self.device)]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(the weight of each configuration (K,), P(w_s | ŷ_k) (S, K), the entropy H[y_1..y_n] of the picks)."""
        log_marginal = torch.logsumexp(self.log_joint, dim=0) - math.log(self.passes)  # log P(ŷ_k)
        posterior = torch.softmax(self.log_joint, dim=0)
        # Configurations impossible under every pass (a probability of exactly 0) carry weight 0 below.
        posterior = torch.where(torch.isfinite(log_marginal)[None, :], posterior, 1.0 / self.passes)
        if self.exact:
            weight = log_marginal.exp()
            entropy = float(torch.special.entr(weight).sum())
        else:
            weight = torch.full_like(log_marginal, 1.0 / log_marginal.shape[0])
            entropy = float(-log_marginal.mean())
        return weight, posterior, entropy

    def block_rows(self) -> int:
        """Candidates per scoring block: about BLOCK_ELEMENTS (candidate, configuration, class) entries."""
        return max(1, BLOCK_ELEMENTS // (self.log_joint.shape[1] * self.classes))

    def joint_entropies(self, log_probs: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H[y_1..y_n, y_x] for every candidate x of ``log_probs`` (N, S, C): float64, (N,); blocks in ``dtype``."""
        weight, posterior, entropy = self.weights()
        weight, posterior = weight.to(dtype), posterior.to(dtype)
        n, rows = log_probs.shape[0], self.block_rows()
        out = torch.empty(n, dtype=torch.float64, device=self.device)
        for start in range(0, n, rows):
            probs = log_probs[start:start + rows].to(self.device, dtype).exp()  # (B, S, C)
            conditional = torch.matmul(probs.transpose(1, 2), posterior)  # (B, C, K): p(y_x = c | ŷ_k)
            out[start:start + rows] = entropy + (torch.special.entr(conditional).sum(dim=1) @ weight).double()
        return out


def batchbald_greedy(log_probs: torch.Tensor, batch: int, *, num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0,
                     progress: Optional[ProgressFn] = None) -> tuple[list[int], list[float]]:
    """Greedy BatchBALD over ``log_probs`` (N, S, C): (positions in pick order, the batch's estimated mutual
    information after each pick). Ties go to the lowest position; runs on the device of ``log_probs``, in float64
    when it is float64 and float32 otherwise (the joint's bookkeeping is float64 either way)."""
    n, passes, classes = log_probs.shape
    if batch < 0 or batch > n:
        raise ValueError(f"batch must be between 0 and the {n} candidates, got {batch}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    conditional = expected_entropies(log_probs)  # E_w H[y_x | w] per candidate
    joint = JointLabels(passes, classes, num_samples=num_samples, generator=torch.Generator().manual_seed(seed),
                        device=log_probs.device)
    # Upper bounds on every candidate's gain: its last computed gain (+inf before the first, -inf once picked).
    bounds = torch.full((n,), float("inf"), dtype=torch.float64, device=log_probs.device)
    picked_conditional = 0.0
    positions: list[int] = []
    scores: list[float] = []
    for step in range(batch):
        order = torch.sort(-bounds, stable=True).indices  # highest bound first, ties by position
        best, best_gain, scored, rows, left = -1, float("-inf"), 0, joint.block_rows(), n - step
        while scored < left and bounds[order[scored]].item() >= best_gain:
            index = order[scored:min(scored + rows, left)]  # the picked (bound -inf) sort last: never rescored
            gains = joint.joint_entropies(log_probs[index], dtype=dtype) - conditional[index] - picked_conditional
            bounds[index] = gains
            top = gains.max().item()
            first = int(index[gains == top].min().item())  # ties go to the lowest position
            if top > best_gain or (top == best_gain and first < best):
                best, best_gain = first, top
            scored += len(index)
        positions.append(best)
        scores.append(best_gain)
        bounds[best] = float("-inf")
        picked_conditional += float(conditional[best].item())
        if step + 1 < batch:
            joint.add(log_probs[best])
        if progress is not None:
            progress("BatchBALD", step + 1, batch)
    return positions, scores


def batchbald_select(log_probs: torch.Tensor, batch: int, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                     seed: int = 0) -> list[int]:
    """Positions of a greedy BatchBALD batch over ``log_probs`` (N, S, C) of S MC-dropout passes; ``num_samples``
    bounds the label configurations kept (exact below it, drawn with ``seed`` above)."""
    return batchbald_greedy(log_probs, batch, num_samples=num_samples, seed=seed)[0]


@register_strategy("batchbald")
class BatchBaldStrategy(McDropoutStrategy):
    """Greedy BatchBALD from MC dropout passes (``--mc-samples``, ``--joint-samples``)."""

    def settings(self, ctx: QueryContext) -> dict[str, int]:
        num_samples = read_option(ctx.options, "joint_samples", int, DEFAULT_NUM_SAMPLES)
        if isinstance(num_samples, bool) or num_samples < 1:
            raise FmaskError(f"--joint-samples {num_samples} must be positive; pass e.g. 1000")
        return {"num_samples": num_samples}

    def pick(self, ctx: QueryContext, log_probs: torch.Tensor, batch: int, *, num_samples: int) -> Selection:
        positions, scores = batchbald_greedy(log_probs, batch, num_samples=num_samples, seed=ctx.seed,
                                             progress=ctx.progress)
        return Selection(ids=[ctx.unlabeled_ids[p] for p in positions], scores=scores)
