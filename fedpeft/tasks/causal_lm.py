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
  unit DP-SGD clips) weighs the same whatever its length.  The output layer runs on those
  tokens only, in chunks (:func:`score`, :mod:`fedpeft.models.output_layer`): no logits
  over the vocabulary at prompt positions, in training or evaluation.
* **Metrics** -- on the server's held-out examples every round: ``perplexity`` (exp of the
  mean negative log-likelihood per response token), ``token_accuracy`` (greedy next-token
  accuracy on them) and, from greedy generation on the first ``lm.generate-examples``
  prompts, ``exact_match`` (the answer equals the reference, case, surrounding blanks and
  end punctuation aside).  The round's ``accuracy`` is that exact match (token accuracy
  when ``lm.generate-examples = 0``).  The answered examples' references are scored on
  the key-value cache of their greedy answers (:func:`answer_and_score`).
"""

from __future__ import annotations

import dataclasses
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
from fedpeft.models.methods import get_method
from fedpeft.models.output_layer import hidden_before_output, plain_output_layer, token_nll
from fedpeft.settings import ConfigError
from fedpeft.tasks import splits
from fedpeft.tasks.base import Evaluation, Examples
from fedpeft.training import Encoded

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

    def head(self, count: int) -> LMExamples:
        """The first ``count`` rows, and the prompts among them (packed rows: the prompts
        of the first ``count`` examples)."""
        return dataclasses.replace(
            super().head(count), prompts=self.prompts[:count], answers=self.answers[:count]
        )


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

    def forward(
        self, module: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> Scored:
        """Each scored token's negative log-likelihood, row by row (:func:`score`): the
        output layer runs on the response tokens only, never on the prompt."""
        nll, _, kept = score(module, inputs, targets)
        return nll, kept

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of each example's mean loss on its response tokens
        (``outputs``: per-token losses from :meth:`forward`, 0 where ``targets`` is IGNORE)."""
        counted = targets != IGNORE
        per_example = (outputs * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)
        return per_example.mean()

    @torch.no_grad()
    def evaluate(self, model: FedModel, data: Examples, batch_size: int) -> Evaluation:
        """Perplexity and token accuracy on the responses; exact match of greedy answers.

        The answered examples' references are scored on the key-value cache their greedy
        answers were generated from (:func:`answer_and_score`): their prompts go through
        the model once, not twice.
        """
        tally = _Tally()
        model.module.eval()
        first = 0
        metrics: dict[str, float] = {}
        if isinstance(data, LMExamples) and data.prompts:
            if _shares_prefill(model, data):
                answers: list[str] = []
                for start in range(0, len(data.prompts), batch_size):
                    rows = range(start, min(start + batch_size, len(data.prompts)))
                    answers += answer_and_score(model, data, rows, tally)
                first = len(data.prompts)  # scored already
            else:
                answers = generate(
                    model.module, model.tokenizer, data.prompts, batch_size, data.max_new_tokens
                )
            hits = sum(normalize(a) == normalize(r) for a, r in zip(answers, data.answers, strict=True))
            metrics["exact_match"] = hits / len(answers)
        for inputs, targets in data.batches(torch.arange(first, len(data)), batch_size, model.device):
            tally.add(*score(model.module, inputs, targets))
        loss = tally.nll / max(tally.tokens, 1)
        metrics = {
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": tally.correct / max(tally.tokens, 1),
        } | metrics
        metrics["accuracy"] = metrics.get("exact_match", metrics["token_accuracy"])
        return Evaluation(loss, metrics)


@dataclass
class _Tally:
    """Sums over scored tokens: negative log-likelihood, count, greedy hits."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0

    def add(self, nll: torch.Tensor, hits: torch.Tensor, targets: torch.Tensor) -> None:
        counted = targets != IGNORE
        self.nll += float((nll * counted).sum())
        self.tokens += int(counted.sum())
        self.correct += int((hits & counted).sum())


# A batch's scored tokens, row by row: (per-token loss [B, K], targets [B, K], IGNORE-padded).
Scored = tuple[torch.Tensor, torch.Tensor]


def score(
    module: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, greedy hit, target) of every response token of a batch, ``[B, K]``
    each: row b's scored tokens first, in order, then padding (loss 0, no hit, IGNORE).

    Position t predicts token t+1.  Hidden states longer than the targets (a soft prompt
    prepended by prompt tuning) are aligned on the right.  The output layer runs on the
    scored positions only, a chunk at a time (:mod:`fedpeft.models.output_layer`); a model
    whose logits are more than its output layer is scored from its full logits.
    """
    shifted = targets[:, 1:]
    counted = shifted != IGNORE
    head = plain_output_layer(module)
    if head is None:
        aligned = module(**inputs).logits[:, -targets.shape[1] :][:, :-1].float()
        # Rows of logits: PyTorch's CPU kernel over the class dimension transposed is off by
        # up to 2e-4 nats per token on a 49,152-token vocabulary.
        flat = F.cross_entropy(aligned.flatten(0, 1), shifted.clamp(min=0).flatten(), reduction="none")
        nll = flat.view_as(shifted) * counted
        return nll, (aligned.argmax(dim=-1) == shifted) & counted, shifted
    with hidden_before_output(module, head) as seen:
        module(**inputs)
    hidden = seen[-1][:, -targets.shape[1] :][:, :-1]
    rows, cols = counted.nonzero(as_tuple=True)
    nll_flat, hit_flat = token_nll(hidden[rows, cols], head, shifted[rows, cols])
    slots = (rows, (counted.cumsum(dim=1) - 1)[rows, cols])
    width = int(counted.sum(dim=1).max()) if len(rows) else 0
    size = (targets.shape[0], width)
    nll = nll_flat.new_zeros(size).index_put(slots, nll_flat)
    hits = torch.zeros(size, dtype=torch.bool, device=targets.device).index_put(slots, hit_flat)
    kept = torch.full(size, IGNORE, dtype=targets.dtype, device=targets.device).index_put(
        slots, shifted[rows, cols]
    )
    return nll, hits, kept


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
    ids), decoded without special tokens; generated with the key-value cache."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_padded(prompts[start : start + batch_size], _pad_id(tokenizer))
        out = _greedy(module, tokenizer, ids, mask, max_new_tokens)
        answers += tokenizer.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
    return answers


def _shares_prefill(model: FedModel, data: LMExamples) -> bool:
    """Whether the answered examples' references can be scored on their answers' cache:
    one example per row, and a method that adds no virtual tokens to the cache."""
    return data.position_ids is None and not get_method(model.method).row_tokens


@torch.no_grad()
def answer_and_score(model: FedModel, data: LMExamples, rows: range, tally: _Tally) -> list[str]:
    """Greedy answers to the prompts of ``rows``, and their reference responses scored
    (added to ``tally``) on the key-value cache the answers were generated from.

    Generation runs the prompts through the model (left-padded, so every prompt ends in
    the same column) and leaves their keys and values in the cache; cropped back to the
    prompts less their last token, it scores the references by teacher forcing: the last
    prompt token, then each reference token but the last, at the positions they hold in
    the example.  Scoring the example rows again would run every prompt a second time:
    for short answers, almost all of an evaluation's compute.
    """
    module, tokenizer, device = model.module, model.tokenizer, model.device
    prompts = data.prompts[rows.start : rows.stop]
    ids, mask = _left_padded(prompts, _pad_id(tokenizer))
    out = _greedy(module, tokenizer, ids, mask, data.max_new_tokens)
    answers = tokenizer.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
    cache, head = out.past_key_values, plain_output_layer(module)
    if head is None or not _full_attention_cache(cache):  # a sliding window cannot be rolled back
        tally.add(*score(module, *next(data.batches(torch.tensor(list(rows)), len(rows), device))))
        return answers
    responses = [data.input_ids[r][data.labels[r] != IGNORE] for r in rows]
    longest = max(len(x) for x in responses)
    # Inputs: the last prompt token, then the reference but its last token; targets: the reference.
    inputs = torch.full((len(rows), longest), _pad_id(tokenizer), dtype=torch.long)
    targets = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        inputs[row, 0] = prompt[-1]
        inputs[row, 1 : len(response)] = response[:-1]
        targets[row, : len(response)] = response
    counted = targets != IGNORE
    positions = torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1) + torch.arange(longest)
    cache.crop(ids.shape[1] - 1 - cache.get_seq_length())  # back to the prompts less their last token
    with hidden_before_output(module, head) as seen:
        module(
            input_ids=inputs.to(device),
            attention_mask=torch.cat([mask[:, :-1], counted.long()], dim=1).to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
        )
    scored = targets[counted].to(device)
    nll, hits = token_nll(seen[-1][counted.to(device)], head, scored)
    tally.add(nll, hits, scored)
    return answers


def _full_attention_cache(cache: Any) -> bool:
    """Whether every layer of a generation cache keeps every position (crop rolls it back)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def _left_padded(prompts: Sequence[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``prompts`` left-padded: every answer starts in the same column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _greedy(
    module: Any,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
) -> Any:
    """``module.generate``'s greedy output (sequences and the key-value cache)."""
    device = next(module.parameters()).device
    module.eval()
    with warnings.catch_warnings():
        # peft's prompt learning drops the position ids generate passes, saying so each call.
        warnings.filterwarnings("ignore", message="Position ids are not supported")
        return module.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            return_dict_in_generate=True,
            pad_token_id=_pad_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
        )


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
