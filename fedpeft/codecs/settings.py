"""The codec section (``codec.*``, and each codec's own ``codec.<name>.*``).

Light: the run config imports it to know every key; the codec names are the registry's
(:data:`fedpeft.codecs.registry.CODECS`), each codec's own settings its registry entry's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedpeft.codecs.registry import CODECS, settings_classes
from fedpeft.settings import Section, check_fields, value_range


def _codec_names() -> tuple[str, ...]:
    return tuple(CODECS)


def _downlink_names() -> tuple[str, ...]:
    return ("same", *_codec_names())


def _codec_defaults() -> tuple[tuple[str, Any], ...]:
    return tuple((name, cls()) for name, cls in settings_classes().items())


@dataclass(frozen=True)
class CodecConfig(Section, section="codec"):
    """How updates travel (``fedpeft.codecs``): a registered codec each way, error feedback,
    and each codec's own settings (``codec.<name>.<key>``, in :attr:`options`)."""

    # Client -> server: a registered codec ("none" = dense float32, Flower's own arrays).
    name: str = field(default="none", metadata={"registry": _codec_names})
    # Fraction of entries a sparsifying codec keeps: k = round(density * n).
    density: float = field(default=0.1, metadata=value_range(0.0, 1.0, lo_open=True))
    # Keep what compression lost on each client and add it to its next update.
    error_feedback: bool = True
    # Server -> client: a registered codec applied to the change of the global model, or
    # "same" (the uplink's codec: "none" stays dense, "compeft" codes both ways).
    downlink: str = field(default="same", metadata={"registry": _downlink_names})
    # Density of the downlink codec (0 = the uplink's).  The downlink carries the change of
    # the global model: the union of the clients' sparse updates, denser than any one of
    # them.  A sparser downlink leaves most of that change on the server (its error
    # feedback), the clients train from a copy that falls behind, and the server's model
    # drifts from the points the updates were computed at (measured: server test loss
    # rising while the clients' training loss falls, benchmarks/results/frontier_ablation_*).
    # At density 1 ComPEFT is one sign bit per entry and a scale per tensor, no positions.
    downlink_density: float = field(default=1.0, metadata=value_range(0.0, 1.0))
    # The server keeps what its downlink lost and sends it later (else it is dropped).
    downlink_error_feedback: bool = True
    # Denser early rounds: the density falls linearly from warmup-density to density over
    # warmup-rounds rounds (0 = constant density).
    warmup_rounds: int = field(default=0, metadata=value_range(0))
    warmup_density: float = field(default=1.0, metadata=value_range(0.0, 1.0, lo_open=True))
    # Tensors with at most this many entries (a classification head, biases) travel through
    # small-codec instead (0 = every tensor through the codec).
    small_tensors: int = field(default=0, metadata=value_range(0))
    small_codec: str = field(default="fp16", metadata={"registry": _codec_names})
    # Each codec's own settings, name -> frozen dataclass (codec.<name>.<key> run-config keys).
    options: tuple[tuple[str, Any], ...] = field(
        default_factory=_codec_defaults, metadata={"nested": settings_classes}
    )

    def _check(self) -> None:
        for name, settings in self.options:  # each codec's own section (codec.<name>.<key>)
            check_fields(settings, f"codec.{name}")

    def settings(self) -> dict[str, Any]:
        """Codec name -> its settings object."""
        return dict(self.options)

    def density_at(self, server_round: int, downlink: bool = False) -> float:
        """The density of round ``server_round`` (1-based) under the warm-up schedule."""
        final = self.downlink_density if downlink and self.downlink_density > 0 else self.density
        if self.warmup_rounds <= 0 or server_round > self.warmup_rounds:
            return final
        frac = (server_round - 1) / self.warmup_rounds
        return max(final, self.warmup_density + frac * (final - self.warmup_density))

    def active(self) -> bool:
        """Whether anything differs from dense float32 both ways."""
        return self.name != "none" or self.downlink_codec != "none"

    @property
    def downlink_codec(self) -> str:
        """The downlink's registered codec (``same`` resolved)."""
        return self.name if self.downlink == "same" else self.downlink
