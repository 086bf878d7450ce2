"""fmask: pool-based batch active learning for image classifiers, built around FisherMask."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy exports keep `import fmask` (and the CLI's start-up) light.
    if name == "load_model":
        from fmask.train.checkpoint import load_model

        return load_model
    if name == "load_pool":
        from fmask.pool.pool import load_pool

        return load_pool
    if name == "fisher_greedy":
        from fmask.query.fisher_greedy import fisher_greedy

        return fisher_greedy
    if name in ("run_fisher", "load_mask", "fisher_diagonal", "masked_embeddings", "top_k_mask"):
        import fmask.fisher

        return getattr(fmask.fisher, name)
    if name in ("list_strategies", "register_strategy", "get_strategy"):
        from fmask.query import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'fmask' has no attribute {name!r}")


__all__ = ["__version__", "load_model", "load_pool", "fisher_greedy", "list_strategies", "register_strategy",
           "get_strategy", "run_fisher", "load_mask", "fisher_diagonal", "masked_embeddings", "top_k_mask"]
