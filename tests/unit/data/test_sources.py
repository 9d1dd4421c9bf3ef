"""Loading the built-in and local text sources, and the server's test split."""

from __future__ import annotations

import re

import datasets
import numpy as np
import pandas as pd
import pytest

from fedpeft.config import ConfigError
from fedpeft.data import sources
from fedpeft.data.settings import DataConfig
from fedpeft.data.sources import (
    DataSourceUnavailable,
    TextDataset,
    clear_source_cache,
    label_array,
    load_source,
    make_text_dataset,
    split_train_test,
)

needs_wordnet = pytest.mark.skipif(
    not sources.WORDNET_SYSTEM_PATH.is_file(), reason="wordnet-base is not installed"
)


def _check_shape(ds: TextDataset) -> None:
    assert ds.dataset.column_names == ["text", "label"]
    assert isinstance(ds.dataset.features["label"], datasets.ClassLabel)
    assert ds.dataset.features["label"].names == list(ds.label_names)
    labels = np.asarray(ds.dataset["label"])
    assert labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < ds.num_classes


def test_bbc_news() -> None:
    ds = load_source(DataConfig(dataset="bbc-news"), seed=0)
    _check_shape(ds)
    assert len(ds) == 2225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert np.bincount(label_array(ds.dataset)).tolist() == [510, 386, 417, 511, 401]
    texts = ds.dataset["text"]
    assert all(t.strip() for t in texts)
    assert not any("\ufffd" in t for t in texts)  # the one Latin-1 file decodes cleanly
    assert any("£15.8m" in t for t in texts)
    assert load_source(DataConfig(dataset="bbc-news"), seed=0) is ds  # cached


@needs_wordnet
def test_wordnet_nouns() -> None:
    ds = load_source(DataConfig(dataset="wordnet-nouns"), seed=0)
    _check_shape(ds)
    assert len(ds) == 82115
    assert ds.num_classes == 26
    assert ds.label_names[0] == "noun.Tops" and ds.label_names[-1] == "noun.time"
    assert ds.dataset[0] == {
        "text": "entity: that which is perceived or known or inferred to have its own "
        "distinct existence (living or nonliving)",
        "label": 0,
    }
    assert all(": " in t for t in ds.dataset[:1000]["text"])


@needs_wordnet
def test_num_classes_keeps_most_frequent() -> None:
    full = load_source(DataConfig(dataset="wordnet-nouns"), seed=0)
    counts = np.bincount(label_array(full.dataset))
    ds = load_source(DataConfig(dataset="wordnet-nouns", num_classes=10), seed=0)
    _check_shape(ds)
    assert ds.num_classes == 10
    assert sorted(set(label_array(ds.dataset).tolist())) == list(range(10))
    top = sorted(np.argsort(-counts, kind="stable")[:10].tolist())
    assert ds.label_names == tuple(full.label_names[c] for c in top)
    assert len(ds) == int(counts[top].sum())
    with pytest.raises(ConfigError, match=r"data\.num-classes"):
        load_source(DataConfig(dataset="bbc-news", num_classes=6), seed=0)


@needs_wordnet
def test_max_examples_is_seeded() -> None:
    cfg = DataConfig(dataset="wordnet-nouns", num_classes=5, max_examples=500)
    a = load_source(cfg, seed=1)
    clear_source_cache()
    b = load_source(cfg, seed=1)
    c = load_source(cfg, seed=2)
    assert len(a) == len(c) == 500 and a.num_classes == 5
    assert a.dataset[:]["text"] == b.dataset[:]["text"]
    assert a.dataset[:]["text"] != c.dataset[:]["text"]


def test_missing_wordnet(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    missing = tmp_path / "nope" / "data.noun"
    monkeypatch.setattr(sources, "WORDNET_SYSTEM_PATH", missing)
    monkeypatch.delenv("WNHOME", raising=False)
    clear_source_cache()
    try:
        with pytest.raises(DataSourceUnavailable, match="apt-get install wordnet-base") as e:
            load_source(DataConfig(dataset="wordnet-nouns"), seed=0)
        assert str(missing) in str(e.value)
        assert isinstance(e.value, ConfigError)
    finally:
        clear_source_cache()


def test_wnhome(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "data.noun").write_text(
        "  1 This software and database is being provided\n"
        "00001740 03 n 01 entity 0 000 | that which exists  \n"
        "00015388 05 n 02 animal 0 animate_being 0 000 | a living organism  \n"
        "00017222 20 n 01 plant 0 000 | buildings for carrying on industrial labor  \n"
    )
    monkeypatch.setenv("WNHOME", str(tmp_path))
    clear_source_cache()
    try:
        ds = load_source(DataConfig(dataset="wordnet-nouns"), seed=0)
    finally:
        clear_source_cache()
    assert ds.label_names == ("noun.Tops", "noun.animal", "noun.plant")
    assert ds.dataset["text"] == [
        "entity: that which exists",
        "animal, animate being: a living organism",
        "plant: buildings for carrying on industrial labor",
    ]
    assert ds.dataset["label"] == [0, 1, 2]


ROWS = {
    "body": ["good film", "bad film", "fine", "great", "awful", "meh"],
    "topic": ["pos", "neg", "neu", "pos", "neg", "neu"],
}


def _write(path, fmt: str) -> None:
    frame = pd.DataFrame(ROWS)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "json":
        path.write_text(frame.to_json(orient="records"))
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_local_files(tmp_path, fmt: str) -> None:
    path = tmp_path / f"data.{fmt}"
    _write(path, fmt)
    cfg = DataConfig(dataset=str(path), text_column="body", label_column="topic")
    ds = load_source(cfg, seed=0)
    _check_shape(ds)
    assert ds.label_names == ("neg", "neu", "pos")
    assert ds.dataset["text"] == ROWS["body"]
    assert ds.dataset["label"] == [2, 0, 1, 2, 0, 1]


def test_local_integer_labels(tmp_path) -> None:
    path = tmp_path / "ints.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [7, 3, 7]}).to_csv(path, index=False)
    ds = load_source(DataConfig(dataset=str(path)), seed=0)
    assert ds.label_names == ("3", "7")
    assert ds.dataset["label"] == [1, 0, 1]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"text_column": "text"}, "data.text-column"), ({"label_column": "y"}, "data.label-column")],
)
def test_local_wrong_column(tmp_path, kwargs, key: str) -> None:
    path = tmp_path / "data.csv"
    _write(path, "csv")
    cfg = DataConfig(dataset=str(path), **{"text_column": "body", "label_column": "topic", **kwargs})
    with pytest.raises(ConfigError, match=re.escape(key)) as e:
        load_source(cfg, seed=0)
    assert "body" in str(e.value) and "topic" in str(e.value)  # lists the columns present


def test_missing_local_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_source(DataConfig(dataset=str(tmp_path / "absent.csv")), seed=0)


def test_hub_failure_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="neither a built-in") as e:
        load_source(DataConfig(dataset="someone/no-such-dataset"), seed=0)
    assert "bbc-news" in str(e.value) and "wordnet-nouns" in str(e.value)


def test_hub_classlabel(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = datasets.Dataset.from_dict(
        {"sentence": ["x", "y", "z"], "y": [2, 0, 2]},
        features=datasets.Features(
            {"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["a", "b", "c"])}
        ),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub)
    cfg = DataConfig(dataset="fake/hub-ds", text_column="sentence", label_column="y")
    ds = load_source(cfg, seed=0)
    assert ds.label_names == ("a", "c")  # classes without examples are dropped
    assert ds.dataset["label"] == [1, 0, 1]
    clear_source_cache()


def _toy(counts: list[int]) -> TextDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    return make_text_dataset(
        [f"doc {i}" for i in range(len(labels))], labels, [f"c{k}" for k in range(len(counts))]
    )


def test_split_stratified_disjoint_deterministic() -> None:
    ds = _toy([500, 300, 150, 50])
    train, test = split_train_test(ds, test_fraction=0.2, max_test_examples=0, seed=3)
    assert len(train) == 800 and len(test) == 200
    assert np.bincount(test["label"]).tolist() == [100, 60, 30, 10]
    assert set(train["text"]).isdisjoint(test["text"])
    assert set(train["text"]) | set(test["text"]) == set(ds.dataset["text"])
    train2, test2 = split_train_test(ds, 0.2, 0, seed=3)
    assert train2["text"] == train["text"] and test2["text"] == test["text"]
    _, test3 = split_train_test(ds, 0.2, 0, seed=4)
    assert test3["text"] != test["text"]


def test_split_cap_keeps_train_and_strata() -> None:
    ds = _toy([500, 300, 150, 50])
    train, test = split_train_test(ds, 0.2, 0, seed=0)
    train_c, test_c = split_train_test(ds, 0.2, max_test_examples=40, seed=0)
    assert len(test_c) == 40
    assert np.bincount(test_c["label"]).tolist() == [20, 12, 6, 2]
    assert set(test_c["text"]) <= set(test["text"])
    assert train_c["text"] == train["text"]  # the cap never changes the training data


def test_split_tiny() -> None:
    ds = _toy([1, 1, 5])  # classes with a single example are fine
    train, test = split_train_test(ds, 0.3, 0, seed=0)
    assert len(train) + len(test) == 7 and len(test) == 2
