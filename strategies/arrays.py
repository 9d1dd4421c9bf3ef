"""``name -> np.ndarray`` dicts <-> Flower ``ArrayRecord``s: the one conversion both ways.

Tensors travel in canonical sorted-name order, so a reply's key set compares with the
global model's by equality and the same dict always gives the same bytes.
:mod:`fedpeft.wire` uses these too (``strategies`` never imports ``fedpeft``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

Tensors = dict[str, np.ndarray]


def dict_to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``tensors`` in sorted-name order, each made C-contiguous."""
    return ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(tensors[k]))) for k in sorted(tensors)})


def record_to_dict(record: ArrayRecord) -> Tensors:
    """The ``name -> np.ndarray`` mapping an ``ArrayRecord`` carries, sorted by name."""
    return {name: record[name].numpy() for name in sorted(record)}
