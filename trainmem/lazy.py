"""Package attributes that import their module on first use (PEP 562), so importing a package stays cheap."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: name -> ``package.<where[name]>``'s attribute, cached."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f".{where[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
