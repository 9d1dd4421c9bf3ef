"""The causal-LM task's own settings (``lm.*``), named by its registry entry.

Light (no PyTorch): the run config imports it to know every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedpeft.settings import ConfigError, Section, value_range


@dataclass(frozen=True)
class LMConfig(Section, section="lm"):
    """Causal-LM instruction tuning (``task.name = "causal-lm"``): formatting and generation."""

    # Format prompts with the tokenizer's chat template (when it has one); otherwise, or
    # when false, as "### Instruction:\n...\n\n### Response:\n".
    chat_template: bool = True
    # Held-out prompts answered by greedy generation at every evaluation, for exact match
    # (the round's "accuracy"); 0 = no generation (exact match is then not measured).
    generate_examples: int = field(default=64, metadata=value_range(0))
    max_new_tokens: int = field(default=16, metadata=value_range(1, 1024))
    # Pack several short examples into each row of max-length tokens (each attends only
    # to itself: block-diagonal causal masks, positions restarting per example).
    packing: bool = False

    def check_run(self, run: Any) -> None:
        if not self.packing:
            return
        owners = run.task.names_with(type(self))
        if run.task.name not in owners:
            raise ConfigError(
                f"config key 'lm.packing' needs task.name = {' or '.join(map(repr, owners))}, not {run.task.name!r}"
            )
        # The method's declared trait (its registry entry): loaded only when packing is asked for.
        from fedpeft.models.methods import METHODS

        method = METHODS.get(run.peft.method)
        if method is not None and method.row_tokens:
            raise ConfigError(
                f"config key 'lm.packing' cannot pack examples for peft.method {run.peft.method!r}: its "
                "virtual tokens would be shared by every example of a row"
            )
        if run.dp.per_example():
            raise ConfigError(
                "config key 'lm.packing' cannot be used with local DP-SGD (dp.mode local/both): a packed row "
                "holds several examples, and DP-SGD clips per row, so one example's privacy would not be bounded"
            )
