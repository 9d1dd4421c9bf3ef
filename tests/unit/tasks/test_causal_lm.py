"""Causal-LM instruction tuning with the real packaged SmolLM2-135M-Instruct: formatting,
the response-only loss, packing, generation, and a federated run through the real apps."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.config import ConfigError, RunConfig
from fedpeft.data.instructions import user_prompt
from fedpeft.models import output_layer
from fedpeft.models.backbone import load_tokenizer
from fedpeft.tasks import build_task
from fedpeft.tasks.causal_lm import (
    IGNORE,
    _Tally,
    answer_and_score,
    encode_examples,
    format_examples,
    generate,
    normalize,
    score,
)
from fedpeft.tasks.model import task_model
from fedpeft.tasks.settings import TrainConfig
from fedpeft.training import train_local
from tests.conftest import TINY_LLM

TASK = build_task("causal-lm")


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return RunConfig.from_run_config(TINY_LLM)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m")


def test_only_response_tokens_are_targets_and_the_answer_ends_the_turn(cfg):
    data = TASK.client_train_set(cfg, 0, cfg.num_clients)
    tokenizer = load_tokenizer(cfg.model.name)
    row = 0
    targets = data.labels[row]
    real = int(data.attention_mask[row].sum())
    answer = targets[targets != IGNORE]
    # The response is the last real tokens of the row, and it ends with end-of-sequence.
    assert torch.equal(data.input_ids[row, real - len(answer) : real], answer)
    assert int(answer[-1]) == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() in TASK_LABELS
    assert (targets[real:] == IGNORE).all() and (targets[: real - len(answer)] == IGNORE).all()


TASK_LABELS = {"business", "entertainment", "politics", "sports", "tech"}


def test_a_long_prompt_loses_its_content_end_never_the_template_or_response(tokenizer):
    long = "word " * 500
    (short,) = format_examples(tokenizer, [user_prompt("Define x.")], ["A letter."], 64, chat=True)
    (cut,) = format_examples(tokenizer, [user_prompt("Define x. " + long)], ["A letter."], 64, chat=True)
    assert len(cut.prompt) + len(cut.response) == 64
    assert cut.response == short.response  # whole, with its end-of-sequence token
    assert tokenizer.decode(cut.prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(cut.prompt).startswith("<|im_start|>system\n")


def test_a_template_longer_than_max_length_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match=r"model\.max-length.*chat-template"):
        format_examples(tokenizer, [user_prompt("Hi")], ["Hello."], 16, chat=True)


def test_chat_messages_keep_their_earlier_turns(tokenizer):
    import json

    turns = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    (ex,) = format_examples(tokenizer, [json.dumps(turns)], ["Ada."], 128, chat=True)
    text = tokenizer.decode(ex.prompt)
    assert text.index("My name is Ada.") < text.index("Hello Ada.") < text.index("What is my name?")


def test_loss_is_the_mean_of_per_example_response_losses(cfg):
    model = task_model(cfg, TASK)
    data = TASK.client_train_set(cfg, 0, cfg.num_clients)
    (inputs, targets), *_ = data.batches(torch.arange(2), 2, model.device)
    with torch.no_grad():
        outputs, kept = TASK.forward(model.module, inputs, targets)
        both = TASK.loss(outputs, kept)
        each = [TASK.loss(outputs[i : i + 1], kept[i : i + 1]) for i in range(2)]
        # Changing a prompt token's target changes nothing: the prompt takes no loss.
        other = targets.clone()
        first_prompt = int((targets[0] == IGNORE).nonzero()[0])
        other[0, first_prompt] = IGNORE
        assert torch.equal(TASK.loss(*TASK.forward(model.module, inputs, other)), both)
    assert math.isclose(float(both), float(sum(each)) / 2, rel_tol=1e-5)


def _full_logits_loss(module, inputs, targets):
    """The loss from the model's logits at every position (what scoring avoids)."""
    logits = module(**inputs).logits[:, :-1].float()
    shifted = targets[:, 1:]
    # Rows of logits, not the class dimension transposed: PyTorch's CPU kernel for the
    # latter is off by up to 2e-4 nats per token on SmolLM2's 49,152 classes.
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), shifted.clamp(min=0).reshape(-1), reduction="none"
    )
    nll = flat.reshape(shifted.shape)
    counted = shifted != IGNORE
    return ((nll * counted).sum(1) / counted.sum(1)).mean(), logits.argmax(-1)[counted] == shifted[counted]


def test_response_only_scoring_equals_the_full_logits_loss_and_its_gradients(cfg):
    """The output layer on the response tokens only, chunked: the same loss, the same
    greedy hits and the same gradients as cross-entropy over the full logits."""
    model = task_model(cfg, TASK)
    data = TASK.client_train_set(cfg, 0, cfg.num_clients)
    (inputs, targets), *_ = data.batches(torch.arange(4), 4, model.device)
    model.module.train()
    params = list(model.params.values())
    torch.manual_seed(0)  # the same dropout masks in both passes
    full, full_hits = _full_logits_loss(model.module, inputs, targets)
    full_grads = torch.autograd.grad(full, params)
    torch.manual_seed(0)
    outputs, kept = TASK.forward(model.module, inputs, targets)
    scored = TASK.loss(outputs, kept)
    grads = torch.autograd.grad(scored, params)
    model.module.eval()
    assert kept.shape[1] == int((targets != IGNORE).sum(1).max())  # response tokens only, not the row
    assert math.isclose(float(scored), float(full), rel_tol=1e-5)
    for a, b in zip(grads, full_grads, strict=True):  # float32 sums in another order: 1e-4 of the norm
        assert float((a - b).norm()) <= 1e-4 * float(b.norm())
    _, hits, kept = score(model.module, inputs, targets)
    assert torch.equal(hits[kept != IGNORE], full_hits)


@pytest.mark.parametrize("trained_layer", [False, True])
def test_chunked_output_layer_matches_plain_cross_entropy(monkeypatch, trained_layer):
    """Chunks of 3 rows (frozen layer: gradient precomputed in forward; trained layer:
    recomputed in backward), checked in float64 against F.linear + cross-entropy."""
    monkeypatch.setattr(output_layer, "CHUNK_BYTES", 3 * 4 * 11)
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 11, dtype=torch.float64).requires_grad_(trained_layer)
    hidden = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (8,))
    weights = torch.rand(8, dtype=torch.float64)  # any use of the per-token losses downstream
    nll, hits = output_layer.token_nll(hidden, head, targets)
    logits = head(hidden)
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(nll.double(), plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(hits, logits.argmax(-1) == targets)
    inputs = [hidden, *([head.weight, head.bias] if trained_layer else [])]
    got = torch.autograd.grad((nll.double() * weights).sum(), inputs)
    want = torch.autograd.grad((plain * weights).sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_model_whose_logits_are_more_than_its_output_layer_is_scored_from_its_logits():
    """Gemma 2 soft-caps its logits after the output layer: the check refuses its layer,
    and scoring falls back to the full logits (a tiny random Gemma 2, no weights needed)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    assert not output_layer.check_output_layer(model)
    assert output_layer.plain_output_layer(model) is None
    model.config.final_logit_softcapping = None
    assert output_layer.check_output_layer(model)
    assert output_layer.plain_output_layer(model) is model.lm_head


def test_packed_rows_score_each_example_as_if_alone(cfg, tokenizer):
    """Block-diagonal masks from restarting positions: no example sees another."""
    model = task_model(cfg, TASK)
    examples = format_examples(
        tokenizer,
        [user_prompt('Define "cat".'), user_prompt('Define "river".')],
        ["A small domesticated feline.", "A large natural stream of water."],
        48,
        chat=False,
    )
    pad = int(tokenizer.pad_token_id)
    alone = encode_examples(examples, pad)
    packed = encode_examples(examples, pad, packing=True, max_length=96)
    assert packed[0].shape[0] == 1 and alone[0].shape[0] == 2
    with torch.no_grad():
        rows = model.module(input_ids=alone[0], attention_mask=alone[1]).logits
        row = model.module(input_ids=packed[0], position_ids=packed[3]).logits
    n0 = len(examples[0].prompt) + len(examples[0].response)
    n1 = len(examples[1].prompt) + len(examples[1].response)
    torch.testing.assert_close(row[0, :n0], rows[0, :n0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(row[0, n0 : n0 + n1], rows[1, :n1], atol=2e-4, rtol=1e-4)


def test_packing_is_refused_where_examples_would_mix():
    with pytest.raises(ConfigError, match="lm.packing.*prompt"):
        RunConfig.from_run_config(TINY_LLM | {"lm.packing": True, "peft.method": "prompt"})
    with pytest.raises(ConfigError, match="lm.packing.*DP-SGD"):
        RunConfig.from_run_config(TINY_LLM | {"lm.packing": True, "dp.mode": "local"})
    with pytest.raises(ConfigError, match="lm.packing.*causal-lm"):
        RunConfig.from_run_config({"lm.packing": True})


def test_batched_left_padded_generation_answers_as_one_by_one(cfg, tokenizer):
    model = task_model(cfg, TASK)
    prompts = [
        torch.tensor(f.prompt)
        for f in format_examples(
            tokenizer,
            [
                user_prompt("What is the capital of France?"),
                user_prompt("Name a colour of the sky on a clear day."),
            ],
            ["Paris.", "Blue."],
            64,
            chat=True,
        )
    ]
    assert len(prompts[0]) != len(prompts[1])
    together = generate(model.module, tokenizer, prompts, 2, 6)
    assert together == [generate(model.module, tokenizer, [p], 1, 6)[0] for p in prompts]
    assert all(isinstance(a, str) and a for a in together)


def test_generation_reuses_keys_and_values(cfg, tokenizer):
    """After the prompt, every generation step feeds the model one new token (the cache
    holds the rest)."""
    model = task_model(cfg, TASK)
    (example,) = format_examples(tokenizer, [user_prompt("Name a colour.")], ["Blue."], 64, chat=True)
    widths: list[int] = []
    embed = model.module.get_input_embeddings()
    handle = embed.register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    try:
        generate(model.module, tokenizer, [torch.tensor(example.prompt)], 1, 5)
    finally:
        handle.remove()
    assert widths[0] == len(example.prompt) and len(widths) > 1 and set(widths[1:]) == {1}


def test_answered_examples_are_scored_on_their_answers_cache(cfg):
    """Scoring the references on the cache of the greedy answers gives the loss and hits
    that scoring the example rows gives, and the answers generate() gives."""
    model = task_model(cfg, TASK)
    test = TASK.server_test_set(cfg)
    rows = range(len(test.prompts))
    shared = _Tally()
    answers = answer_and_score(model, test, rows, shared)
    alone = _Tally()
    for inputs, targets in test.batches(torch.tensor(list(rows)), len(rows), model.device):
        with torch.no_grad():
            alone.add(*score(model.module, inputs, targets))
    assert shared.tokens == alone.tokens and shared.correct == alone.correct
    assert math.isclose(shared.nll, alone.nll, rel_tol=1e-5)
    assert answers == generate(model.module, model.tokenizer, test.prompts, 2, test.max_new_tokens)


@pytest.mark.parametrize(
    ("answer", "reference", "same"),
    [("Sports.", "sports", True), ("  tech\nmore text", "tech", True), ('"Politics"', "politics", True),
     ("business news", "business", False)],
)  # fmt: skip
def test_exact_match_compares_the_first_line_case_and_end_punctuation_aside(answer, reference, same):
    assert (normalize(answer) == normalize(reference)) is same


def test_training_lowers_the_response_loss(cfg):
    model = task_model(cfg, TASK)
    start = model.exchange_state()
    try:
        data = TASK.client_train_set(cfg, 0, cfg.num_clients)
        test = TASK.server_test_set(cfg)
        before = TASK.evaluate(model, test, 16)
        train_local(model, data, TrainConfig(batch_size=4, max_steps=6, learning_rate=3e-3), 0, task=TASK)
        after = TASK.evaluate(model, test, 16)
    finally:
        model.load_exchange_state(start)
    assert after.metrics["perplexity"] < before.metrics["perplexity"]
    assert set(after.metrics) == {"perplexity", "token_accuracy", "exact_match", "accuracy"}
    assert after.metrics["accuracy"] == after.metrics["exact_match"]


def test_federated_instruction_tuning_through_the_apps(tmp_path, capsys):
    """2 clients, a round of LoRA with ComPEFT both ways, in process through the real apps;
    the saved adapter loads with peft onto the packaged model and generates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedpeft.apps import client_app
    from fedpeft.apps.server_app import run_server
    from fedpeft.models.backbone import resolve_model_path
    from fedpeft.results.records import read_rounds
    from fedpeft.running.inprocess import DirectGrid

    overrides = TINY_LLM | {
        "num-clients": 2,
        "num-rounds": 1,
        "codec.name": "compeft",
        "codec.downlink": "compeft",
        "results-dir": str(tmp_path),
        "run-name": "llm",
    }
    run_cfg = RunConfig.from_run_config(overrides)
    run_dir = run_server(DirectGrid(client_app.app, 2, run_cfg.to_run_config()), run_cfg)
    rounds = read_rounds(run_dir)
    assert [r["num_replied"] for r in rounds[1:]] == [2]
    for r in rounds:
        assert set(r["metrics"]) == {"perplexity", "token_accuracy", "exact_match"}
        assert r["accuracy"] == r["metrics"]["exact_match"]
        assert math.isfinite(r["metrics"]["perplexity"])
    # 460,800 LoRA values at 10% density travel as a few kB, not 1.8 MB of float32.
    assert all(c["payload_up"] < 100_000 for r in rounds[1:] for c in r["clients"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert len(lines) == 2 and all(" | ppl " in line and " | em " in line for line in lines)

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"))
    tuned = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    tokenizer = load_tokenizer("smollm2-135m")
    prompt = tokenizer("### Instruction:\nSay hi.\n\n### Response:\n", return_tensors="pt")
    out = tuned.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # fedpeft's own loader rebuilds the causal LM with the final tensors.
    from fedpeft.models import load_saved

    saved = load_saved(run_dir / "adapter")
    assert saved.kind == "causal-lm" and saved.num_trainable == 460_800


def test_the_task_keeps_the_contract_with_packed_rows(tmp_path):
    """Short chat examples from a local file, several per row."""
    import json

    from fedpeft.tasks.conformance import check_task

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add {i} and 1."},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(60)
    ]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = TINY_LLM | {"data.dataset": str(path), "model.max-length": 96}
    cfg = RunConfig.from_run_config(plain | {"lm.packing": True})
    check_task(TASK, cfg)
    packed = TASK.client_train_set(cfg, 0, cfg.num_clients)
    unpacked = TASK.client_train_set(RunConfig.from_run_config(plain), 0, cfg.num_clients)
    assert packed.position_ids is not None and len(packed) < len(unpacked) / 2
