"""The method registry: each method's strategy, registered by the module that defines it.

As HF PEFT's ``register_peft_method`` fills its mapping tables, a strategy class registers itself with
:func:`register_strategy`; the tuner looks strategies up here (:func:`strategy_for`) and imports no method.
So every import points from a method down to the base strategy and this table, and a new method is its own
module (imported by :mod:`tcurlora.tuners`) plus its row in :data:`tcurlora.protocol.METHOD_TRAITS`.
"""

from __future__ import annotations

from typing import Any, Dict, TypeVar

from ..protocol import METHOD_TRAITS
from .layers import AdapterError

#: Method name -> its strategy (a :class:`tcurlora.tuners.strategies.Strategy`; this table imports no method).
STRATEGIES: Dict[str, Any] = {}
StrategyClass = TypeVar("StrategyClass", bound=type)


def register_strategy(cls: StrategyClass) -> StrategyClass:
    """Class decorator: the strategy of method ``cls.method`` (one instance serves every adapter of it)."""
    if cls.method not in METHOD_TRAITS:
        raise ValueError(f"method {cls.method!r} has no row in tcurlora.protocol.METHOD_TRAITS")
    if cls.method in STRATEGIES:
        raise ValueError(f"method {cls.method!r} is registered twice")
    STRATEGIES[cls.method] = cls()
    return cls


def strategy_for(method: str) -> Any:
    try:
        return STRATEGIES[method]
    except KeyError:
        raise AdapterError(f"unknown method {method!r}; choose one of {', '.join(STRATEGIES)}") from None
