"""fmask: pool-based batch active learning for image classifiers, built around FisherMask.

From Python: ``fmask.load_pool``, ``fmask.load_model``, ``fmask.select`` (a strategy's picks, in memory),
``fmask.list_strategies``; ``dir(fmask)`` lists the rest."""

__version__ = "0.1.0"

# Public name -> the module defining it. Loaded on first use, so `import fmask` (and the CLI's start-up) stays
# light: no torch until a name that needs it is asked for.
_EXPORTS = {
    "select": "fmask.query.in_memory",
    "Selection": "fmask.query.base",
    "Strategy": "fmask.query.base",
    "QueryContext": "fmask.query.base",
    "list_strategies": "fmask.query.registry",
    "get_strategy": "fmask.query.registry",
    "register_strategy": "fmask.query.registry",
    "load_pool": "fmask.pool.pool",
    "load_model": "fmask.train.checkpoint",
    "load_labeled": "fmask.core.labeled",
    "run_query": "fmask.query.step",
    "run_fisher": "fmask.fisher",
    "load_mask": "fmask.fisher",
    "fisher_diagonal": "fmask.fisher",
    "masked_embeddings": "fmask.fisher",
    "top_k_mask": "fmask.fisher",
    "fisher_greedy": "fmask.query.fisher_greedy",
    "FmaskError": "fmask.core.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fmask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
