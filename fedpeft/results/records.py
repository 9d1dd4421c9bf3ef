"""The per-run results folder: what a fedpeft run leaves behind.

One :class:`ResultsWriter` owns one run folder.  The server app hands it one
:class:`RoundRecord` per round (round 0 is the initial evaluation of the untrained
adapter) and the writer appends it to three files, flushing after every round so a
crash loses at most the round in progress:

``rounds.jsonl``
    One JSON object per round: the full record, per-client details included, plus the
    derived totals.  The lossless source for later reporting (:func:`read_rounds`).
``rounds.csv``
    One row per round, aggregates only, for a quick look in a spreadsheet or pandas.
``clients.csv``
    One row per (round, client): bytes on the wire, examples, local loss, failures.

Besides these, ``config.json`` (the resolved run config), ``versions.json`` (the
library versions that produced the numbers) and ``progress.png`` (accuracy and
cumulative communication against rounds).

Bytes are counted as Flower puts them on the wire: ``bytes_*`` is the protobuf-serialized
size of a whole message, ``payload_*`` only its array payloads, so the difference is
framing and config overhead.  Units are decimal (1 kB = 1000 B) throughout.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.files import atomic_file, atomic_write_text
from fedpeft.recovery.crash import crash_point

if TYPE_CHECKING:  # results never need a model loaded; only the adapter export takes one
    from fedpeft.config import RunConfig
    from fedpeft.models import FedModel

__all__ = [
    "CLIENTS_CSV_COLUMNS",
    "ROUNDS_CSV_COLUMNS",
    "VERSIONED_PACKAGES",
    "ClientRecord",
    "ResultsWriter",
    "RoundRecord",
    "collect_versions",
    "default_run_name",
    "format_round_line",
    "human_bytes",
    "mean_train_loss",
    "read_rounds",
]

CONFIG_FILE = "config.json"
VERSIONS_FILE = "versions.json"
ROUNDS_JSONL = "rounds.jsonl"
ROUNDS_CSV = "rounds.csv"
ADAPTER_DIR = "adapter"  # the final adapter; written last, so it marks a finished run
CLIENTS_CSV = "clients.csv"
PLOT_FILE = "progress.png"

#: Distributions whose versions go into ``versions.json`` (a missing one is ``null``).
VERSIONED_PACKAGES: tuple[str, ...] = (
    "flwr",
    "ray",
    "torch",
    "transformers",
    "peft",
    "opacus",
    "flwr-datasets",
    "datasets",
    "numpy",
    "fedpeft",
)

#: Columns of ``rounds.csv``, in order.
ROUNDS_CSV_COLUMNS: tuple[str, ...] = (
    "round",
    "accuracy",
    "loss",
    "train_loss",
    "bytes_up",
    "bytes_down",
    "bytes_up_per_client_mean",
    "bytes_down_per_client_mean",
    "cum_bytes_up",
    "cum_bytes_down",
    "num_replied",
    "num_failed",
    "wall_seconds",
    "max_epsilon",
    "central_epsilon",
    "step_scale",
    "time_split",  # seconds by part of the round: a JSON object
    "evaluated_on",
    "metrics",  # the task's metrics besides accuracy (perplexity, exact match, ...): a JSON object
    "strategy_metrics",  # a JSON object per row
)


@dataclass
class ClientRecord:
    """One client in one round: what was sent to it, what came back, and whether it failed."""

    node_id: int
    partition_id: int  # -1 if unknown
    bytes_down: int  # protobuf-serialized size of the message sent to it
    bytes_up: int  # protobuf-serialized size of its reply (0 if it failed)
    payload_down: int  # bytes of array payloads in the message sent (ArrayRecord.count_bytes)
    payload_up: int
    num_examples: int  # 0 if failed
    train_loss: float | None  # None if failed
    ok: bool
    error: str = ""  # reason if not ok
    # Any other scalar metrics the client reported (steps, model-loads, user metrics).
    metrics: dict[str, float] = field(default_factory=dict)


#: Columns of ``clients.csv``, in order: the round, then every :class:`ClientRecord` field.
CLIENTS_CSV_COLUMNS: tuple[str, ...] = (
    "round",
    *(f.name for f in dataclasses.fields(ClientRecord)),
)


@dataclass
class RoundRecord:
    """One round of a run: global evaluation, per-client traffic, and timing.

    Round 0 is the initial evaluation of the untrained model (no clients, no training).
    ``cum_bytes_up``/``cum_bytes_down`` are running totals over rounds; the
    :class:`ResultsWriter` fills them in, callers leave them at 0.
    """

    round: int  # 0 = initial evaluation (no training)
    accuracy: float
    loss: float
    train_loss: float | None  # example-weighted mean over clients that replied; None for round 0
    clients: list[ClientRecord]
    wall_seconds: float  # seconds this round took (training + aggregation + evaluation)
    cum_bytes_up: int = 0
    cum_bytes_down: int = 0
    # Differential privacy (None when off): the largest epsilon any client has spent so
    # far (local DP-SGD), every client's epsilon by partition, and the central mechanism's.
    max_epsilon: float | None = None
    epsilon_by_partition: dict[str, float] = field(default_factory=dict)
    central_epsilon: float | None = None
    # The step scale the server chose on its validation split (server.step-search), or None.
    step_scale: float | None = None
    # Where wall_seconds went (seconds): "clients-train" (waiting for the train replies:
    # the clients' training and their codec work, plus transport), "clients-evaluate",
    # "server-evaluate" (the global model on the test split), and "server" (the rest:
    # configuring, decoding, aggregating, the server step and any search, recording).
    time_split: dict[str, float] = field(default_factory=dict)
    # The task's other metrics on the server's test split (a causal LM's perplexity,
    # token accuracy and exact match; none for classification, whose figure is accuracy).
    metrics: dict[str, float] = field(default_factory=dict)
    # What the strategy stack returned from aggregation this round ("train.<key>" from
    # aggregate_train, "evaluate.<key>" from aggregate_evaluate), a user's strategy included.
    strategy_metrics: dict[str, Any] = field(default_factory=dict)
    # How many of the server's test examples the round's figures come from: the whole test
    # split, the evaluate-examples subsample, or 0 for a round not evaluated (evaluate-every:
    # accuracy and loss are then null).  None in folders written before it was recorded.
    evaluated_on: int | None = None

    @property
    def bytes_up(self) -> int:
        """Bytes received from clients this round (failed clients send nothing)."""
        return sum(c.bytes_up for c in self.clients)

    @property
    def bytes_down(self) -> int:
        """Bytes sent to clients this round, whether or not they replied."""
        return sum(c.bytes_down for c in self.clients)

    @property
    def num_replied(self) -> int:
        """Clients whose reply arrived and was usable."""
        return sum(1 for c in self.clients if c.ok)

    @property
    def num_failed(self) -> int:
        """Clients that were sent a message but did not reply usefully."""
        return sum(1 for c in self.clients if not c.ok)

    @property
    def bytes_up_per_client_mean(self) -> float:
        """Mean reply size over the clients that replied (0.0 if none did)."""
        n = self.num_replied
        return self.bytes_up / n if n else 0.0

    @property
    def bytes_down_per_client_mean(self) -> float:
        """Mean message size over all clients sent to (0.0 if none)."""
        n = len(self.clients)
        return self.bytes_down / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The full record as plain JSON-able data, derived totals included."""
        d = dataclasses.asdict(self)
        d["bytes_up"] = self.bytes_up
        d["bytes_down"] = self.bytes_down
        d["num_replied"] = self.num_replied
        d["num_failed"] = self.num_failed
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """Rebuild a record from :meth:`to_dict` output (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        client_names = {f.name for f in dataclasses.fields(ClientRecord)}
        kwargs["clients"] = [
            ClientRecord(**{k: v for k, v in c.items() if k in client_names}) for c in d.get("clients", [])
        ]
        for key in ("accuracy", "loss"):  # non-finite floats are stored as null
            if kwargs.get(key) is None:
                kwargs[key] = math.nan
        return cls(**kwargs)


#: How the parts of a round's time split (RoundRecord.time_split) add up to what a
#: report shows: training, the server's own work (with codec decoding), evaluation.
TIME_PARTS = {
    "clients-train": "train",
    "server": "server",
    "server-evaluate": "evaluate",
    "clients-evaluate": "evaluate",
}


def round_time_parts(time_split: Mapping[str, float]) -> dict[str, float]:
    """One round's seconds (its ``time_split``) as (train, server, evaluate); an unknown
    part counts as the server's."""
    parts = dict.fromkeys(("train", "server", "evaluate"), 0.0)
    for name, seconds in time_split.items():
        parts[TIME_PARTS.get(name, "server")] += float(seconds)
    return parts


def mean_train_loss(clients: Iterable[ClientRecord]) -> float | None:
    """Example-weighted mean local training loss over the clients that replied.

    Clients without a loss or with no examples are skipped; ``None`` if none remain.
    """
    total = 0.0
    weight = 0
    for c in clients:
        if c.ok and c.train_loss is not None and c.num_examples > 0:
            total += c.train_loss * c.num_examples
            weight += c.num_examples
    return total / weight if weight else None


def human_bytes(n: int) -> str:
    """A byte count in decimal units: ``812 B``, ``1.23 kB``, ``4.56 MB``, ``7.89 GB``."""
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    if n < 1000:
        return f"{sign}{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000.0
        # Move up a unit when rounding would print "1000.00 kB".
        if round(value, 2) < 1000.0 or unit == "TB":
            return f"{sign}{value:.2f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_round_line(rec: RoundRecord, num_rounds: int) -> str:
    """One terminal progress line for a finished round.

    Example: ``round  3/10 | acc 0.8123 | loss 0.5123 | up 1.23 MB | down 2.46 MB |
    10 ok 0 failed | 12.3 s`` (on one line).
    """
    width = max(2, len(str(num_rounds)))
    evaluated = f"{_headline(rec)} | loss {rec.loss:.4f}" if rec.evaluated_on != 0 else "not evaluated"
    return (
        f"round {rec.round:>{width}}/{num_rounds} | {evaluated} | up {human_bytes(rec.bytes_up)} | "
        f"down {human_bytes(rec.bytes_down)} | "
        f"{rec.num_replied} ok {rec.num_failed} failed | {rec.wall_seconds:.1f} s"
    )


# How the progress line names a task's metrics, in the order shown.
_SHOWN = {"perplexity": "ppl", "exact_match": "em"}


def _headline(rec: RoundRecord) -> str:
    """``acc 0.8123`` for classification; a causal LM's perplexity and exact match
    (``ppl 12.34 | em 0.5625``, its accuracy being that exact match)."""
    shown = [
        f"{short} {rec.metrics[name]:.4g}" if name == "perplexity" else f"{short} {rec.metrics[name]:.4f}"
        for name, short in _SHOWN.items()
        if name in rec.metrics
    ]
    return " | ".join(shown) if shown else f"acc {rec.accuracy:.4f}"


def read_rounds(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rounds of a run folder as written to ``rounds.jsonl`` (one dict per round).

    A truncated last line (a crash mid-write) is skipped rather than raising.
    """
    path = Path(run_dir) / ROUNDS_JSONL
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _config_hash(config_items: Mapping[str, Any]) -> str:
    blob = json.dumps(config_items, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:8]


def default_run_name(config_items: Mapping[str, Any], now: datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<hash>``: sortable by start time, and two runs started with
    the same config share the 8-hex-digit suffix (sha256 of the key-sorted JSON)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{_config_hash(config_items)}"


def run_dir_for(cfg: RunConfig) -> Path:
    """``results-dir/run-name`` (a timestamped name when none is configured)."""
    name = cfg.run_name or default_run_name(cfg.to_run_config())
    return Path(cfg.results_dir).expanduser().resolve() / name


def save_adapter(model: FedModel, run_dir: Path, labels: tuple[str, ...], cfg: RunConfig) -> Path:
    """Write ``run_dir/adapter`` whole or not at all (a crash mid-save leaves no adapter).

    Its presence marks a finished run; a resumed run whose checkpoint is the last round
    writes it again.
    """
    final, tmp = run_dir / ADAPTER_DIR, run_dir / f".{ADAPTER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, labels, cfg=cfg.for_server())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def collect_versions() -> dict[str, str | None]:
    """Python version, platform and the installed versions of :data:`VERSIONED_PACKAGES`."""
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "python_full": sys.version,
        "platform": platform.platform(),
    }
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _finite_or_none(x: Any) -> Any:
    """Replace NaN/inf with None so the JSON stays standard (``json`` would emit ``NaN``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    return x


def _csv_cell(x: Any) -> Any:
    if isinstance(x, dict):
        return json.dumps(x, sort_keys=True)
    return "" if x is None else x


class ResultsWriter:
    """Owns one run folder and appends to it round by round.

    The first :meth:`add_round` of a writer starts ``rounds.jsonl``, ``rounds.csv`` and
    ``clients.csv`` afresh (headers written once); later rounds append.  Every round is
    flushed and fsync'd before :meth:`add_round` returns.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._records: list[RoundRecord] = []
        self._cum_up = 0
        self._cum_down = 0

    @property
    def records(self) -> list[RoundRecord]:
        """The rounds added so far (a copy of the list; the records are shared)."""
        return list(self._records)

    def write_config(self, resolved: Mapping[str, Any]) -> Path:
        """Write the resolved run config to ``config.json`` (sorted keys, indent 2)."""
        path = self.run_dir / CONFIG_FILE
        text = json.dumps(_finite_or_none(dict(resolved)), sort_keys=True, indent=2, default=str)
        atomic_write_text(path, text + "\n")
        return path

    def record_length(self, num_rounds: int) -> bool:
        """A resumed run asked for more (or fewer) rounds: say so in ``config.json``.

        Its other settings are those the folder was started with (a resume continues a run,
        it does not change one), so only ``num-rounds`` is rewritten, and only when it
        differs; returns whether it did.  Reports and plots read the length from there.
        """
        path = self.run_dir / CONFIG_FILE
        saved = json.loads(path.read_text())
        if saved.get("num-rounds") == num_rounds:
            return False
        self.write_config(saved | {"num-rounds": num_rounds})
        return True

    def write_versions(self) -> Path:
        """Write ``versions.json``: what produced these numbers, for reproducibility."""
        path = self.run_dir / VERSIONS_FILE
        atomic_write_text(path, json.dumps(collect_versions(), indent=2) + "\n")
        return path

    def resume(self, up_to_round: int) -> list[RoundRecord]:
        """Continue a run folder: keep the rounds up to ``up_to_round``, drop any later ones.

        A crash can leave a round recorded whose checkpoint never completed; that round is
        run again, so its record goes.  The kept rounds are rewritten to all three files,
        each replaced atomically, so a crash during the rewrite loses nothing either.
        """
        kept = [RoundRecord.from_dict(d) for d in read_rounds(self.run_dir) if d["round"] <= up_to_round]
        if [r.round for r in kept] != list(range(up_to_round + 1)):
            raise ValueError(
                f"{self.run_dir}: rounds.jsonl does not hold rounds 0..{up_to_round} to resume from "
                f"(found {[r.round for r in kept]})"
            )
        self._records, self._cum_up, self._cum_down = [], 0, 0
        texts = {name: io.StringIO() for name in (ROUNDS_JSONL, ROUNDS_CSV, CLIENTS_CSV)}
        for rec in kept:
            self._append(rec, texts)
        for name, text in texts.items():
            atomic_write_text(self.run_dir / name, text.getvalue())
        return kept

    def add_round(self, rec: RoundRecord) -> RoundRecord:
        """Fill the running byte totals into ``rec``, append it to all files, return it."""
        texts = {name: io.StringIO() for name in (ROUNDS_JSONL, ROUNDS_CSV, CLIENTS_CSV)}
        first = not self._records
        self._append(rec, texts)
        for name, text in texts.items():
            if first:  # a new run (or a reused name): start every file afresh, atomically
                atomic_write_text(self.run_dir / name, text.getvalue())
            else:
                with (self.run_dir / name).open("a", encoding="utf-8", newline="") as f:
                    f.write(text.getvalue())
                    _sync(f)
            crash_point("record")
        return rec

    def _append(self, rec: RoundRecord, texts: Mapping[str, io.StringIO]) -> None:
        """Fill ``rec``'s running totals, add it to the records and its lines to ``texts``."""
        self._cum_up += rec.bytes_up
        self._cum_down += rec.bytes_down
        rec.cum_bytes_up = self._cum_up
        rec.cum_bytes_down = self._cum_down
        first = not self._records
        texts[ROUNDS_JSONL].write(json.dumps(_finite_or_none(rec.to_dict()), allow_nan=False) + "\n")
        rounds = csv.writer(texts[ROUNDS_CSV])
        if first:
            rounds.writerow(ROUNDS_CSV_COLUMNS)
        rounds.writerow([_csv_cell(getattr(rec, col)) for col in ROUNDS_CSV_COLUMNS])
        clients = csv.writer(texts[CLIENTS_CSV])
        if first:
            clients.writerow(CLIENTS_CSV_COLUMNS)
        for c in rec.clients:
            row = dataclasses.asdict(c)
            clients.writerow([rec.round, *(_csv_cell(row[k]) for k in CLIENTS_CSV_COLUMNS[1:])])
        self._records.append(rec)

    def plot(self, path: str | os.PathLike[str] = PLOT_FILE) -> Path:
        """Save a two-panel PNG: accuracy vs round, cumulative MB on the wire vs round.

        Uses a bare ``Figure`` with the Agg canvas rather than pyplot, so it neither
        needs a display nor changes the backend for anyone else in the process.  A
        relative ``path`` is taken inside the run folder.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        out = Path(path)
        if not out.is_absolute():
            out = self.run_dir / out
        recs = self._records
        rounds = [r.round for r in recs]
        acc = [r.accuracy for r in recs]
        up_mb = [r.cum_bytes_up / 1e6 for r in recs]
        down_mb = [r.cum_bytes_down / 1e6 for r in recs]
        total_mb = [u + d for u, d in zip(up_mb, down_mb, strict=True)]

        fig = Figure(figsize=(16, 4), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax_acc, ax_bytes, ax_time = fig.subplots(1, 3)

        # Rounds not evaluated (evaluate-every) are NaN: plotted through, as the points measured.
        evaluated = [(x, a) for x, a in zip(rounds, acc, strict=True) if math.isfinite(a)]
        ax_acc.plot([x for x, _ in evaluated], [a for _, a in evaluated], marker="o")
        ax_acc.set_title("Global accuracy")
        ax_acc.set_xlabel("round")
        ax_acc.set_ylabel("accuracy")
        ax_acc.grid(True, alpha=0.3)

        ax_bytes.plot(rounds, total_mb, marker="o", label="up + down")
        ax_bytes.plot(rounds, up_mb, linestyle="--", label="up")
        ax_bytes.plot(rounds, down_mb, linestyle=":", label="down")
        ax_bytes.set_title("Cumulative communication")
        ax_bytes.set_xlabel("round")
        ax_bytes.set_ylabel("cumulative bytes (MB)")
        ax_bytes.grid(True, alpha=0.3)
        if recs:
            ax_bytes.legend(loc="upper left")
        positive = [v for v in total_mb if v > 0]
        if positive and max(positive) / min(positive) > 100:
            ax_bytes.set_yscale("log")

        parts = [round_time_parts(r.time_split) for r in recs]
        bottom = [0.0] * len(recs)
        for part, colour in (("train", "tab:blue"), ("server", "tab:orange"), ("evaluate", "tab:green")):
            seconds = [p[part] for p in parts]
            ax_time.bar(rounds, seconds, bottom=bottom, label=part, color=colour)
            bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
        ax_time.set_title("Time per round")
        ax_time.set_xlabel("round")
        ax_time.set_ylabel("seconds")
        if recs:
            ax_time.legend(loc="upper left")

        with atomic_file(out, "wb") as fh:
            fig.savefig(fh, format="png")
        return out


def _sync(f: Any) -> None:
    f.flush()
    with contextlib.suppress(OSError):  # e.g. filesystems without fsync
        os.fsync(f.fileno())
