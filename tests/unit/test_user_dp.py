"""User-level DP on the server: Poisson client sampling, the fixed-denominator estimator,
DP-FTRL's tree aggregation, and whole runs whose reported epsilon is the accountant's."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import RDPAccountant

from fedpeft.apps import client_app
from fedpeft.apps.server_app import run_server
from fedpeft.config import ConfigError, RunConfig
from fedpeft.privacy import UserLevel
from fedpeft.privacy.mechanisms import CENTRAL_MECHANISMS
from fedpeft.results.records import read_rounds
from fedpeft.running.inprocess import DirectGrid
from fedpeft.server.ftrl import TreeAggregation, tree_nodes
from fedpeft.server.sampling import PoissonSampling, poisson_cohort
from fedpeft.server.user_dp import FixedDenominator, central_noise
from strategies.conformance import ToyGrid, make_reply
from tests.conftest import TINY

GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _record(arrays):
    return ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})


def _every_node():
    return FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)


def test_the_configs_choices_are_the_mechanism_registry():
    from fedpeft.privacy.settings import DPConfig

    names = DPConfig.__dataclass_fields__["central_mechanism"].metadata["registry"]()
    assert set(names) == set(CENTRAL_MECHANISMS) == {"gaussian", "tree"}
    for mechanism in CENTRAL_MECHANISMS.values():
        assert callable(mechanism.builder())  # every built-in builder resolves


def test_poisson_cohorts_are_seeded_per_round_and_have_the_expected_size():
    nodes = list(range(1000))
    assert poisson_cohort(nodes, 0.05, 7, 3) == poisson_cohort(nodes, 0.05, 7, 3)
    assert poisson_cohort(nodes, 0.05, 7, 3) != poisson_cohort(nodes, 0.05, 7, 4)
    sizes = [len(poisson_cohort(nodes, 0.05, 0, r)) for r in range(1, 201)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.03)
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.05 * 0.95), rel=0.15)  # binomial spread


def test_poisson_sampling_sends_exactly_the_drawn_cohort_and_nothing_when_it_is_empty():
    nodes = list(range(1, 41))
    sampler = PoissonSampling(_every_node(), 0.25, seed=1)
    msgs = list(sampler.configure_train(2, _record(GLOBAL), ConfigRecord(), ToyGrid(nodes)))
    assert sorted(m.metadata.dst_node_id for m in msgs) == poisson_cohort(nodes, 0.25, 1, 2)
    assert sampler.cohorts[2] == len(msgs)
    empty = PoissonSampling(_every_node(), 1e-9, seed=1)
    assert list(empty.configure_train(1, _record(GLOBAL), ConfigRecord(), ToyGrid(nodes))) == []


def test_fixed_denominator_weighs_clients_equally_and_divides_by_the_expected_cohort():
    wrapper = FixedDenominator(_every_node(), denominator=5)
    list(wrapper.configure_train(1, _record(GLOBAL), ConfigRecord(), ToyGrid([1, 2, 3])))
    deltas = [np.full((4, 3), 1.0), np.full((4, 3), 2.0), np.full((4, 3), 6.0)]
    replies = [
        make_reply(n, {"w": d, "b": np.zeros(3)}, num_examples)
        for n, d, num_examples in zip([1, 2, 3], deltas, [1, 10, 100], strict=True)
    ]
    arrays, _ = wrapper.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), sum(deltas) / 5, rtol=1e-6)  # not weighted by examples


def test_tree_decomposition_covers_each_prefix_once_within_the_charged_depth():
    leaves = 13
    for t in range(1, leaves + 1):
        covered = sorted(
            leaf for level, index in tree_nodes(t) for leaf in range(index << level, (index + 1) << level)
        )
        assert covered == list(range(t))
    used_by_leaf: dict[int, set] = {}
    for t in range(1, leaves + 1):
        for level, index in tree_nodes(t):
            for leaf in range(index << level, (index + 1) << level):
                used_by_leaf.setdefault(leaf, set()).add((level, index))
    assert max(len(n) for n in used_by_leaf.values()) <= math.ceil(math.log2(leaves + 1))


def _tree(noise, restart=4, cohort=2):
    return TreeAggregation(
        _every_node(),
        noise_multiplier=noise,
        clipping_norm=1.0,
        cohort=cohort,
        restart_rounds=restart,
        seed=3,
    )


def _tree_round(tree, server_round, arrays, nodes, step):
    msgs = list(tree.configure_train(server_round, _record(arrays), ConfigRecord(), ToyGrid(nodes)))
    chosen = [m.metadata.dst_node_id for m in msgs]
    replies = [make_reply(n, {k: v + step for k, v in arrays.items()}, 1) for n in chosen]
    out, _ = tree.aggregate_train(server_round, replies)
    return {k: v.numpy() for k, v in out.items()}, chosen


def test_tree_without_noise_is_fedavg_of_clipped_updates_and_clients_join_once_per_tree():
    tree = _tree(0.0)
    nodes = list(range(1, 9))
    arrays, seen = dict(GLOBAL), []
    for r in range(1, 5):
        arrays, chosen = _tree_round(tree, r, arrays, nodes, step=1.0)
        seen += chosen
        # each update has norm sqrt(15) > 1: clipped to 1, so every round moves by 1/sqrt(15)
        np.testing.assert_allclose(arrays["w"], r / math.sqrt(15), rtol=1e-5)
    assert sorted(seen) == nodes  # 4 rounds x 2 clients: every client exactly once in the tree
    _, chosen = _tree_round(tree, 5, arrays, nodes, step=1.0)  # a new tree may pick anyone again
    assert len(chosen) == 2


def test_tree_noise_is_shared_by_the_prefixes_that_share_a_node():
    quiet, noisy = _tree(0.0), _tree(1.0)
    nodes = list(range(1, 9))
    a, b, noise = dict(GLOBAL), dict(GLOBAL), {}
    for r in range(1, 4):
        a, _ = _tree_round(quiet, r, a, nodes, step=0.01)
        b, _ = _tree_round(noisy, r, b, nodes, step=0.01)
        noise[r] = b["w"] - a["w"]
    assert np.std(noise[1]) == pytest.approx(0.5, rel=0.6)  # noise * clip / cohort
    # prefix 3 = node (1, 0) [leaves 1-2, the noise of prefix 2] + node (0, 2): it contains prefix 2's noise
    assert not np.allclose(noise[1], noise[2])
    residual = noise[3] - noise[2]
    assert abs(np.corrcoef(residual.ravel(), noise[2].ravel())[0, 1]) < 0.9


def _run(tmp_path, name, **extra):
    cfg = RunConfig.from_run_config(TINY | extra | {"results-dir": str(tmp_path), "run-name": name})
    grid = DirectGrid(client_app.app, cfg.num_clients, cfg.to_run_config())
    return cfg, read_rounds(run_server(grid, cfg))


def test_poisson_central_dp_reports_the_opacus_epsilon_of_its_history(tmp_path):
    cfg, rounds = _run(
        tmp_path,
        "poisson",
        **{
            "num-clients": 6,
            "num-rounds": 3,
            "fraction-train": 0.5,
            "client-sampling": "poisson",
            "train.max-steps": 1,
            "dp.mode": "central",
            "dp.central-target-epsilon": 6.0,
            "dp.delta": 1e-3,
        },
    )
    noise = central_noise(cfg)
    reference = RDPAccountant()
    for r in rounds[1:]:
        reference.step(noise_multiplier=noise, sample_rate=0.5)
        assert r["central_epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-9)
    assert rounds[-1]["central_epsilon"] == pytest.approx(6.0, abs=0.05)
    for r in rounds[1:]:  # the cohorts are the seeded draws over the partitions
        assert sorted(c["partition_id"] for c in r["clients"]) == poisson_cohort(range(6), 0.5, 0, r["round"])


def test_dp_ftrl_run_accounts_its_trees(tmp_path):
    _, rounds = _run(
        tmp_path,
        "ftrl",
        **{
            "num-clients": 4,
            "num-rounds": 3,
            "min-train-clients": 2,
            "fraction-train": 0.5,
            "train.max-steps": 1,
            "dp.mode": "central",
            "dp.central-mechanism": "tree",
            "dp.tree-restart-rounds": 2,
            "dp.central-noise-multiplier": 2.0,
        },
    )
    tree = UserLevel("tree", "fixed", 4, 2, restart_rounds=2)
    assert [r["central_epsilon"] for r in rounds[1:]] == pytest.approx(
        [tree.epsilon(2.0, n, 1e-5) for n in (1, 2, 3)]
    )
    first_tree = [c["partition_id"] for r in rounds[1:3] for c in r["clients"]]
    assert sorted(first_tree) == [0, 1, 2, 3]  # each client once in the tree
    assert all(math.isfinite(r["accuracy"]) for r in rounds)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (
            {"dp.mode": "central", "dp.central-mechanism": "tree", "client-sampling": "poisson"},
            "client-sampling",
        ),
        ({"dp.mode": "central", "dp.central-mechanism": "tree", "strategy.name": "fedprox"}, "fedavg"),
        (
            {"dp.mode": "central", "dp.central-mechanism": "tree", "dp.central-clipping": "adaptive"},
            "central-side",
        ),
        ({"dp.mode": "central", "dp.central-mechanism": "tree", "num-rounds": 3}, "tree-restart-rounds"),
        ({"dp.central-target-epsilon": 3.0}, "dp.mode"),
        ({"client-sampling": "uniform"}, "fixed, poisson"),
    ],
)
def test_impossible_user_level_settings_name_the_key(extra, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config(TINY | extra)
