"""Injected failures (``failures.*``): light, the run config imports it to know every key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedpeft.settings import ConfigError, Section, value_range


@dataclass(frozen=True)
class FailureConfig(Section, section="failures"):
    """Injected client failures (``fedpeft.recovery.faults``): per sampled client and round, seeded."""

    # The client raises (an error reply).
    raise_probability: float = field(default=0.0, metadata=value_range(0.0, 1.0))
    # The client is stuck past round-timeout and does not train that round (no reply in time).
    hang_probability: float = field(default=0.0, metadata=value_range(0.0, 1.0))
    # The client trains, then crashes before replying (no reply in time; its state as before).
    drop_probability: float = field(default=0.0, metadata=value_range(0.0, 1.0))

    def _check(self) -> None:
        if self.raise_probability + self.hang_probability + self.drop_probability > 1.0:
            raise ConfigError("config keys 'failures.*-probability' must sum to at most 1")

    def active(self) -> bool:
        return self.raise_probability + self.hang_probability + self.drop_probability > 0

    def check_run(self, run: Any) -> None:
        if (self.hang_probability or self.drop_probability) and run.round_timeout > 600:
            raise ConfigError(
                f"config keys 'failures.hang-probability' / 'failures.drop-probability' make clients stay "
                f"away past 'round-timeout' ({run.round_timeout:g} s): set round-timeout to at most 600"
            )
