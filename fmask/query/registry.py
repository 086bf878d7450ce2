"""The strategy registry: ``@register_strategy("name")`` on a Strategy subclass makes it available to
``fmask query --strategy name`` without touching the CLI."""

from __future__ import annotations

from typing import Callable, TypeVar

from fmask.core.errors import FmaskError

_REGISTRY: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_strategy(name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin_strategies() -> None:
    # Importing the package registers every built-in strategy module.
    import fmask.query.strategies  # noqa: F401


def list_strategies() -> list[str]:
    _load_builtin_strategies()
    return sorted(_REGISTRY)


def get_strategy(name: str):
    """Instantiate the strategy registered as ``name``."""
    _load_builtin_strategies()
    if name not in _REGISTRY:
        raise FmaskError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()
