"""Public names of a package imported on first use (PEP 562), so that importing the package stays cheap."""
from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str], submodules=()):
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` is defined in the submodule
    ``exports[name]`` (relative, e.g. ``".metrics"``); each of ``submodules`` is imported as an attribute.

    Usage, in the package's ``__init__``: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``.
    """
    module = sys.modules[package]

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(module, name, value)  # later lookups do not come here
        return value

    def __dir__():
        return sorted(set(vars(module)) | set(getattr(module, "__all__", ())))

    return __getattr__, __dir__
