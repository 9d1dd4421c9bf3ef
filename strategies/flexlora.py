"""FlexLoRA (Bai et al., 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources").

Clients may train LoRA at different ranks.  The server averages what the adapters *do*,
not their factors: per LoRA module ``dW = sum_k p_k s_k B_k @ A_k`` (``p_k`` the
num-examples weights, ``s_k = lora_alpha / r_k``), then factors ``dW`` back by SVD.

* ``aggregate_train`` returns, per module, balanced SVD-ordered factors at the global
  rank ``R`` with scale ``s_R``: ``B = U sqrt(S / s_R)``, ``A = sqrt(S / s_R) Vt``, so
  ``s_R B @ A`` is the best rank-``R`` approximation of ``dW`` (exact when ``dW`` has
  rank <= R).  Directions beyond ``dW``'s numerical rank get ``B = 0`` and an orthonormal
  A row, as LoRA's own init (A != 0, B = 0), so they still train.
* ``configure_train`` / ``configure_evaluate`` send each node the truncation of the
  global adapter to that node's rank ``r`` (both factors rescaled by ``sqrt(s_R / s_r)``),
  i.e. the best rank-``r`` approximation of the global update; a node of rank ``r``
  gets a rank-``r`` message, in its own ArrayRecord.
* Ordinary tensors (the classifier head) are FedAvg's weighted mean.

``R`` is read per module from the arrays handed to ``configure_train`` (the server
template, later this strategy's own output).  Round 1: the template's ``B`` is zero, so
its product is zero whatever A holds; each node then gets the template's leading ``r``
rows of A as they are (no rescaling: any rank-``r`` slice of a zero product is exact),
so every client starts from (a slice of) the server's seeded LoRA init.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Unpack

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from strategies.arrays import Tensors, dict_to_record, record_to_dict
from strategies.fedavg_kwargs import FedAvgKwargs, forwards_fedavg_kwargs
from strategies.functional import checked_updates
from strategies.lora_exact import (
    LoraLayoutError,
    factors_of,
    lora_a_key,
    lora_b_key,
    lora_modules,
    ordinary_keys,
    refactor_factors,
    scaling,
    stack_factors,
    truncate_factors,
    weighted_mean,
)
from strategies.traits import StrategyTraits


class FlexLoRA(FedAvg):
    """FedAvg sampling with SVD-based LoRA aggregation across client ranks.

    Parameters
    ----------
    lora_alpha : float
        peft's ``lora_alpha``: a rank-``r`` adapter scales ``B @ A`` by ``lora_alpha / r``.
    client_ranks : Mapping[int, int] | None
        node id -> that node's LoRA rank.  Read at every configure call, so the server
        app may fill it after start-up discovery; a node missing from it gets ``R``.
    The other parameters are FedAvg's.

    Attributes
    ----------
    max_ranks : dict[str, int]
        The global rank ``R`` of each LoRA module, from the last ``configure_train``.
    """

    # Each node gets its own rank's tensors: wrappers that send one global to all cannot apply.
    traits = StrategyTraits(
        heterogeneous_ranks=True, rewrites_arrays=True, conformance={"lora": "product", "truncates": True}
    )

    @forwards_fedavg_kwargs
    def __init__(
        self,
        *,
        lora_alpha: float = 16.0,
        client_ranks: Mapping[int, int] | None = None,
        **fedavg_kwargs: Unpack[FedAvgKwargs],
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha}")
        self.lora_alpha = float(lora_alpha)
        self.client_ranks = dict(client_ranks or {})
        self.max_ranks: dict[str, int] = {}

    def set_client_ranks(self, ranks: Mapping[int, int]) -> None:
        """The ranks the nodes announced at discovery (:class:`strategies.traits.UsesClientRanks`);
        handed over again on every start, so a resumed run has this engine's node ids."""
        self.client_ranks = dict(ranks)

    # ------------------------------------------------------------------ downlink
    def rank_of(self, node_id: int, global_rank: int) -> int:
        """The LoRA rank of ``node_id`` (``global_rank`` when it is not in ``client_ranks``)."""
        if node_id not in self.client_ranks:
            return global_rank
        return int(self.client_ranks[node_id])

    def _per_rank(
        self, tensors: Tensors
    ) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray, float]], Tensors]:
        """Global rank, per-module canonical (B, A, s_R), ordinary tensors."""
        modules = lora_modules(tensors)
        if not modules:
            raise LoraLayoutError("flexlora: the global arrays hold no lora_A/lora_B pairs")
        canonical = {}
        for m in modules:
            b, a = factors_of(tensors, m)
            rank = a.shape[0]
            s = scaling(self.lora_alpha, rank)
            if np.any(b):
                b, a = refactor_factors(s * np.asarray(b, np.float64), a, rank, s, fill_null=True)
            canonical[m] = (b, a, s)
        ranks = {a.shape[0] for _, a, _ in canonical.values()}
        ordinary = {k: tensors[k] for k in ordinary_keys(tensors)}
        return max(ranks), canonical, ordinary

    def arrays_for_rank(self, tensors: Tensors, rank: int) -> Tensors:
        """The global ``tensors`` as a rank-``rank`` node receives them (best rank-``rank`` approximation)."""
        _, canonical, ordinary = self._per_rank(tensors)
        return self._truncated(canonical, ordinary, rank)

    def _truncated(
        self, canonical: dict[str, tuple[np.ndarray, np.ndarray, float]], ordinary: Tensors, rank: int
    ) -> Tensors:
        out = dict(ordinary)
        for m, (b, a, s) in canonical.items():
            big = a.shape[0]
            if rank > big:
                raise LoraLayoutError(
                    f"flexlora: a node of LoRA rank {rank} cannot be served from the global rank {big} "
                    f"of '{m}'; the server template must have the largest rank"
                )
            if np.any(b):
                b_r, a_r = truncate_factors(b, a, rank, s, scaling(self.lora_alpha, rank))
            else:  # zero product (the untrained template): the seeded init as it is
                b_r, a_r = b[:, :rank], a[:rank]
            out[lora_b_key(m)] = np.asarray(b_r, np.float32)
            out[lora_a_key(m)] = np.asarray(a_r, np.float32)
        return out

    def _per_node(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        messages = list(messages)
        if not messages:
            return messages
        global_rank, canonical, ordinary = self._per_rank(record_to_dict(arrays))
        by_rank: dict[int, dict[str, Array]] = {}
        for msg in messages:
            rank = self.rank_of(msg.metadata.dst_node_id, global_rank)
            if rank not in by_rank:
                tensors = self._truncated(canonical, ordinary, rank)
                by_rank[rank] = {k: Array(np.ascontiguousarray(tensors[k])) for k in sorted(tensors)}
            content = RecordDict(dict(msg.content.items()))
            content[self.arrayrecord_key] = ArrayRecord(dict(by_rank[rank]))
            msg.content = content
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; each node gets the global adapter truncated to its rank."""
        tensors = record_to_dict(arrays)
        self.max_ranks = {m: factors_of(tensors, m)[1].shape[0] for m in lora_modules(tensors)}
        return self._per_node(super().configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling; each node gets the global adapter truncated to its rank."""
        return self._per_node(super().configure_evaluate(server_round, arrays, config, grid), arrays)

    # ------------------------------------------------------------------ uplink
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``dW = sum_k p_k s_k B_k A_k`` per module, SVD'd back to rank R; head FedAvg'd."""
        if (checked := checked_updates(replies, self.weighted_by_key)) is None:
            return None, None
        valid, updates, weights = checked
        try:
            tensors = self.aggregate(updates, weights)
        except (ValueError, KeyError) as err:
            raise AggregationError(f"flexlora: cannot aggregate the replies: {err}") from err
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return dict_to_record(tensors), metrics

    def aggregate(self, updates: list[Tensors], weights: list[float]) -> Tensors:
        """The aggregation on tensor dicts (in a fixed client order): factor form at rank R."""
        total = float(sum(weights))
        p = [w / total for w in weights]
        modules = lora_modules(updates[0])
        out: Tensors = {}
        for k in ordinary_keys(updates[0]):
            out[k] = weighted_mean([u[k] for u in updates], weights).astype(np.float32)
        for m in modules:
            triples = []
            for u in updates:
                b, a = factors_of(u, m)
                triples.append((b, a, scaling(self.lora_alpha, a.shape[0])))
            rank = self.max_ranks.get(m) or max(a.shape[0] for _, a, _ in triples)
            s_big = scaling(self.lora_alpha, rank)
            b_stack, a_stack = stack_factors(triples, p)
            b_new, a_new = refactor_factors(b_stack, a_stack, rank, s_big, fill_null=True)
            out[lora_b_key(m)] = b_new.astype(np.float32)
            out[lora_a_key(m)] = a_new.astype(np.float32)
        return out
