"""Instruction tuning of a causal LM (``task.name = "causal-lm"``): the job FlowerTune,
OpenFedLLM and FederatedScope-LLM federate.

* **Data** -- instruction / response pairs (:mod:`fedpeft.data.instructions`), split
  between the server and the clients like classification data
  (:mod:`fedpeft.tasks.splits`): WordNet definitions, BBC News as a question, or a local
  JSONL of instructions or chat messages, partitioned by label skew or naturally by a
  user column.
* **Formatting** -- the prompt goes through the tokenizer's chat template (``lm.chat-
  template``; else ``### Instruction: / ### Response:``) and the response ends with the
  end-of-sequence token, so a tuned model learns to stop.  A prompt that does not fit
  ``model.max-length`` loses the end of its last user turn, never the template around it
  nor the response.  ``lm.packing`` packs several examples into each row.
* **Loss** -- next-token cross-entropy on the response tokens only (the prompt is
  context, not target), averaged per example and then over the batch: each example (the
  unit DP-SGD clips) weighs the same whatever its length.
* **Metrics** -- on the server's held-out examples every round: ``perplexity`` (exp of the
  mean negative log-likelihood per response token), ``token_accuracy`` (greedy next-token
  accuracy on them) and, from greedy generation on the first ``lm.generate-examples``
  prompts, ``exact_match`` (the answer equals the reference, case, surrounding blanks and
  end punctuation aside).  The round's ``accuracy`` is that exact match (token accuracy
  when ``lm.generate-examples = 0``).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from fedpeft.config import RunConfig
from fedpeft.data import column_values
from fedpeft.data.instructions import load_instructions, messages_of
from fedpeft.models import FedModel
from fedpeft.models.backbone import load_tokenizer
from fedpeft.settings import ConfigError
from fedpeft.tasks import splits
from fedpeft.tasks.base import Evaluation, Examples
from fedpeft.training import Encoded, forward_batches

# Client-side evaluation (fraction-evaluate > 0) answers at most this many of the client's prompts.
_CLIENT_GENERATE = 16
IGNORE = -100  # target of a token that takes no loss (prompt, padding)
_SLOT = "\x00fedpeft-content\x00"  # stands for the truncatable content while rendering the template


@dataclass(frozen=True)
class LMExamples(Encoded):
    """Tokenized instruction examples: rows to train or score, and prompts to answer.

    ``labels`` are token targets (the response; :data:`IGNORE` elsewhere).  ``prompts``
    are the first ``lm.generate-examples`` examples' prompt ids (ending where the answer
    starts) and ``answers`` their reference responses, for exact match.
    """

    prompts: tuple[torch.Tensor, ...] = ()
    answers: tuple[str, ...] = ()
    max_new_tokens: int = 16


class CausalLM:
    """The :class:`~fedpeft.tasks.base.Task` of instruction tuning (``data.*``, ``lm.*`` keys)."""

    model_kind = "causal-lm"

    def label_names(self, cfg: RunConfig) -> tuple[str, ...]:
        return ()  # the outputs are the vocabulary; the data's labels only steer partitioning

    def num_outputs(self, cfg: RunConfig) -> int:
        return len(load_tokenizer(cfg.model.name))

    def client_train_size(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> int:
        if cfg.lm.packing:  # the rows the examples pack into: known only once tokenized
            return len(client_train_set(cfg, partition_id, num_partitions))
        return splits.client_partition(load_instructions, cfg, partition_id, num_partitions).num_rows

    def client_train_set(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> LMExamples:
        return client_train_set(cfg, partition_id, num_partitions)

    def server_test_set(self, cfg: RunConfig) -> LMExamples:
        return server_set(cfg, 1)

    def server_validation_set(self, cfg: RunConfig) -> LMExamples:
        return server_set(cfg, 0)

    def partition_stats(self, cfg: RunConfig) -> list[dict[str, Any]]:
        """Size and label histogram of every client's partition (packed: ``size`` counts
        rows, ``examples`` what they hold)."""
        stats = splits.client_stats(load_instructions, cfg)
        if cfg.lm.packing:
            for stat in stats:
                stat["examples"] = stat["size"]
                stat["size"] = self.client_train_size(cfg, stat["partition_id"], cfg.num_clients)
        return stats

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of each example's mean next-token loss on its response."""
        nll, counted = _token_nll(*_next_token(logits, targets))
        per_example = nll.sum(dim=1) / counted.sum(dim=1).clamp(min=1)
        return per_example.mean()

    @torch.no_grad()
    def evaluate(self, model: FedModel, data: Examples, batch_size: int) -> Evaluation:
        """Perplexity and token accuracy on the responses; exact match of greedy answers."""
        nll_sum, tokens, correct = 0.0, 0, 0
        for logits, targets in forward_batches(model, data, batch_size):
            aligned, shifted = _next_token(logits, targets)
            nll, counted = _token_nll(aligned, shifted)
            nll_sum += float(nll.sum())
            tokens += int(counted.sum())
            correct += int(((aligned.argmax(dim=-1) == shifted) & counted).sum())
        loss = nll_sum / max(tokens, 1)
        metrics = {"perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1)}
        if isinstance(data, LMExamples) and data.prompts:
            answers = generate(model.module, model.tokenizer, data.prompts, batch_size, data.max_new_tokens)
            hits = sum(normalize(a) == normalize(r) for a, r in zip(answers, data.answers, strict=True))
            metrics["exact_match"] = hits / len(answers)
        metrics["accuracy"] = metrics.get("exact_match", metrics["token_accuracy"])
        return Evaluation(loss, metrics)


def _next_token(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the tokens they predict), both ``[B, L-1, ...]``: position t predicts token
    t+1.  Logits longer than the targets (a soft prompt prepended by prompt tuning) are
    aligned on the right."""
    return logits[:, -targets.shape[1] :][:, :-1], targets[:, 1:]


def _token_nll(logits: torch.Tensor, shifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, mask of the tokens that count) of aligned logits (:func:`_next_token`)."""
    logits = logits.float()
    counted = shifted != IGNORE
    nll = F.cross_entropy(logits.transpose(1, 2), shifted.clamp(min=0), reduction="none")
    return nll * counted, counted


# ---------------------------------------------------------------------- generation
def normalize(text: str) -> str:
    """An answer as exact match compares it: its first line, lower case, blanks collapsed,
    surrounding quotes and end punctuation dropped."""
    line = text.strip().split("\n", 1)[0]
    return re.sub(r"\s+", " ", line).strip().strip("\"'").rstrip(".!?;:,").strip().lower()


@torch.no_grad()
def generate(
    module: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[torch.Tensor],
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers of ``module`` (a causal LM, peft-wrapped or not) to ``prompts`` (token
    ids), decoded without special tokens."""
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    device = next(module.parameters()).device
    module.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):  # left padding: every answer starts at the same column
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        with warnings.catch_warnings():
            # peft's prompt learning drops the position ids generate passes, saying so each call.
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            out = module.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return answers


# ---------------------------------------------------------------------- formatting
@dataclass(frozen=True)
class Formatted:
    """One example's token ids: the prompt (up to where the answer starts) and the response."""

    prompt: list[int]
    response: list[int]


def _template_parts(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], chat: bool
) -> tuple[str, str, str]:
    """(text before the last turn's content, that content, text after it up to the answer)."""
    content = messages[-1]["content"]
    if chat and tokenizer.chat_template:
        slotted = [*messages[:-1], {**messages[-1], "content": _SLOT}]
        rendered = tokenizer.apply_chat_template(slotted, add_generation_prompt=True, tokenize=False)
        head, _, tail = str(rendered).partition(_SLOT)
        return head, content, tail
    earlier = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages[:-1])
    bos = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token else ""
    return f"{bos}{earlier}### Instruction:\n", content, "\n\n### Response:\n"


def format_examples(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    chat: bool,
) -> list[Formatted]:
    """Token ids of each example, at most ``max_length`` in all.

    The response is followed by the end-of-sequence token.  What does not fit comes off
    the end of the last turn's content (an article, say), keeping the template and the
    response whole; a response longer than ``max_length`` alone is cut too.
    """
    parts = [_template_parts(tokenizer, messages_of(p), chat) for p in prompts]

    def ids(texts: Sequence[str]) -> list[list[int]]:
        return list(tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else []

    heads, contents, tails = (ids([p[i] for p in parts]) for i in range(3))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for head, content, tail, response in zip(heads, contents, tails, ids(responses), strict=True):
        if len(head) + len(tail) >= max_length:
            raise ConfigError(
                f"config key 'model.max-length' ({max_length}) leaves no room for an answer: the prompt "
                f"template alone takes {len(head) + len(tail)} tokens; raise it, or set lm.chat-template = false"
            )
        response = (response + eos)[: max(1, max_length - len(head) - len(tail))]
        budget = max(0, max_length - len(head) - len(tail) - len(response))
        out.append(Formatted(head + content[:budget] + tail, response))
    return out


def encode_examples(
    examples: Sequence[Formatted], pad_id: int, *, packing: bool = False, max_length: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input ids, attention mask, token targets, position ids or None), right-padded.

    With ``packing``, consecutive examples share a row of at most ``max_length`` tokens
    (first fit in order, an example never split), each with positions from 0.
    """
    rows: list[list[Formatted]] = []
    for ex in examples:
        size = len(ex.prompt) + len(ex.response)
        if packing and rows and sum(len(e.prompt) + len(e.response) for e in rows[-1]) + size <= max_length:
            rows[-1].append(ex)
        else:
            rows.append([ex])
    width = max((sum(len(e.prompt) + len(e.response) for e in row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n, m = len(ex.prompt), len(ex.response)
            ids[r, at : at + n + m] = torch.tensor(ex.prompt + ex.response, dtype=torch.long)
            targets[r, at + n : at + n + m] = torch.tensor(ex.response, dtype=torch.long)
            positions[r, at : at + n + m] = torch.arange(n + m)
            at += n + m
        mask[r, :at] = 1
    return ids, mask, targets, positions if packing else None


def prepare(cfg: RunConfig, rows: Any, *, generate_examples: int) -> LMExamples:
    """Tokenize a split's rows (a ``datasets.Dataset`` with ``prompt`` and ``response``)."""
    tokenizer = load_tokenizer(cfg.model.name)
    prompts, responses = column_values(rows, "prompt"), column_values(rows, "response")
    formatted = format_examples(tokenizer, prompts, responses, cfg.model.max_length, cfg.lm.chat_template)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    ids, mask, targets, positions = encode_examples(
        formatted, pad, packing=cfg.lm.packing, max_length=cfg.model.max_length
    )
    shown = formatted[:generate_examples]
    return LMExamples(
        ids,
        mask,
        targets,
        positions,
        prompts=tuple(torch.tensor(f.prompt, dtype=torch.long) for f in shown),
        answers=tuple(responses[: len(shown)]),
        max_new_tokens=cfg.lm.max_new_tokens,
    )


@functools.lru_cache(maxsize=4)
def server_set(cfg: RunConfig, which: int) -> LMExamples:
    """The server's validation (0) or test (1) examples, tokenized; exact match is measured
    on the first ``lm.generate-examples`` test prompts (a seeded draw: the split is shuffled)."""
    rows = splits.server_splits(load_instructions, cfg)[which]
    return prepare(cfg, rows, generate_examples=cfg.lm.generate_examples if which == 1 else 0)


@functools.lru_cache(maxsize=256)
def client_train_set(cfg: RunConfig, partition_id: int, num_partitions: int) -> LMExamples:
    """Client ``partition_id``'s examples, tokenized (cached per process)."""
    part = splits.client_partition(load_instructions, cfg, partition_id, num_partitions)
    return prepare(cfg, part, generate_examples=min(cfg.lm.generate_examples, _CLIENT_GENERATE))
