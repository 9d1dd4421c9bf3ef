"""Helpers shared by the benchmark scripts: figures to a JSON file, a printed table."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_inprocess(
    overrides: dict[str, Any], results_dir: str, name: str
) -> tuple[Any, list[dict[str, Any]], float]:
    """One federation through the real apps over the in-process grid (``fedpeft.running.inprocess``:
    the same messages, byte meter and records as on Ray, without Ray's start-up per run).
    Returns (its RunConfig, its round records, wall seconds)."""
    from fedpeft.apps import client_app
    from fedpeft.apps.server_app import run_server
    from fedpeft.config import RunConfig
    from fedpeft.results.records import read_rounds
    from fedpeft.running.inprocess import DirectGrid

    cfg = RunConfig.from_run_config(overrides | {"results-dir": results_dir, "run-name": name})
    t0 = time.perf_counter()
    rounds = read_rounds(run_server(DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config()), cfg))
    return cfg, rounds, time.perf_counter() - t0


def write(name: str, figures: dict[str, Any]) -> Path:
    """Write ``figures`` (plus machine facts) to ``benchmarks/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **figures}, indent=2, default=str))
    print(f"figures written to {path}")
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also readable on a terminal)."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join([line, sep, *body])
