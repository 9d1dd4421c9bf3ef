"""Atomic file writes: a temporary name, flushed and fsync'd, then renamed over the target.

A reader sees the old file or the new one, never half of either (``os.replace`` is atomic
on POSIX), and the new content is on disk before the rename.  The temporary is
``.<name>.<pid>.tmp`` next to the target, so a crash leaves only such dot-files behind
(:func:`fedpeft.recovery.checkpoint.remove_stale_temporaries` clears them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """Where :func:`atomic_file` writes ``path``'s new content first."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO[Any]]:
    """A file opened on a temporary name that replaces ``path`` once written and fsync'd."""
    tmp = temporary_name(path)
    with tmp.open(mode, **open_kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8, newlines as given) atomically."""
    with atomic_file(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
