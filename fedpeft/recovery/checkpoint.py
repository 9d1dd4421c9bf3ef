"""Checkpoints after every round, written atomically, and what resuming needs.

The server writes ``RUN_DIR/checkpoint.bin`` after each round: the round number, the
global tensors, the whole strategy stack (Flower's strategy with its own state -- server
optimizer moments, momentum, FLoRA's merged global, a functional strategy's state -- and
every fedpeft wrapper: codec versions, privacy ledgers), the RNG states, and which
partition each node served.  The strategy is pickled, so any user strategy whose
attributes pickle is checkpointed without writing anything for it.

Clients keep their own persistent state (``Context.state``: error-feedback residuals,
the codec's copy of the global, privacy ledgers) in ``RUN_DIR/clients/<partition>/``,
one file per round they trained in (:class:`ClientStateStore`).  On resume the server
tells them the checkpoint's round and each restores its latest state from no later than
that round, so server and clients restart from one consistent cut.

Every file is written to a temporary name, flushed to disk and renamed over the old one
(an atomic replace on POSIX), and carries a SHA-256 of its body: a file cut short by a
crash is never loaded, the previous complete one stays in place.  Checkpoints are
pickles: load only your own results folders.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from fedpeft.files import atomic_file
from fedpeft.flower_compat import recorddict_from_bytes, recorddict_to_bytes
from fedpeft.recovery import CHECKPOINT_FILE
from fedpeft.recovery.crash import crash_point

CLIENT_STATE_DIR = "clients"
_MAGIC = b"FPCK1\n"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (the message says which file and why)."""


# ---------------------------------------------------------------------- atomic files
def write_atomic(path: Path, body: bytes, crash_name: str | None = None) -> None:
    """Write ``MAGIC + sha256(body) + body`` to ``path`` atomically (:func:`~fedpeft.files.atomic_file`).

    ``crash_name`` names the :func:`~fedpeft.recovery.crash.crash_point` passed when half the file
    is on disk (the crash test kills the run there).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _MAGIC + hashlib.sha256(body).digest() + body
    with atomic_file(path, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        if crash_name:
            fh.flush()
            crash_point(crash_name)
        fh.write(data[half:])


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes a crash cut short (never read, only clutter)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def read_verified(path: Path) -> bytes:
    """The body of a file :func:`write_atomic` wrote; a damaged file is an error, never data."""
    raw = path.read_bytes()
    head = len(_MAGIC) + 32
    if len(raw) < head or not raw.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not a fedpeft checkpoint file (or cut short)")
    digest, body = raw[len(_MAGIC) : head], raw[head:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (the file was cut short or changed)")
    return body


# ---------------------------------------------------------------------- server side
@dataclass
class Checkpoint:
    """Everything the server needs to continue after round ``round``."""

    round: int
    arrays: dict[str, np.ndarray]
    # The strategy stack and the objects it shares with the app (rejection log, privacy
    # plans, client ranks), pickled together so the shared references survive.
    state: dict[str, Any]
    partition_of: dict[int, int]  # node id -> partition, as in this run's engine
    rng: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        try:
            body = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise CheckpointError(
                f"cannot checkpoint the strategy state ({type(err).__name__}: {err}); every attribute "
                "of a strategy must pickle (no lambdas, open files or locks)"
            ) from err
        write_atomic(run_dir / CHECKPOINT_FILE, body, crash_name="checkpoint-write")

    @staticmethod
    def load(run_dir: Path) -> Checkpoint:
        path = run_dir / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"{run_dir}: no {CHECKPOINT_FILE}; nothing to resume (no round completed)")
        try:
            ckpt = pickle.loads(read_verified(path))
        except (ModuleNotFoundError, AttributeError) as err:
            # The strategy stack is pickled by class path; a checkpoint written before a class
            # moved (e.g. the server wrappers into fedpeft.server) names one that is gone.
            raise CheckpointError(
                f"{path}: written by an older fedpeft whose classes moved or changed ({err}); it "
                "cannot be resumed by this version: start the run again (or resume it with the "
                "fedpeft version that wrote it)"
            ) from err
        if not isinstance(ckpt, Checkpoint):
            raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a Checkpoint")
        return ckpt


def rng_state() -> dict[str, Any]:
    """The server process's global RNG states (Flower's DP noise draws from NumPy's)."""
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------- client side
class ClientStateStore:
    """One client's ``Context.state`` per round it trained in, under ``RUN_DIR/clients/<pid>/``."""

    def __init__(self, run_dir: Path, partition_id: int) -> None:
        self.folder = run_dir / CLIENT_STATE_DIR / str(partition_id)

    @classmethod
    def for_client(cls, results_dir: str, run_name: str, partition_id: int) -> ClientStateStore | None:
        """The store of a run with a pinned name (``fedpeft run`` always pins one); else None."""
        if not run_name:
            return None  # a timestamped name the client cannot know: no resume for this run
        return cls(Path(results_dir).expanduser().resolve() / run_name, partition_id)

    def _path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:06d}.state"

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("round-*.state"))

    def save(self, server_round: int, state: RecordDict) -> None:
        """Keep ``state`` as of the end of ``server_round``; older files but the last go."""
        write_atomic(
            self._path(server_round),
            recorddict_to_bytes(state),
            crash_name="client-state-write",
        )
        for old in self.rounds()[:-2]:  # at most one round can be ahead of the server's checkpoint
            self._path(old).unlink(missing_ok=True)

    def load(self, up_to_round: int) -> RecordDict | None:
        """The latest state saved no later than ``up_to_round`` (None: start empty)."""
        usable = [r for r in self.rounds() if r <= up_to_round]
        if not usable:
            return None
        return recorddict_from_bytes(read_verified(self._path(usable[-1])))


def prepare_resume(run_dir: Path, up_to_round: int) -> None:
    """Before resuming after ``up_to_round``: clear half-written files, check the client states.

    A crash can leave temporaries of writes it cut short (never read); a state saved for a
    round after the checkpoint belongs to a round that is redone, and is ignored by
    :meth:`ClientStateStore.load`.  Every state the resumed clients will load must be
    whole: a damaged one is an error that names the file, never a silent fresh start.
    """
    remove_stale_temporaries(run_dir)
    clients = run_dir / CLIENT_STATE_DIR
    if not clients.is_dir():
        return
    for folder in sorted(p for p in clients.iterdir() if p.is_dir() and p.name.isdigit()):
        remove_stale_temporaries(folder)
        ClientStateStore(run_dir, int(folder.name)).load(up_to_round)  # raises if damaged
