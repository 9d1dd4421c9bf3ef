"""Data: text-classification sources, the server test split, client partitions.

See :mod:`fedpeft.data.sources` (what is loaded, and how it is split) and
:mod:`fedpeft.data.partition` (how the training set is spread over clients, with
flwr-datasets' partitioners).
"""

from fedpeft.data.images import (
    FASHION_MNIST_LABELS,
    IMAGE_SOURCES,
    IMAGE_SUFFIXES,
    ImageStore,
    clear_image_cache,
    image_store,
    is_image_source,
    load_image_folder,
    load_images,
    make_image_dataset,
)
from fedpeft.data.partition import (
    PARTITIONERS,
    Partitioner,
    PartitionerSpec,
    ShuffledIidPartitioner,
    clear_partition_cache,
    load_partition,
    make_partitioner,
    partition_stats,
    register_partitioner,
)
from fedpeft.data.sources import (
    LOCAL_SUFFIXES,
    SOURCES,
    WORDNET_NOUN_LEXNAMES,
    DataSourceUnavailable,
    TextDataset,
    clear_source_cache,
    column_values,
    label_array,
    load_bbc_news,
    load_source,
    load_wordnet_nouns,
    make_text_dataset,
    split_train_test,
)

__all__ = [
    "FASHION_MNIST_LABELS",
    "IMAGE_SOURCES",
    "IMAGE_SUFFIXES",
    "LOCAL_SUFFIXES",
    "PARTITIONERS",
    "SOURCES",
    "WORDNET_NOUN_LEXNAMES",
    "DataSourceUnavailable",
    "ImageStore",
    "Partitioner",
    "PartitionerSpec",
    "ShuffledIidPartitioner",
    "TextDataset",
    "clear_image_cache",
    "clear_partition_cache",
    "clear_source_cache",
    "column_values",
    "image_store",
    "is_image_source",
    "label_array",
    "load_bbc_news",
    "load_image_folder",
    "load_images",
    "load_partition",
    "load_source",
    "load_wordnet_nouns",
    "make_image_dataset",
    "make_partitioner",
    "make_text_dataset",
    "partition_stats",
    "register_partitioner",
    "split_train_test",
]
