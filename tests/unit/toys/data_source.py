"""A data source: the docstrings of four standard-library modules, labelled by module.

Real text that every Python has, offline.  The registry line is
``SOURCES["toy-stdlib-docs"] = load``.
"""

from __future__ import annotations

import csv
import inspect
import json
import re
import string

from fedpeft.data.sources import TextDataset, make_text_dataset

MODULES = (csv, json, re, string)


def load() -> TextDataset:
    texts: list[str] = []
    labels: list[int] = []
    for label, module in enumerate(MODULES):
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and obj.__module__ == module.__name__ else None
            for paragraph in (doc or "").split("\n\n"):
                if len(paragraph.split()) >= 4:
                    texts.append(" ".join(paragraph.split()))
                    labels.append(label)
    return make_text_dataset(texts, labels, [m.__name__ for m in MODULES])
