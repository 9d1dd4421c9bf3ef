"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models
with Heterogeneous Low-Rank Adaptations").

Averaging LoRA factors separately is not averaging updates (``mean(B) @ mean(A) !=
mean(B @ A)``).  FLoRA *stacks* instead: ``[w_1 s_1 B_1, ..., w_K s_K B_K] @ [A_1; ...; A_K]
= sum_k w_k s_k B_k @ A_k`` exactly, whatever each client's rank.  The stacked update is
merged into the frozen base weights and every client restarts from a fresh adapter.

On the wire (the *merged form*): per LoRA module ``M``, ``M.base_delta.A`` [R, in] and
``M.base_delta.B`` [out, R] whose product ``B @ A`` is the accumulated global update of
``M``'s base weight (scale folded in) -- or that product itself as ``M.base_delta.W``
once it is the smaller of the two -- plus the ordinary tensors; no ``lora_A``/``lora_B``.
A client adds ``B @ A`` to its pretrained base weight and resets its own adapter to its
seeded init (B = 0), so its reply's ``s_k B_k @ A_k`` is exactly its round update.

* ``configure_train`` converts factor-form arrays (the server template in round 1) to
  merged form, exactly (``base_delta.A = A``, ``base_delta.B = s * B``; the template's
  ``B = 0`` gives a zero update), keeps them as :attr:`FLoRA.current_global`, and sends
  the same merged arrays to every sampled node.
* ``aggregate_train`` stacks the previous merged factors with the round's weighted,
  scaled client factors (``p_k`` the num-examples weights), so the new merged product is
  ``previous + sum_k p_k s_k B_k @ A_k`` exactly; ordinary tensors (the classifier head)
  are FedAvg's weighted mean.  Components that are exactly zero are dropped, and once
  the stacked rank ``R`` reaches ``R (in + out) >= in * out`` the module is sent as one
  dense matrix ``M.base_delta.W`` [out, in] instead (exact, and never larger than the
  factors), which later rounds stack onto as ``(W, I)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Unpack

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from strategies.arrays import Tensors, dict_to_record, record_to_dict
from strategies.fedavg_kwargs import FedAvgKwargs, forwards_fedavg_kwargs
from strategies.functional import checked_updates
from strategies.lora_exact import (
    LoraLayoutError,
    base_a_key,
    base_b_key,
    base_w_key,
    drop_zero_components,
    factors_of,
    lora_modules,
    merged_modules,
    merged_of,
    ordinary_keys,
    scaling,
    stack_factors,
    weighted_mean,
)
from strategies.traits import StrategyTraits


class FLoRA(FedAvg):
    """FedAvg sampling with exact stacking aggregation of (heterogeneous-rank) LoRA updates.

    Parameters
    ----------
    lora_alpha : float
        peft's ``lora_alpha``: a rank-``r`` client's update is ``lora_alpha / r * B @ A``.
    The other parameters are FedAvg's.

    Attributes
    ----------
    current_global : dict[str, np.ndarray] | None
        The strategy's state: the global model in merged form as last sent by
        ``configure_train`` (None before the first round).  ``aggregate_train`` stacks
        the round's client updates onto it.
    """

    # Replies are factors while the downlink is merged: wrappers that take reply - sent cannot apply.
    traits = StrategyTraits(heterogeneous_ranks=True, rewrites_arrays=True, conformance={"lora": "merged"})

    @forwards_fedavg_kwargs
    def __init__(
        self,
        *,
        lora_alpha: float = 16.0,
        **fedavg_kwargs: Unpack[FedAvgKwargs],
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}")
        self.lora_alpha = float(lora_alpha)
        self.current_global: Tensors | None = None

    # ------------------------------------------------------------------ downlink
    def to_merged(self, tensors: Tensors) -> Tensors:
        """``tensors`` in merged form (factor form converted exactly; merged form as it is)."""
        factor, merged = lora_modules(tensors), merged_modules(tensors)
        if factor and merged:
            raise LoraLayoutError("flora: arrays mix lora_A/lora_B factors and base_delta (merged) factors")
        if not factor and not merged:
            raise LoraLayoutError("flora: the global arrays hold no LoRA modules (lora_A/lora_B pairs)")
        if merged:
            return dict(tensors)
        out = {k: tensors[k] for k in ordinary_keys(tensors)}
        for m in factor:
            b, a = factors_of(tensors, m)
            s = scaling(self.lora_alpha, a.shape[0])
            out[base_b_key(m)] = (s * np.asarray(b, np.float64)).astype(np.float32)
            out[base_a_key(m)] = np.asarray(a, np.float32)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; every node gets the merged form, which becomes :attr:`current_global`."""
        tensors = record_to_dict(arrays)
        merged = self.to_merged(tensors)
        self.current_global = merged
        record = arrays if merged.keys() == tensors.keys() else dict_to_record(merged)
        return super().configure_train(server_round, record, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; the global model in merged form."""
        tensors = record_to_dict(arrays)
        merged = self.to_merged(tensors)
        record = arrays if merged.keys() == tensors.keys() else dict_to_record(merged)
        return super().configure_evaluate(server_round, record, config, grid)

    # ------------------------------------------------------------------ uplink
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stack the replies onto :attr:`current_global`; return the new merged form."""
        if (checked := checked_updates(replies, self.weighted_by_key)) is None:
            return None, None
        if self.current_global is None:
            raise AggregationError(
                "flora: no global model yet; configure_train must run before aggregate_train"
            )
        valid, updates, weights = checked
        try:
            tensors = self.aggregate(self.current_global, updates, weights)
        except (ValueError, KeyError) as err:
            raise AggregationError(f"flora: cannot aggregate the replies: {err}") from err
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return dict_to_record(tensors), metrics

    def aggregate(self, previous: Tensors, updates: list[Tensors], weights: list[float]) -> Tensors:
        """The aggregation on tensor dicts (in a fixed client order): the new merged form."""
        modules = merged_modules(previous)
        for u in updates:
            got = lora_modules(u)
            if merged_modules(u):
                raise LoraLayoutError(
                    "a reply carries base_delta (merged-form) tensors; clients send lora_A/lora_B"
                )
            if got != modules:
                raise LoraLayoutError(
                    f"a reply's LoRA modules {got} differ from the global model's {modules}"
                )
        total = float(sum(weights))
        p = [w / total for w in weights]
        out: Tensors = {}
        for k in ordinary_keys(updates[0]):
            out[k] = weighted_mean([u[k] for u in updates], weights).astype(np.float32)
        for m in modules:
            b_prev, a_prev = merged_of(previous, m)
            triples = [(b_prev, a_prev, 1.0)]
            for u in updates:
                b, a = factors_of(u, m)
                triples.append((b, a, scaling(self.lora_alpha, a.shape[0])))
            b_new, a_new = stack_factors(triples, [1.0, *p])
            b_new, a_new = drop_zero_components(b_new, a_new)
            (out_dim, rank), in_dim = b_new.shape, a_new.shape[1]
            if rank * (in_dim + out_dim) >= in_dim * out_dim:
                # Factors would outweigh the matrix: send it dense (exact, and never larger).
                dense = np.asarray(b_new, np.float64) @ np.asarray(a_new, np.float64)
                out[base_w_key(m)] = dense.astype(np.float32)
                continue
            out[base_b_key(m)] = b_new.astype(np.float32)
            out[base_a_key(m)] = a_new.astype(np.float32)
        return out
