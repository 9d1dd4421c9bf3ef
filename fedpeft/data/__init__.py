"""Data: text-classification sources, the server test split, client partitions.

See :mod:`fedpeft.data.sources` (what is loaded, and how it is split) and
:mod:`fedpeft.data.partition` (how the training set is spread over clients, with
flwr-datasets' partitioners).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedpeft.lazy import lazy_exports

if TYPE_CHECKING:
    from fedpeft.data.images import (
        FASHION_MNIST_LABELS as FASHION_MNIST_LABELS,
    )
    from fedpeft.data.images import (
        IMAGE_SOURCES as IMAGE_SOURCES,
    )
    from fedpeft.data.images import (
        IMAGE_SUFFIXES as IMAGE_SUFFIXES,
    )
    from fedpeft.data.images import (
        ImageStore as ImageStore,
    )
    from fedpeft.data.images import (
        clear_image_cache as clear_image_cache,
    )
    from fedpeft.data.images import (
        image_store as image_store,
    )
    from fedpeft.data.images import (
        is_image_source as is_image_source,
    )
    from fedpeft.data.images import (
        load_image_folder as load_image_folder,
    )
    from fedpeft.data.images import (
        load_images as load_images,
    )
    from fedpeft.data.images import (
        make_image_dataset as make_image_dataset,
    )
    from fedpeft.data.partition import (
        PARTITIONERS as PARTITIONERS,
    )
    from fedpeft.data.partition import (
        Partitioner as Partitioner,
    )
    from fedpeft.data.partition import (
        PartitionerSpec as PartitionerSpec,
    )
    from fedpeft.data.partition import (
        ShuffledIidPartitioner as ShuffledIidPartitioner,
    )
    from fedpeft.data.partition import (
        clear_partition_cache as clear_partition_cache,
    )
    from fedpeft.data.partition import (
        load_partition as load_partition,
    )
    from fedpeft.data.partition import (
        make_partitioner as make_partitioner,
    )
    from fedpeft.data.partition import (
        partition_stats as partition_stats,
    )
    from fedpeft.data.partition import (
        register_partitioner as register_partitioner,
    )
    from fedpeft.data.sources import (
        LOCAL_SUFFIXES as LOCAL_SUFFIXES,
    )
    from fedpeft.data.sources import (
        SOURCES as SOURCES,
    )
    from fedpeft.data.sources import (
        WORDNET_NOUN_LEXNAMES as WORDNET_NOUN_LEXNAMES,
    )
    from fedpeft.data.sources import (
        DataSourceUnavailable as DataSourceUnavailable,
    )
    from fedpeft.data.sources import (
        TextDataset as TextDataset,
    )
    from fedpeft.data.sources import (
        clear_source_cache as clear_source_cache,
    )
    from fedpeft.data.sources import (
        column_values as column_values,
    )
    from fedpeft.data.sources import (
        label_array as label_array,
    )
    from fedpeft.data.sources import (
        load_bbc_news as load_bbc_news,
    )
    from fedpeft.data.sources import (
        load_source as load_source,
    )
    from fedpeft.data.sources import (
        load_wordnet_nouns as load_wordnet_nouns,
    )
    from fedpeft.data.sources import (
        make_text_dataset as make_text_dataset,
    )
    from fedpeft.data.sources import (
        split_train_test as split_train_test,
    )

_WHERE = {
    "FASHION_MNIST_LABELS": ".images",
    "IMAGE_SOURCES": ".images",
    "IMAGE_SUFFIXES": ".images",
    "ImageStore": ".images",
    "clear_image_cache": ".images",
    "image_store": ".images",
    "is_image_source": ".images",
    "load_image_folder": ".images",
    "load_images": ".images",
    "make_image_dataset": ".images",
    "PARTITIONERS": ".partition",
    "Partitioner": ".partition",
    "PartitionerSpec": ".partition",
    "ShuffledIidPartitioner": ".partition",
    "clear_partition_cache": ".partition",
    "load_partition": ".partition",
    "make_partitioner": ".partition",
    "partition_stats": ".partition",
    "register_partitioner": ".partition",
    "LOCAL_SUFFIXES": ".sources",
    "SOURCES": ".sources",
    "WORDNET_NOUN_LEXNAMES": ".sources",
    "DataSourceUnavailable": ".sources",
    "TextDataset": ".sources",
    "clear_source_cache": ".sources",
    "column_values": ".sources",
    "label_array": ".sources",
    "load_bbc_news": ".sources",
    "load_source": ".sources",
    "load_wordnet_nouns": ".sources",
    "make_text_dataset": ".sources",
    "split_train_test": ".sources",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
