"""Query strategies. The pure selection functions (tensors in, sample positions out) are exported here, loaded
on first use so that importing a strategy module stays light.

Layout: ``base`` (the selection contract), ``registry``, ``step`` (``fmask query``), the shared machinery the
strategies build on (``fisher_greedy``: the Fisher-greedy engine of fishermask and bait; ``clustering``: distance,
k-means and k-means++ helpers; ``coverage``: the select of TypiClust and ProbCover; ``uncertainty``: scores from
predicted probabilities; ``mc_dropout``: the passes and select of BALD and BatchBALD), and ``strategies/``, one
module per strategy, each importing from those and never from another strategy.
"""

_EXPORTS = {
    "bald_scores": "fmask.query.strategies.bald",
    "batchbald_select": "fmask.query.strategies.batchbald",
    "typiclust_select": "fmask.query.strategies.typiclust",
    "probcover_select": "fmask.query.strategies.probcover",
    "cluster_margin_select": "fmask.query.strategies.cluster_margin",
    "kcenter_greedy": "fmask.query.strategies.kcenter",
    "badge_select": "fmask.query.strategies.badge",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fmask.query' has no attribute {name!r}")
