"""FlexLoRA's per-node ranks, FLoRA's exact accumulation and size bound, FFA-LoRA's refusals."""

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.exception import AggregationError

from strategies import FFALoRA, FlexLoRA, FLoRA
from strategies import lora_exact as lx
from strategies.conformance import (
    ALPHA,
    MODULES,
    NODES,
    RANK,
    ToyGrid,
    Traits,
    effective,
    make_reply,
    toy_client,
    toy_global,
)
from strategies.functional import dict_to_record, record_to_dict
from strategies.traits import UsesClientRanks, hand_client_ranks

FACTORS = Traits(lora="product")
SETTINGS = {"min_train_nodes": 4, "min_available_nodes": 4, "min_evaluate_nodes": 4, "lora_alpha": ALPHA}
Q = "encoder.layer.0.attention.self.query"


def _configure(strategy, tensors, server_round=1):
    grid = ToyGrid(NODES)
    return list(strategy.configure_train(server_round, dict_to_record(tensors), ConfigRecord(), grid))


def _sent(msg):
    return record_to_dict(msg.content["arrays"])


def _best(matrix, rank):
    b, a = lx.svd_refactor(matrix, rank)
    return b @ a


# ---------------------------------------------------------------------- FlexLoRA
def test_flexlora_sends_each_node_its_own_rank_handed_over_at_discovery():
    ranks = {11: 1, 7: 2}
    s = FlexLoRA(**SETTINGS)
    assert isinstance(s, UsesClientRanks)
    hand_client_ranks(s, ranks)  # after construction, as the server wing does at discovery
    global_, _ = toy_global(FACTORS, trained=True)
    messages = _configure(s, global_)
    assert len({id(m.content) for m in messages}) == len({id(m.content["arrays"]) for m in messages}) == 4
    for msg in messages:
        node, sent = msg.metadata.dst_node_id, _sent(msg)
        r = ranks.get(node, RANK)
        for m, (i, o) in MODULES.items():
            assert sent[m + lx.LORA_A].shape == (r, i) and sent[m + lx.LORA_B].shape == (o, r)
            got = lx.product(sent[m + lx.LORA_B], sent[m + lx.LORA_A], ALPHA / r)
            full = lx.product(global_[m + lx.LORA_B], global_[m + lx.LORA_A], ALPHA / RANK)
            np.testing.assert_allclose(got, _best(full, r), atol=1e-5)
        np.testing.assert_array_equal(sent["classifier.weight"], global_["classifier.weight"])
    assert s.max_ranks == dict.fromkeys(MODULES, RANK)


def test_flexlora_round_one_sends_the_template_slice_unscaled():
    s = FlexLoRA(**SETTINGS, client_ranks={3: 2})
    global_, _ = toy_global(FACTORS)  # B = 0
    sent = next(_sent(m) for m in _configure(s, global_) if m.metadata.dst_node_id == 3)
    np.testing.assert_array_equal(sent[Q + lx.LORA_A], global_[Q + lx.LORA_A][:2])
    assert not sent[Q + lx.LORA_B].any()


def test_flexlora_evaluate_messages_are_per_rank_too():
    s = FlexLoRA(**SETTINGS | {"fraction_evaluate": 1.0}, client_ranks={42: 3})
    global_, _ = toy_global(FACTORS, trained=True)
    messages = s.configure_evaluate(1, dict_to_record(global_), ConfigRecord(), ToyGrid(NODES))
    shapes = {m.metadata.dst_node_id: _sent(m)[Q + lx.LORA_A].shape[0] for m in messages}
    assert shapes == {11: RANK, 7: RANK, 42: 3, 3: RANK}


def test_flexlora_refuses_a_node_above_the_global_rank():
    s = FlexLoRA(**SETTINGS, client_ranks={11: RANK + 1})
    with pytest.raises(lx.LoraLayoutError, match="template must have the largest rank"):
        _configure(s, toy_global(FACTORS, trained=True)[0])


def test_flexlora_aggregate_is_balanced_svd_ordered_at_rank_r():
    s = FlexLoRA(**SETTINGS)
    global_, shared = toy_global(FACTORS)
    _configure(s, global_)
    ranks = dict(zip(NODES, (1, 2, 4, 3), strict=True))
    updates = [toy_client(f"c{n}", FACTORS, global_, shared, rank=ranks[n], share_a=False) for n in NODES]
    weights = [5, 9, 2, 7]
    arrays, _ = s.aggregate_train(
        1, [make_reply(n, u, w) for n, u, w in zip(NODES, updates, weights, strict=True)]
    )
    got = record_to_dict(arrays)
    p = np.asarray(weights) / sum(weights)
    for m in MODULES:
        b, a = got[m + lx.LORA_B], got[m + lx.LORA_A]
        assert a.shape[0] == RANK
        dw = sum(pk * effective(u, FACTORS, shared)[m] for pk, u in zip(p, updates, strict=True))
        np.testing.assert_allclose(lx.product(b, a, ALPHA / RANK), _best(dw, RANK), atol=1e-5)
        col, row = np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1)
        np.testing.assert_allclose(col, row, rtol=1e-4)  # balanced
        assert np.all(np.diff(col) <= 1e-6)  # SVD-ordered
    # Bitwise independent of arrival order (replies are sorted by node id).
    again, _ = s.aggregate_train(
        1, [make_reply(n, u, w) for n, u, w in reversed(list(zip(NODES, updates, weights, strict=True)))]
    )
    assert all(np.array_equal(got[k], record_to_dict(again)[k]) for k in got)


def test_flexlora_without_configure_infers_r_from_the_replies():
    s = FlexLoRA(**SETTINGS)
    global_, shared = toy_global(FACTORS)
    updates = [toy_client(f"c{n}", FACTORS, global_, shared, rank=2, share_a=False) for n in NODES[:2]]
    arrays, _ = s.aggregate_train(1, [make_reply(n, u, 1) for n, u in zip(NODES[:2], updates, strict=True)])
    assert record_to_dict(arrays)[Q + lx.LORA_A].shape[0] == 2


# ---------------------------------------------------------------------- FLoRA
def _flora_round(s, tensors, tag, ranks, server_round):
    messages = _configure(s, tensors, server_round)
    _, shared = toy_global(FACTORS)
    updates = [toy_client(f"{tag}{n}", FACTORS, tensors, shared, rank=ranks[n], share_a=False) for n in NODES]
    weights = [3, 1, 4, 1]
    arrays, _ = s.aggregate_train(
        server_round, [make_reply(n, u, w) for n, u, w in zip(NODES, updates, weights, strict=True)]
    )
    p = np.asarray(weights) / sum(weights)
    step = {
        m: sum(pk * effective(u, FACTORS, shared)[m] for pk, u in zip(p, updates, strict=True))
        for m in MODULES
    }
    return messages, record_to_dict(arrays), step


def _merged_product(tensors, module):
    """``B @ A`` of ``module``'s merged form (``W`` itself when it is sent dense)."""
    return lx.product(*lx.merged_of(tensors, module))


def _rel_err(got, want):
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_flora_accumulates_exactly_over_rounds_in_merged_form():
    s = FLoRA(**SETTINGS)
    global_, _ = toy_global(FACTORS)
    ranks = dict(zip(NODES, (1, 2, 4, 3), strict=True))
    messages, merged, step1 = _flora_round(s, global_, "r1-", ranks, 1)
    sent = _sent(messages[0])
    assert not any(k.endswith((lx.LORA_A, lx.LORA_B)) for k in sent)
    assert len({id(m.content) for m in messages}) == 1  # the same merged arrays for everyone
    assert s.current_global is not None and s.current_global.keys() == sent.keys()
    _, merged2, step2 = _flora_round(s, merged, "r2-", ranks, 2)
    for m in MODULES:
        want = step1[m] + step2[m]
        assert _rel_err(_merged_product(merged2, m), want) <= 1e-5
    assert set(merged2) == set(merged)


# A model whose merged form stays factored for a few rounds: module -> (in, out).  P breaks
# even exactly at R = 4 (4 * (12 + 6) == 12 * 6), V strictly between R = 4 and R = 6.
SMALL = {"p": (12, 6), "v": (10, 10)}
SMALL_NODES = (5, 2)  # two clients of rank 1 each: the stacked rank grows by 2 a round
SMALL_WEIGHTS = (3, 1)


def _small_template():
    rng = np.random.default_rng(7)
    out = {"head": rng.normal(size=(3,))}
    for m, (i, o) in SMALL.items():
        out[m + lx.LORA_A] = rng.uniform(-1, 1, (2, i)) / np.sqrt(i)
        out[m + lx.LORA_B] = np.zeros((o, 2))  # peft's template: a zero update
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _small_round(s, tensors, server_round, rank=1):
    """One round on the SMALL model: (the merged arrays sent, the result, the expected step per module)."""
    (sent,) = {id(m.content): _sent(m) for m in _configure(s, tensors, server_round)}.values()
    rng = np.random.default_rng(100 + server_round)
    updates = [
        {"head": rng.normal(size=(3,)).astype(np.float32)}
        | {m + lx.LORA_A: rng.normal(size=(rank, i)).astype(np.float32) for m, (i, _) in SMALL.items()}
        | {m + lx.LORA_B: rng.normal(size=(o, rank)).astype(np.float32) for m, (_, o) in SMALL.items()}
        for _ in SMALL_NODES
    ]
    replies = [make_reply(n, u, w) for n, u, w in zip(SMALL_NODES, updates, SMALL_WEIGHTS, strict=True)]
    arrays, _ = s.aggregate_train(server_round, replies)
    p = np.asarray(SMALL_WEIGHTS) / sum(SMALL_WEIGHTS)
    step = {
        m: sum(
            pk * lx.product(u[m + lx.LORA_B], u[m + lx.LORA_A], ALPHA / rank)
            for pk, u in zip(p, updates, strict=True)
        )
        for m in SMALL
    }
    return sent, record_to_dict(arrays), step


def _module_keys(tensors, module):
    return {k[len(module) :] for k in tensors if k.startswith(module + ".")}


def test_flora_downlink_never_exceeds_the_smaller_of_factors_and_dense():
    s = FLoRA(**SETTINGS)
    tensors = _small_template()
    stacked = dict.fromkeys(SMALL, 0)  # the template's B = 0 components are dropped
    switched_at = {}
    for rnd in range(1, 6):
        _, tensors, _ = _small_round(s, tensors, rnd)
        for m, (i, o) in SMALL.items():
            # Stacked rank: the previous factors' (or I's, once dense) plus the clients'.
            stacked[m] = (i if m in switched_at else stacked[m]) + len(SMALL_NODES)
            r = stacked[m]
            size = sum(tensors[m + suffix].size for suffix in _module_keys(tensors, m))
            assert size <= min(r * (i + o), i * o), (rnd, m, r, size)
            if r * (i + o) >= i * o:
                assert _module_keys(tensors, m) == {lx.BASE_W}, (rnd, m, r)
                assert tensors[m + lx.BASE_W].shape == (o, i)
                switched_at.setdefault(m, rnd)
            else:
                assert m not in switched_at  # once dense, always dense
                assert _module_keys(tensors, m) == {lx.BASE_A, lx.BASE_B}, (rnd, m, r)
                assert tensors[m + lx.BASE_A].shape == (r, i) and tensors[m + lx.BASE_B].shape == (o, r)
        assert lx.merged_modules(tensors) == sorted(SMALL) and "head" in tensors
    # P switches at its exact break-even (R = 4: 72 floats either way), V past it (R = 6).
    assert switched_at == {"p": 2, "v": 3}


def test_flora_accumulation_stays_exact_across_the_switch_to_dense():
    s = FLoRA(**SETTINGS)
    tensors = _small_template()
    total = {m: np.zeros((o, i)) for m, (i, o) in SMALL.items()}
    forms = {m: [] for m in SMALL}
    for rnd in range(1, 6):
        sent, tensors, step = _small_round(s, tensors, rnd)
        for m in SMALL:
            previous = _merged_product(sent, m)  # round 1: the template's zero update
            got = _merged_product(tensors, m)
            assert _rel_err(got, previous + step[m]) <= 1e-5, (rnd, m)  # this round
            total[m] += step[m]
            assert _rel_err(got, total[m]) <= 1e-5, (rnd, m)  # all rounds so far
            forms[m].append(lx.BASE_W in _module_keys(tensors, m))
    assert forms == {"p": [False, True, True, True, True], "v": [False, False, True, True, True]}


def test_flora_stacks_a_round_onto_a_dense_global():
    s = FLoRA(**SETTINGS)
    rng = np.random.default_rng(11)
    w = {m: rng.normal(size=(o, i)).astype(np.float32) for m, (i, o) in SMALL.items()}
    factored = {  # P dense, V factored: a module may be in either form in the same model
        "p" + lx.BASE_W: w["p"],
        "v" + lx.BASE_B: rng.normal(size=(10, 2)).astype(np.float32),
        "v" + lx.BASE_A: rng.normal(size=(2, 10)).astype(np.float32),
        "head": np.zeros(3, np.float32),
    }
    sent, got, step = _small_round(s, factored, 1)
    assert sent.keys() == factored.keys() and np.array_equal(sent["p" + lx.BASE_W], w["p"])
    assert s.current_global.keys() == factored.keys()
    assert _module_keys(got, "p") == {lx.BASE_W}  # (W, I) stacked: rank 12 + 2, so dense again
    assert _rel_err(_merged_product(got, "p"), w["p"].astype(np.float64) + step["p"]) <= 1e-5
    assert _module_keys(got, "v") == {lx.BASE_A, lx.BASE_B} and got["v" + lx.BASE_A].shape == (4, 10)
    assert _rel_err(_merged_product(got, "v"), _merged_product(factored, "v") + step["v"]) <= 1e-5
    # A reply whose factors do not fit W's [out, in] is refused, not broadcast.
    s.configure_train(2, dict_to_record(got), ConfigRecord(), ToyGrid(NODES))
    bad = (
        {"head": np.zeros(3, np.float32)}
        | {m + lx.LORA_A: np.ones((1, i + 1), np.float32) for m, (i, _) in SMALL.items()}
        | {m + lx.LORA_B: np.ones((o, 1), np.float32) for m, (_, o) in SMALL.items()}
    )
    with pytest.raises(AggregationError, match="disagree"):
        s.aggregate_train(2, [make_reply(5, bad, 1)])


def test_flora_configure_keeps_merged_arrays_as_they_are():
    s = FLoRA(**SETTINGS)
    merged = {Q + lx.BASE_A: np.ones((2, 8), np.float32), Q + lx.BASE_B: np.ones((6, 2), np.float32)}
    _configure(s, merged)
    assert s.current_global.keys() == merged.keys()
    dense = {Q + lx.BASE_W: np.ones((6, 8), np.float32)}
    _configure(s, dense)
    assert s.current_global.keys() == dense.keys()
    with pytest.raises(lx.LoraLayoutError, match="merged form twice"):
        _configure(s, merged | dense)


def test_flora_errors_are_clear():
    s = FLoRA(**SETTINGS)
    global_, shared = toy_global(FACTORS)
    reply = make_reply(11, toy_client("e", FACTORS, global_, shared), 1)
    with pytest.raises(AggregationError, match="configure_train must run"):
        s.aggregate_train(1, [reply])
    _configure(s, global_)
    other = {k: v for k, v in toy_client("e", FACTORS, global_, shared).items() if not k.startswith(Q)}
    with pytest.raises(AggregationError, match="differ from the global model's"):
        s.aggregate_train(1, [make_reply(11, other, 1)])
    with pytest.raises(lx.LoraLayoutError, match="mix"):
        _configure(s, global_ | {Q + lx.BASE_A: np.ones((1, 8)), Q + lx.BASE_B: np.ones((6, 1))})


# ---------------------------------------------------------------------- FFA-LoRA
def test_ffa_lora_refuses_a_factors_with_a_hint():
    s = FFALoRA(**{k: v for k, v in SETTINGS.items() if k != "lora_alpha"})
    global_, shared = toy_global(FACTORS)  # carries lora_A
    with pytest.raises(lx.LoraLayoutError, match="lora.freeze-a"):
        _configure(s, global_)
    b_only, _ = toy_global(Traits(layout="b-only"))
    _configure(s, b_only)
    with pytest.raises(AggregationError, match=r"node 11 carries .*lora_A.*lora\.freeze-a"):
        s.aggregate_train(1, [make_reply(11, toy_client("f", FACTORS, global_, shared), 1)])
