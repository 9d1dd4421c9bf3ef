"""``fedpeft report``: one comparison table and two plots across results folders.

Runs are found below the given folders (anything holding a ``rounds.jsonl``: single runs,
sweep folders, folders of sweeps).  Runs whose configs differ only in ``seed`` form one
group; a group's row gives the mean and the spread (sample standard deviation, and
min-max bands in the plots) over its seeds.  A group is labelled by the config keys
whose values differ between groups, so the table says what was compared.

Per run: final and best global accuracy, rounds to reach ``target`` accuracy, total bytes
up and down (as metered on the wire), bytes up+down until the target was first reached,
the uplink compression ratio (dense float32 update / coded payload, from the codec's own
per-client figures; 1 when no codec ran), the largest epsilon spent (local DP-SGD, or the
central mechanism's), wall time, the final round's task metrics besides accuracy (a causal
LM's perplexity and exact match: ``task.<key>`` columns) and its scalar ``strategy_metrics``
(what the strategy returned from aggregation, a user's strategy included).  Writes ``report.md``, ``report.csv`` (one row per
group), ``runs.csv`` (one row per run), ``accuracy_vs_rounds.png`` and
``accuracy_vs_bytes.png`` (cumulative bytes up+down, log scale) and ``frontier.png``
(final accuracy against total bytes up+down per group: mean, and min-max over seeds).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import with_defaults
from fedpeft.results.records import ROUNDS_JSONL, human_bytes, read_rounds, round_time_parts

#: Config keys that never tell two runs apart (where they landed, whether resumed);
#: ``seed`` is what a group averages over.
IGNORED_KEYS = ("results-dir", "run-name", "resume")
SEED_KEY = "seed"
DEFAULT_TARGET = 0.8


@dataclass(frozen=True)
class RunSummary:
    """The figures of one run folder."""

    run_dir: Path
    config: dict[str, Any]
    rounds: list[dict[str, Any]]
    final_accuracy: float
    best_accuracy: float
    rounds_to_target: int | None  # first round whose global accuracy reached the target
    bytes_up: int
    bytes_down: int
    bytes_to_target: int | None  # cumulative bytes up + down at that round
    up_per_client_round: float  # mean uplink bytes of one client's reply in one trained round
    compression_ratio: float  # uplink: dense float32 update bytes / coded bytes
    max_epsilon: float | None
    wall_seconds: float
    # Mean seconds per trained round by part (RoundRecord.time_split): the clients'
    # training (with their codec work and transport), the server's own work (decoding,
    # aggregation, its step), and evaluation (the server's and the clients').
    train_seconds: float = math.nan
    server_seconds: float = math.nan
    evaluate_seconds: float = math.nan
    # The last trained round's scalar strategy metrics ("train.<key>", "evaluate.<key>").
    strategy_metrics: dict[str, float] = field(default_factory=dict)
    # The final round's task metrics besides accuracy (a causal LM's perplexity, exact match).
    task_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get(SEED_KEY)


#: The numeric columns of a summary, in table order: (field, header, formatter).
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("final_accuracy", "final acc", lambda x: f"{100 * x:.1f}%"),
    ("best_accuracy", "best acc", lambda x: f"{100 * x:.1f}%"),
    ("rounds_to_target", "rounds to target", lambda x: f"{x:.1f}"),
    ("bytes_up", "bytes up", lambda x: human_bytes(round(x))),
    ("bytes_down", "bytes down", lambda x: human_bytes(round(x))),
    ("bytes_to_target", "bytes to target", lambda x: human_bytes(round(x))),
    ("up_per_client_round", "up per client-round", lambda x: human_bytes(round(x))),
    ("compression_ratio", "compression", lambda x: f"{x:.1f}x"),
    ("max_epsilon", "max epsilon", lambda x: f"{x:.2f}"),
    ("wall_seconds", "wall", lambda x: f"{x:.0f} s"),
    ("train_seconds", "train s/round", lambda x: f"{x:.1f}"),
    ("server_seconds", "server s/round", lambda x: f"{x:.1f}"),
    ("evaluate_seconds", "eval s/round", lambda x: f"{x:.1f}"),
)


# ---------------------------------------------------------------------- finding and reading
def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every run folder at or below ``paths`` (sorted, each once)."""
    found: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"no such results folder: {path}")
        if (path / ROUNDS_JSONL).is_file():
            found.add(path)
        found |= {p.parent for p in path.rglob(ROUNDS_JSONL) if p.parent != path}
    return sorted(found)


def summarize(run_dir: Path, target: float = DEFAULT_TARGET) -> RunSummary:
    """The figures of one run; a run with no trained round yet reports its round 0."""
    rounds = read_rounds(run_dir)
    if not rounds:
        raise ValueError(f"{run_dir}: rounds.jsonl holds no rounds")
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    if config:  # keys added after the run was written ran at their defaults: group it so
        config = with_defaults(config)
    accs = [_num(r.get("accuracy")) for r in rounds]
    hit = next((r for r, a in zip(rounds, accs, strict=True) if r["round"] > 0 and a >= target), None)
    raw = encoded = 0.0
    for r in rounds:
        for c in r.get("clients", []):
            m = c.get("metrics", {})
            if c.get("ok") and "codec-raw-bytes" in m:
                raw += m["codec-raw-bytes"]
                encoded += m["codec-encoded-bytes"]
    replies = [c["bytes_up"] for r in rounds if r["round"] > 0 for c in r.get("clients", []) if c.get("ok")]
    eps = [e for r in rounds for e in (r.get("max_epsilon"), r.get("central_epsilon")) if e is not None]
    last = rounds[-1]
    finite = [a for a in accs if math.isfinite(a)]  # rounds not evaluated (evaluate-every) are null
    parts = time_parts(rounds)
    return RunSummary(
        run_dir=run_dir,
        config=config,
        rounds=rounds,
        final_accuracy=accs[-1],
        best_accuracy=max(finite, default=math.nan),
        rounds_to_target=hit["round"] if hit else None,
        bytes_up=int(last["cum_bytes_up"]),
        bytes_down=int(last["cum_bytes_down"]),
        bytes_to_target=int(hit["cum_bytes_up"] + hit["cum_bytes_down"]) if hit else None,
        up_per_client_round=statistics.fmean(replies) if replies else math.nan,
        compression_ratio=raw / encoded if encoded else 1.0,
        max_epsilon=max(eps) if eps else None,
        wall_seconds=float(sum(r.get("wall_seconds", 0.0) for r in rounds)),
        train_seconds=parts["train"],
        server_seconds=parts["server"],
        evaluate_seconds=parts["evaluate"],
        strategy_metrics=final_metrics(rounds, "strategy_metrics"),
        task_metrics=final_metrics(rounds, "metrics"),
    )


def time_parts(rounds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per trained round of each part (NaN where no round has a split)."""
    split = [round_time_parts(r["time_split"]) for r in rounds if r["round"] > 0 and r.get("time_split")]
    if not split:
        return dict.fromkeys(("train", "server", "evaluate"), math.nan)
    return {k: statistics.fmean(p[k] for p in split) for k in split[0]}


def final_metrics(rounds: Sequence[dict[str, Any]], key: str) -> dict[str, float]:
    """The scalar metrics under ``key`` (the strategy's, or with ``"metrics"`` the task's) of
    the last round that has any (older folders: none)."""
    for r in reversed(rounds):
        metrics = r.get(key) or {}
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if scalars:
            return scalars
    return {}


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan


# ---------------------------------------------------------------------- grouping
@dataclass(frozen=True)
class Group:
    """Runs that differ only in their seed."""

    label: str
    settings: dict[str, Any]  # the keys that tell this group from the others
    runs: list[RunSummary]

    def stat(self, name: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, how many runs have a value) of one summary field."""
        values = [float(v) for r in self.runs if (v := getattr(r, name)) is not None and math.isfinite(v)]
        if not values:
            return None, None, 0
        return _spread(values)

    def metric_stat(self, key: str, kind: str = "strategy") -> tuple[float | None, float | None, int]:
        """(mean, sample std, count) of one final strategy (or ``kind="task"``: task) metric
        over the runs that have it."""
        values = [v for r in self.runs if (v := _metrics(r, kind).get(key)) is not None and math.isfinite(v)]
        return _spread(values) if values else (None, None, 0)


#: The final-metric kinds of a run, in report order, and the title of each one's table.
METRIC_TITLES = {
    "task": "The task's other metrics in the final round:",
    "strategy": "What the strategies returned from aggregation in the final round:",
}


def _metrics(run: RunSummary, kind: str) -> dict[str, float]:
    return run.task_metrics if kind == "task" else run.strategy_metrics


def _spread(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def metric_keys(runs: Iterable[RunSummary], kind: str) -> list[str]:
    """Every final strategy (or ``kind="task"``: task) metric any run has, sorted."""
    return sorted({k for r in runs for k in _metrics(r, kind)})


def group_runs(runs: Sequence[RunSummary]) -> list[Group]:
    """Group by config minus seed; label by the keys that vary between groups."""

    def key_of(run: RunSummary) -> str:
        return json.dumps(
            {k: v for k, v in run.config.items() if k not in (*IGNORED_KEYS, SEED_KEY)}, sort_keys=True
        )

    by_key: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_key.setdefault(key_of(run), []).append(run)
    configs = [json.loads(k) for k in by_key]
    varying = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    groups = []
    for key, members in by_key.items():
        cfg = json.loads(key)
        settings = {k: cfg.get(k) for k in varying}
        label = ", ".join(f"{k}={_short(v)}" for k, v in settings.items()) or members[0].run_dir.name
        groups.append(Group(label, settings, sorted(members, key=lambda r: str(r.seed))))
    return sorted(groups, key=lambda g: g.label)


def _short(value: Any) -> str:
    if value == "":
        return '""'
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------- writing
@dataclass(frozen=True)
class Report:
    groups: list[Group]
    target: float
    files: dict[str, Path]
    markdown: str


def make_report(
    paths: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], target: float = DEFAULT_TARGET
) -> Report:
    """Summarize every run below ``paths`` into ``out`` (created); returns what was written."""
    # A run that stopped before its first record has nothing to report.
    runs = [summarize(p, target) for p in find_runs(paths) if read_rounds(p)]
    if not runs:
        raise FileNotFoundError("no run folders (with a rounds.jsonl) below the given paths")
    groups = group_runs(runs)
    out_dir = Path(out).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(groups, target)
    files = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "runs_csv": out_dir / "runs.csv",
        "accuracy_vs_rounds": out_dir / "accuracy_vs_rounds.png",
        "accuracy_vs_bytes": out_dir / "accuracy_vs_bytes.png",
        "frontier": out_dir / "frontier.png",
    }
    files["markdown"].write_text(markdown + "\n")
    _write_group_csv(files["csv"], groups)
    _write_runs_csv(files["runs_csv"], runs)
    plot_curves(groups, files["accuracy_vs_rounds"], x="round")
    plot_curves(groups, files["accuracy_vs_bytes"], x="bytes")
    plot_frontier(groups, files["frontier"])
    return Report(groups, target, files, markdown)


def markdown_table(groups: Sequence[Group], target: float) -> str:
    """The comparison table: one row per group, mean ± std over seeds."""
    headers = ["run", "seeds", *(h for _, h, _ in COLUMNS)]
    rows = []
    for g in groups:
        cells = [g.label, str(len(g.runs))]
        for name, _, fmt in COLUMNS:
            mean, std, n = g.stat(name)
            if mean is None:
                cells.append("-")
                continue
            cell = fmt(mean) + (f" ± {fmt(std)}" if std else "")
            if n < len(g.runs):  # e.g. some seeds never reached the target
                cell += f" ({n}/{len(g.runs)})"
            cells.append(cell)
        rows.append(cells)
    lines = [
        f"Target accuracy: {100 * target:.1f}%. Mean ± sample std over seeds; (k/n): only k of n seeds have a value.",
        "",
        *_table(headers, rows),
    ]
    for kind, title in METRIC_TITLES.items():
        keys = metric_keys((r for g in groups for r in g.runs), kind)
        if keys:
            metric_rows = []
            for g in groups:
                cells = [g.label]
                for key in keys:
                    mean, std, n = g.metric_stat(key, kind)
                    cells.append("-" if mean is None else f"{mean:.4g}" + (f" ± {std:.2g}" if std else ""))
                metric_rows.append(cells)
            lines += ["", title, ""]
            lines += _table(["run", *keys], metric_rows)
    return "\n".join(lines)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _kind_keys(runs: Iterable[RunSummary]) -> list[tuple[str, str]]:
    """(kind, key) of every final metric column, task metrics first: ``task.<key>``,
    ``strategy.<key>``."""
    runs = list(runs)
    return [(kind, key) for kind in METRIC_TITLES for key in metric_keys(runs, kind)]


def _write_group_csv(path: Path, groups: Sequence[Group]) -> None:
    setting_keys = sorted({k for g in groups for k in g.settings})
    columns = _kind_keys(r for g in groups for r in g.runs)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "label",
                *setting_keys,
                "seeds",
                *(f"{n}_{s}" for n, _, _ in COLUMNS for s in ("mean", "std")),
                *(f"{kind}.{k}_{s}" for kind, k in columns for s in ("mean", "std")),
            ]
        )
        for g in groups:
            stats = [v for n, _, _ in COLUMNS for v in g.stat(n)[:2]]
            stats += [v for kind, k in columns for v in g.metric_stat(k, kind)[:2]]
            w.writerow([g.label, *(g.settings.get(k) for k in setting_keys), len(g.runs), *_cells(stats)])


def _write_runs_csv(path: Path, runs: Sequence[RunSummary]) -> None:
    columns = _kind_keys(runs)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["run_dir", "seed", *(n for n, _, _ in COLUMNS), *(f"{kind}.{k}" for kind, k in columns)])
        for r in runs:
            values = [getattr(r, n) for n, _, _ in COLUMNS] + [
                _metrics(r, kind).get(k) for kind, k in columns
            ]
            w.writerow([str(r.run_dir), r.seed, *_cells(values)])


def _cells(values: Iterable[Any]) -> list[Any]:
    return ["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in values]


def curve(group: Group, x: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """(x, mean accuracy, min, max) per round over the group's seeds (up to the shortest run)."""
    n = min(len(r.rounds) for r in group.runs)
    xs, mean, lo, hi = [], [], [], []
    for i in range(n):
        accs = [_num(r.rounds[i].get("accuracy")) for r in group.runs]
        if not all(math.isfinite(a) for a in accs):  # a round not evaluated (evaluate-every)
            continue
        if x == "round":
            xs.append(float(group.runs[0].rounds[i]["round"]))
        else:
            xs.append(
                statistics.fmean(
                    r.rounds[i]["cum_bytes_up"] + r.rounds[i]["cum_bytes_down"] for r in group.runs
                )
            )
        mean.append(statistics.fmean(accs))
        lo.append(min(accs))
        hi.append(max(accs))
    return xs, mean, lo, hi


def plot_curves(groups: Sequence[Group], path: Path, *, x: str) -> Path:
    """Accuracy against rounds (``x="round"``) or cumulative bytes up+down (``"bytes"``, log)."""
    fig, ax = _axes()
    for g in groups:
        xs, mean, lo, hi = curve(g, x)
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"{g.label} (n={len(g.runs)})")
        if len(g.runs) > 1:
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if x == "bytes":
        ax.set_xscale("log")
        ax.set_xlabel("cumulative bytes on the wire (up + down)")
    else:
        ax.set_xlabel("round")
    return _save(fig, ax, path, "global test accuracy")


def _axes() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4.2))


def _save(fig: Any, ax: Any, path: Path, ylabel: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # Below the axes: group labels name every key that differs, and can be long.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.14))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_frontier(groups: Sequence[Group], path: Path) -> Path:
    """Final accuracy against total bytes up+down, one point per group (bars: min-max over seeds)."""
    fig, ax = _axes()
    for g in groups:
        total = [r.bytes_up + r.bytes_down for r in g.runs]
        acc = [r.final_accuracy for r in g.runs]
        x, y = statistics.fmean(total), statistics.fmean(acc)
        ax.errorbar(
            x,
            y,
            xerr=[[x - min(total)], [max(total) - x]],
            yerr=[[y - min(acc)], [max(acc) - y]],
            marker="o",
            capsize=3,
            label=f"{g.label} (n={len(g.runs)})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("total bytes on the wire (up + down)")
    return _save(fig, ax, path, "final global test accuracy")
