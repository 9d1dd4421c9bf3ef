"""A causal LM's output layer, applied only where a loss or a metric reads it, in chunks.

A causal LM's forward pass ends with logits over the whole vocabulary at every position:
for SmolLM2 (49,152 tokens) and a batch of 8 x 192 tokens that is a 302 MB float32
tensor, kept for backward with its log-softmax and gradient of the same size, and 64 x 192
at evaluation is 2.4 GB per copy; the output layer is also about a fifth of the model's
compute per token.  Instruction tuning scores only the response tokens, so:

* :func:`hidden_before_output` runs the model with a forward pre-hook on its output layer
  that takes the final hidden states and hands the layer zero positions (the model's own
  forward, whatever the PEFT method does to it: prompt tuning's virtual tokens, prefix
  tuning's keys and values, LoRA's layers, Opacus' per-sample hooks);
* :func:`token_nll` applies the layer to the scored positions only, a chunk of at most
  :data:`CHUNK_BYTES` of logits at a time, and returns each token's negative
  log-likelihood and whether the greedy token was right.  With the layer frozen (every
  PEFT method) the gradient with respect to the hidden states is computed chunk by chunk
  in the forward pass (the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024,
  and of Apple's Cut Cross-Entropy, Wijmans et al. 2025), so backward costs no extra
  matrix product and nothing vocabulary-wide is kept; a trained layer (``full``) is
  recomputed chunk by chunk in backward instead.  Written here because both libraries
  are Triton kernels for CUDA only, and fedpeft must run the same on a CPU.

Exact for a model whose logits *are* its output layer applied to the last hidden states;
:func:`check_output_layer` verifies that once when the model is built (a few tokens) and
only a layer that passed is used this way (:func:`plain_output_layer`); a model that
transforms its logits afterwards (Gemma 2's soft-capping, say) is scored from its full
logits.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Logits held at once per chunk (float32): 64 MB is 341 positions of SmolLM2's vocabulary,
# a matrix product large enough to run at full speed and small beside the activations.
CHUNK_BYTES = 64 * 2**20

# Output layers verified by check_output_layer (weakly held: a dropped model drops its entry).
_PLAIN: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def check_output_layer(model: nn.Module) -> bool:
    """Whether ``model``'s logits equal its output layer applied to the hidden states it
    receives (checked on a few tokens, in eval mode); a layer that passes is used by
    :func:`plain_output_layer`."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, nn.Linear):
        return False
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(1, 6, device=head.weight.device).unsqueeze(0)
        with torch.no_grad():
            full = model(input_ids=ids).logits.float()
            with hidden_before_output(model, head) as seen:
                model(input_ids=ids)
            direct = head(seen[0]).float()
    finally:
        model.train(was_training)
    plain = full.shape == direct.shape and torch.allclose(full, direct, rtol=1e-3, atol=1e-3)
    if plain:
        _PLAIN.add(head)
    return plain


def plain_output_layer(module: nn.Module) -> nn.Linear | None:
    """The verified output layer inside ``module`` (a peft or Opacus wrapper of the model
    included), or None: score from the model's full logits."""
    for layer in module.modules():
        if layer in _PLAIN:
            return layer  # type: ignore[return-value]
    return None


@contextlib.contextmanager
def hidden_before_output(module: nn.Module, head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, a forward pass of ``module`` appends the hidden states its output
    layer ``head`` receives (``[B, L, H]``, in the autograd graph) to the yielded list, and
    the layer itself computes nothing (it is handed zero positions)."""
    seen: list[torch.Tensor] = []

    def take(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        seen.append(hidden)
        return (hidden[..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield seen
    finally:
        handle.remove()


def token_nll(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative log-likelihood [N] in float32, greedy hit [N] bool) of ``targets`` [N]
    under ``head(hidden)`` for hidden states [N, H], a chunk of logits at a time."""
    nll, hits = _ChunkedNLL.apply(hidden, head.weight, head.bias, targets)
    return nll, hits


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


class _ChunkedNLL(torch.autograd.Function):
    """Cross-entropy of a linear layer's logits without materialising them all at once."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        step = _rows_per_chunk(weight.shape[0])
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
        hits = torch.empty(n, dtype=torch.bool, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        need_hidden, need_weight = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:3])
        # The frozen layer's case: d nll / d hidden now, chunk by chunk (backward only scales it).
        grad_hidden = torch.empty_like(hidden) if need_hidden and not need_weight else None
        for start in range(0, n, step):
            part = slice(start, start + step)
            logits = F.linear(hidden[part], weight, bias).float()
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[part].unsqueeze(1)).squeeze(1)
            nll[part], lse[part] = chunk_lse - picked, chunk_lse
            hits[part] = logits.argmax(dim=-1) == targets[part]
            if grad_hidden is not None:
                grad_hidden[part] = _dlogits(logits, chunk_lse, targets[part]).to(weight.dtype) @ weight
        ctx.mark_non_differentiable(hits)
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
            ctx.precomputed = True
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.precomputed = False
        return nll, hits

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor, _: Any) -> tuple[Any, ...]:
        if ctx.precomputed:
            (grad_hidden,) = ctx.saved_tensors
            return grad_nll.unsqueeze(1).to(grad_hidden.dtype) * grad_hidden, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        d_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        )
        step = _rows_per_chunk(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            part = slice(start, start + step)
            logits = F.linear(hidden[part], weight, bias).float()
            d_logits = _dlogits(logits, lse[part], targets[part]) * grad_nll[part].unsqueeze(1).float()
            if d_hidden is not None:
                d_hidden[part] = d_logits.to(weight.dtype) @ weight
            if d_weight is not None:
                d_weight += d_logits.t() @ hidden[part].float()
            if d_bias is not None:
                d_bias += d_logits.sum(dim=0)
        return (
            d_hidden,
            d_weight.to(weight.dtype) if d_weight is not None else None,
            d_bias.to(bias.dtype) if d_bias is not None and bias is not None else None,
            None,
        )


def _dlogits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d nll / d logits: softmax minus the one-hot target (computed in place on ``logits``)."""
    probs = logits.sub_(lse.unsqueeze(1)).exp_()
    probs[torch.arange(len(targets), device=probs.device), targets] -= 1.0
    return probs
