"""FFA-LoRA, FlexLoRA and FLoRA through the real ServerApp and ClientApp (in-process grid).

The aggregation maths is checked by the strategy conformance suite; these tests check
the wiring: every node trains at its own rank, gets messages of its own rank (FlexLoRA)
or the merged form (FLoRA), the server evaluates the result, and combinations that
cannot work fail before anything starts.
"""

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.running.launch import preflight

RANKS = "2,4,8"


def _run(overrides):
    cfg = RunConfig.from_run_config(overrides)
    seen = []

    def app(msg, context):
        reply = client_app.app(msg, context)
        seen.append((msg, reply, int(context.node_config["partition-id"])))
        return reply

    run_dir = run_server(DirectGrid(app, cfg.num_clients, cfg.to_run_config()), cfg)
    train = [(m, r, pid) for m, r, pid in seen if m.metadata.message_type == "train"]
    return cfg, read_rounds(run_dir), train, run_dir


def _rank_of(record, suffix):
    shapes = {k: tuple(v.shape) for k, v in record.items() if k.endswith(suffix)}
    assert shapes
    return {s[0] if suffix.endswith("lora_A.weight") else s[1] for s in shapes.values()}


def test_flexlora_serves_every_client_its_own_rank(tiny_overrides):
    _cfg, rounds, train, run_dir = _run(tiny_overrides | {"strategy.name": "flexlora", "lora.ranks": RANKS})
    assert len(rounds) == 3 and all(r["num_replied"] == 3 for r in rounds[1:])
    expected = [2, 4, 8]
    for msg, reply, pid in train:
        sent, got = msg.content.array_records["arrays"], reply.content.array_records["arrays"]
        assert _rank_of(sent, "lora_A.weight") == {expected[pid]}
        assert _rank_of(got, "lora_A.weight") == {expected[pid]}
    # A rank-2 client costs fewer bytes than a rank-8 one, both ways.
    by_pid = {c["partition_id"]: c for c in rounds[2]["clients"]}
    assert by_pid[0]["bytes_down"] < by_pid[1]["bytes_down"] < by_pid[2]["bytes_down"]
    assert by_pid[0]["bytes_up"] < by_pid[2]["bytes_up"]
    # The server model (and the saved adapter) has the largest rank.
    saved = load_file(str(run_dir / "adapter" / "exchanged.safetensors"))
    assert _rank_of(saved, "lora_A.weight") == {8}
    assert rounds[2]["accuracy"] != rounds[0]["accuracy"]


def test_flora_merges_stacked_updates_and_clients_restart_their_adapters(tiny_overrides):
    _cfg, rounds, train, _run_dir = _run(tiny_overrides | {"strategy.name": "flora", "lora.ranks": RANKS})
    assert all(r["num_replied"] == 3 for r in rounds[1:])
    for msg, reply, pid in train:
        sent = msg.content.array_records["arrays"]
        assert not any(".lora_" in k for k in sent)  # merged form down ...
        assert any(k.endswith(".base_delta.A") or k.endswith(".base_delta.W") for k in sent)
        assert _rank_of(reply.content.array_records["arrays"], "lora_A.weight") == {
            [2, 4, 8][pid]
        }  # ... factors up
    round2 = [m.content.array_records["arrays"] for m, _, _ in train[3:]]
    # Round 2's merged update stacks the three clients' round-1 updates: rank 2 + 4 + 8.
    ranks = {v.shape[0] for k, v in round2[0].items() if k.endswith(".base_delta.A")}
    assert ranks == {14}
    assert rounds[2]["accuracy"] != rounds[0]["accuracy"]


def test_ffa_lora_never_sends_a(tiny_overrides):
    cfg, rounds, train, _ = _run(tiny_overrides | {"strategy.name": "ffa-lora"})
    assert cfg.lora.freeze_a and all(r["num_replied"] == 3 for r in rounds[1:])
    for msg, reply, _ in train:
        for record in (msg.content.array_records["arrays"], reply.content.array_records["arrays"]):
            assert not any(".lora_A." in k for k in record) and any(".lora_B." in k for k in record)
    # Half the LoRA bytes of plain LoRA (A and B are the same size at r x 384).
    plain = RunConfig.from_run_config(tiny_overrides)
    assert rounds[1]["clients"][0]["bytes_up"] < 0.6 * _lora_bytes(plain)


def _lora_bytes(cfg):
    return 4 * 2 * 12 * cfg.lora.r * 384


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"lora.ranks": RANKS}, "cannot aggregate"),
        ({"lora.ranks": RANKS, "strategy.name": "fedprox"}, "cannot aggregate"),
        ({"strategy.name": "flora", "codec.name": "compeft"}, "codec"),
        ({"strategy.name": "flexlora", "codec.downlink": "fp16"}, "codec"),
        ({"strategy.name": "flora", "dp.mode": "central"}, "central"),
        ({"strategy.name": "fedprox", "strategy.kwargs": "proximal-muu=0.1"}, "did you mean"),
    ],
)
def test_combinations_that_cannot_work_fail_before_anything_starts(tiny_overrides, overrides, needle):
    cfg = RunConfig.from_run_config(tiny_overrides | overrides)
    with pytest.raises((ConfigError, ValueError), match=needle):
        preflight(cfg)


def test_fedprox_sends_mu_and_the_clients_apply_it(tiny_overrides):
    _, _rounds, train, _ = _run(
        tiny_overrides | {"strategy.name": "fedprox", "strategy.kwargs": "proximal-mu=5.0"}
    )
    assert all(float(m.content.config_records["config"]["proximal-mu"]) == 5.0 for m, _, _ in train)
    _, _plain, plain_train, _ = _run(tiny_overrides | {"run-name": "plain"})

    # Same seeds and data: round 1's updates differ only by the proximal term, which keeps them smaller.
    def spread(pairs):
        out = []
        for msg, reply, _ in pairs[:3]:
            sent, got = msg.content.array_records["arrays"], reply.content.array_records["arrays"]
            out.append(sum(float(np.sum((got[k].numpy() - sent[k].numpy()) ** 2)) for k in got))
        return out

    assert all(p < q for p, q in zip(spread(train), spread(plain_train), strict=True))


@pytest.mark.parametrize(
    ("strategy", "dp"),
    [
        ("flora", {"dp.mode": "local", "dp.noise-multiplier": 0.5}),
        ("flexlora", {"dp.mode": "local", "dp.noise-multiplier": 0.5}),
        ("ffa-lora", {"dp.mode": "central", "dp.central-noise-multiplier": 0.01}),
    ],
)
def test_lora_strategies_compose_with_dp(tiny_overrides, strategy, dp):
    overrides = tiny_overrides | {"strategy.name": strategy, "run-name": strategy} | dp
    if strategy != "ffa-lora":
        overrides["lora.ranks"] = RANKS
    _, rounds, _, _ = _run(overrides)
    assert all(r["num_replied"] == 3 for r in rounds[1:])
    assert rounds[-1]["max_epsilon"] or rounds[-1]["central_epsilon"]
