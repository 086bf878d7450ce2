"""Uncertainty scores of candidates from their predicted probabilities (n, C), higher meaning more uncertain: the
entropy, least-confidence and margin strategies rank by them, Cluster-Margin picks within clusters by the margin."""

import torch


def entropy_scores(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row of ``probs`` (n, C); 0·log 0 counts as 0."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)


def least_confidence_scores(probs: torch.Tensor) -> torch.Tensor:
    """One minus the top probability: higher means less confident."""
    return 1.0 - probs.max(dim=1).values


def margin_scores(probs: torch.Tensor) -> torch.Tensor:
    """Negative gap between the top two probabilities: higher means more uncertain."""
    top2 = probs.topk(2, dim=1).values
    return -(top2[:, 0] - top2[:, 1])
