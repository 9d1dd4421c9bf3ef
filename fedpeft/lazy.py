"""Package namespaces that load their modules on first use (PEP 562).

A feature package declares its settings in a light ``settings`` module that the run
config imports (so every section is known before anything trains).  Importing that module
runs the package's ``__init__`` first; if the ``__init__`` imported the feature's code
(PyTorch, Opacus, Flower, datasets) the config would load all of it, and the feature's
code, which reads the config, would import it back half-built.  So such a package's
``__init__`` only names what it offers, and each name loads its module when first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: name -> the submodule that defines it.

    ``where`` maps each exported name to a module relative to ``package`` (``".partition"``).
    """

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__
