"""Name -> implementation registries (attention kinds, FFN kinds, task streams, strategies).

    ATTENTION = Registry("attention")
    @ATTENTION.register("dense")
    class DenseAttention(nn.Module): ...
    ATTENTION.get("dense")  # unknown names list the registered ones
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.what} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise KeyError(f"unknown {self.what} '{name}'; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


ATTENTION = Registry("attention kind")
FFN = Registry("ffn kind")
STREAMS = Registry("task stream")
STRATEGIES = Registry("strategy")
