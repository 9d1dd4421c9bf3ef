"""User-level accounting: each sampling and mechanism against the library that defines its
bound (Opacus for Poisson, Google's dp-accounting for sampling without replacement and tree
aggregation), and the noise calibrated to a target epsilon."""

import math

import pytest
from dp_accounting import (
    GaussianDpEvent,
    NeighboringRelation,
    SampledWithoutReplacementDpEvent,
    SelfComposedDpEvent,
    SingleEpochTreeAggregationDpEvent,
)
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpeft.privacy import UserLevel

POISSON = UserLevel("gaussian", "poisson", population=1000, cohort=50)


@pytest.mark.parametrize(("name", "cls"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_poisson_epsilon_equals_opacus_fed_the_same_rounds(name, cls):
    reference = cls()
    for _ in range(40):
        reference.step(noise_multiplier=0.8, sample_rate=0.05)
    assert POISSON.epsilon(0.8, 40, 1e-3, name) == pytest.approx(reference.get_epsilon(delta=1e-3), rel=1e-9)


def test_everyone_every_round_is_the_gaussian_mechanism_without_amplification():
    reference = RDPAccountant()
    for _ in range(5):
        reference.step(noise_multiplier=1.0, sample_rate=1.0)
    everyone = UserLevel("gaussian", "fixed", population=10, cohort=10)
    assert everyone.epsilon(1.0, 5, 1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_fixed_size_sampling_is_accounted_without_replacement_and_conservatively():
    fixed = UserLevel("gaussian", "fixed", population=1000, cohort=50)
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # replace-one: one user moves the clipped sum by 2C, so the accountant gets noise / 2
    acc.compose(SelfComposedDpEvent(SampledWithoutReplacementDpEvent(1000, 50, GaussianDpEvent(0.6)), 30))
    assert fixed.epsilon(1.2, 30, 1e-3) == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9)
    # never below the Poisson bound at the same rate, and amplification still helps
    assert fixed.epsilon(1.2, 30, 1e-3) > POISSON.epsilon(1.2, 30, 1e-3)
    assert (
        fixed.epsilon(1.2, 30, 1e-3)
        < UserLevel("gaussian", "fixed", 1000, 1000).epsilon(0.6, 30, 1e-3) * 1.01
    )


def test_tree_aggregation_composes_one_tree_per_restart():
    tree = UserLevel("tree", "fixed", population=1000, cohort=50, restart_rounds=20)
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(SelfComposedDpEvent(SingleEpochTreeAggregationDpEvent(2.0, 20), 2))  # rounds 21-30: 2nd tree
    assert tree.epsilon(2.0, 30, 1e-3) == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9)
    # a started tree is charged in full: the same epsilon for every round of it
    assert tree.epsilon(2.0, 1, 1e-3) == tree.epsilon(2.0, 20, 1e-3) < tree.epsilon(2.0, 21, 1e-3)
    assert tree.epsilon(4.0, 30, 1e-3) < tree.epsilon(2.0, 30, 1e-3)


@pytest.mark.parametrize(
    "level",
    [
        POISSON,
        UserLevel("gaussian", "fixed", 1000, 50),
        UserLevel("tree", "fixed", 1000, 50, restart_rounds=10),
    ],
)
def test_noise_for_a_target_spends_it(level):
    noise = level.noise_for(4.0, 30, 1e-3)
    assert level.epsilon(noise, 30, 1e-3) <= 4.0
    assert level.epsilon(noise * 0.995, 30, 1e-3) > 4.0 * 0.99


def test_edges():
    assert POISSON.epsilon(1.0, 0, 1e-3) == 0.0
    assert math.isinf(POISSON.epsilon(0.0, 3, 1e-3))
    assert POISSON.rate == 0.05 and POISSON.history(1.0, 3) == [(1.0, 0.05, 3)]
