"""Every registered strategy against the conformance suite, and the suite against known-bad strategies."""

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from strategies import STRATEGIES, FlexLoRA, FLoRA
from strategies.conformance import PROPERTIES, Subject, Traits, check, main, run_conformance
from strategies.functional import dict_to_record, record_to_dict
from strategies.traits import StrategyTraits


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_registered_strategy_conforms(name, prop):
    outcome = check(name, prop)
    if outcome.status == "skip":
        pytest.skip(outcome.detail)
    assert outcome.status == "pass", outcome.detail


def test_the_lora_strategies_are_checked_not_skipped():
    for name, props in {
        "flexlora": list(PROPERTIES),
        "flora": list(PROPERTIES),
        "ffa-lora": ["lora-product", "weights", "identical-updates"],
    }.items():
        outcomes = {o.prop: o.status for o in run_conformance(name)}
        assert all(outcomes[p] == "pass" for p in props), (name, outcomes)


# ---------------------------------------------------------------------- the suite catches bugs
class ArrivalOrder(FedAvg):
    """Keeps the first reply as it arrived: order-dependent."""

    traits = StrategyTraits(conformance={"kind": "robust", "weighted": False})

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies[:1])
        return arrays, metrics


class Unweighted(FedAvg):
    """Plain mean that ignores num-examples but does not say so."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for r in replies:
            r.content["metrics"]["num-examples"] = 1
        return super().aggregate_train(server_round, replies)


class ClaimsHeterogeneous(FedAvg):
    traits = StrategyTraits(heterogeneous_ranks=True)


class UnscaledFlexLoRA(FlexLoRA):
    """Truncates for a smaller rank without the sqrt(s_R / s_r) rescaling."""

    def _truncated(self, canonical, ordinary, rank):
        out = dict(ordinary)
        for m, (b, a, _) in canonical.items():
            out[m + ".lora_B.weight"] = np.asarray(b[:, :rank], np.float32)
            out[m + ".lora_A.weight"] = np.asarray(a[:rank], np.float32)
        return out


class FactorAverage(FedAvg):
    """FedAvg claiming LoRA-exact products (true only when A is shared)."""

    traits = StrategyTraits(conformance={"lora": "product"})


class TransposedDenseFLoRA(FLoRA):
    """Sends a dense merged module as W.T ([in, out] instead of [out, in])."""

    def aggregate(self, previous, updates, weights):
        out = super().aggregate(previous, updates, weights)
        return {k: v.T.copy() if k.endswith(".base_delta.W") else v for k, v in out.items()}


class DenseAndFactorsFLoRA(FLoRA):
    """Sends a dense module's W and also (stale) base_delta.A/B for it."""

    def aggregate(self, previous, updates, weights):
        out = super().aggregate(previous, updates, weights)
        for k in [k for k in out if k.endswith(".base_delta.W")]:
            m = k.removesuffix(".base_delta.W")
            out[m + ".base_delta.B"], out[m + ".base_delta.A"] = (
                out[k],
                np.eye(out[k].shape[1], dtype=np.float32),
            )
        return out


class ArrivalOrderFlexLoRA(FlexLoRA):
    """Stacks the replies in arrival order instead of node-id order."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        updates = [record_to_dict(m.content["arrays"]) for m in replies]
        weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
        return dict_to_record(self.aggregate(updates, weights)), None


@pytest.mark.parametrize(
    ("factory", "prop"),
    [
        (ArrivalOrder, "client-order"),
        (Unweighted, "weights"),
        (ClaimsHeterogeneous, "heterogeneous-ranks"),
        (UnscaledFlexLoRA, "heterogeneous-ranks"),
        (FactorAverage, "lora-product-beyond-rank"),
        (ArrivalOrderFlexLoRA, "client-order"),
        (TransposedDenseFLoRA, "keys-and-shapes"),
        (DenseAndFactorsFLoRA, "keys-and-shapes"),
    ],
)
def test_the_suite_catches_a_broken_strategy(factory, prop):
    outcome = check(factory, prop)
    assert outcome.status == "fail", outcome


def test_flexlora_without_its_truncation_trait_fails_beyond_rank():
    subject = Subject("flexlora", "flexlora", Traits(lora="product", heterogeneous_ranks=True))
    assert check(subject, "lora-product").status == "pass"  # fits in rank R: exact
    assert check(subject, "lora-product-beyond-rank").status == "fail"


def test_bad_declared_traits_are_reported():
    class Odd(FedAvg):
        traits = StrategyTraits(conformance={"kind": "mode"})

    with pytest.raises(ValueError, match="kind='mode'"):
        Subject.of(Odd)


def test_cli_reports_and_exits_nonzero_on_failure(capsys):
    assert main(["flora", "-p", "lora-product"]) == 0
    assert "PASS  lora-product" in capsys.readouterr().out
    assert main(["tests.unit.strategies.test_conformance:Unweighted"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  weights" in out and "1 failure(s)" in out
    assert main(["nosuchmodule:Thing"]) == 1
