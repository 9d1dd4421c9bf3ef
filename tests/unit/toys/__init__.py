"""Extensions written the way a user writes them: one module each, plus one registry line
that the test using it runs (tests/unit/test_toy_extensions.py)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

from fedpeft.settings import SECTIONS


@contextlib.contextmanager
def declared(module: str) -> Iterator[ModuleType]:
    """Import toy ``module`` (its sections declare themselves) for one test, then forget it,
    so that no other test sees its sections or keys."""
    before = dict(SECTIONS)
    sys.modules.pop(module, None)
    try:
        yield importlib.import_module(module)
    finally:
        sys.modules.pop(module, None)
        SECTIONS.clear()
        SECTIONS.update(before)
