"""Package roots that re-export names from their submodules, importing each only on first use
(so ``from sdrt_cli.ensemble import load_ensemble`` does not load the training code beside it)."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``homes`` maps a name to its submodule
    (relative, e.g. ``"runtime"``) or to a full module path (``"sdrt_cli.prompting"``)."""

    def getattr_(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home if "." in home else f"{package}.{home}"), name)
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return getattr_, dir_
