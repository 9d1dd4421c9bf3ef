"""Instruction data for causal-LM tuning: the built-in sources, local files, natural partitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedpeft.config import ConfigError
from fedpeft.data import column_values, label_array, load_partition, split_train_test
from fedpeft.data.instructions import load_instructions, messages_of
from fedpeft.data.settings import DataConfig
from fedpeft.data.sources import WORDNET_SYSTEM_PATH


def test_bbc_news_asks_for_the_section_and_answers_with_it():
    ds = load_instructions(DataConfig(dataset="bbc-news"), seed=0)
    assert len(ds) == 2225 and set(ds.dataset.column_names) == {"prompt", "response", "label"}
    responses = column_values(ds.dataset, "response")
    labels = label_array(ds.dataset)
    assert all(responses[i] == ds.label_names[labels[i]] for i in range(len(ds)))
    (turn,) = messages_of(column_values(ds.dataset, "prompt")[0])
    assert turn["role"] == "user" and turn["content"].startswith("Which section of the BBC News website")


@pytest.mark.skipif(not WORDNET_SYSTEM_PATH.exists(), reason="needs Debian's wordnet-base")
def test_wordnet_definitions_one_per_lemma_labelled_by_supersense():
    ds = load_instructions(DataConfig(dataset="wordnet-definitions"), seed=0)
    prompts = [messages_of(p)[0]["content"] for p in column_values(ds.dataset, "prompt")]
    assert len(set(p.lower() for p in prompts)) == len(prompts) > 60_000
    assert ds.num_classes == 26 and ds.label_names[0] == "noun.Tops"
    row = prompts.index('Define "dog".')
    assert column_values(ds.dataset, "response")[row].startswith("A member of the genus Canis")
    assert ds.label_names[label_array(ds.dataset)[row]] == "noun.animal"
    assert '"' not in column_values(ds.dataset, "response")[row]  # usage examples dropped


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_jsonl_of_instructions_or_chats_with_natural_users(tmp_path):
    rows = [
        {
            "instruction": f"Say {i}.",
            "input": "quietly" if i % 2 else "",
            "output": str(i),
            "user": f"u{i % 3}",
        }
        for i in range(30)
    ]
    cfg = DataConfig(
        dataset=_jsonl(tmp_path / "a.jsonl", rows), partitioner="natural", partition_column="user"
    )
    ds = load_instructions(cfg, seed=0)
    assert column_values(ds.dataset, "user")[:3] == ["u0", "u1", "u2"]
    assert messages_of(column_values(ds.dataset, "prompt")[1])[0]["content"] == "Say 1.\n\nquietly"
    assert ds.label_names == ("all",)
    train, _ = split_train_test(ds, 0.2, 0, seed=0)
    parts = [load_partition(train, cfg, 3, pid, seed=0) for pid in range(3)]
    assert [set(column_values(p, "user")) for p in parts] == [{"u0"}, {"u1"}, {"u2"}]
    assert sum(p.num_rows for p in parts) == train.num_rows
    with pytest.raises(ConfigError, match=r"'num-clients' \(4\).*distinct values.*\(3\)"):
        load_partition(train, cfg, 4, 0, seed=0)

    chats = [
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "topic": "t",
        }
    ] * 4
    chat = load_instructions(
        DataConfig(dataset=_jsonl(tmp_path / "c.jsonl", chats), label_column="topic"), seed=0
    )
    assert column_values(chat.dataset, "response") == ["Hello!"] * 4 and chat.label_names == ("t",)


def test_bad_instruction_files_name_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="'instruction' and 'response'"):
        load_instructions(DataConfig(dataset=_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])), seed=0)
    bad_chat = [{"messages": [{"role": "user", "content": "Hi"}]}]
    with pytest.raises(ConfigError, match="ending with the assistant's"):
        load_instructions(DataConfig(dataset=_jsonl(tmp_path / "y.jsonl", bad_chat)), seed=0)
    with pytest.raises(ConfigError, match="partition-column.*'who'"):
        load_instructions(
            DataConfig(dataset=_jsonl(tmp_path / "z.jsonl", [{"instruction": "a", "response": "b"}]),
                       partitioner="natural", partition_column="who"),
            seed=0,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="instruction source"):
        load_instructions(DataConfig(dataset="wordnet-nouns"), seed=0)
    with pytest.raises(ConfigError, match="partition-column"):
        DataConfig(partitioner="natural")


def test_natural_partition_by_label_gives_one_class_per_client():
    cfg = DataConfig(dataset="bbc-news", partitioner="natural", partition_column="label")
    ds = load_instructions(cfg, seed=0)
    train, _ = split_train_test(ds, 0.2, 0, seed=0)
    parts = [load_partition(train, cfg, 5, pid, seed=0) for pid in range(5)]
    assert [np.unique(label_array(p)).tolist() for p in parts] == [[0], [1], [2], [3], [4]]
