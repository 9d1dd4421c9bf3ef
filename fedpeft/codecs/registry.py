"""The codec registry: ``codec.name`` and ``codec.downlink`` are validated against it.

Adding a codec is one module (a :class:`~fedpeft.codecs.base.FlatCodec` subclass, or any
class satisfying :class:`~fedpeft.codecs.base.Codec`, built as ``cls(density, settings)``),
one line below, and -- if it has settings -- a frozen dataclass whose fields become the
run-config keys ``codec.<name>.<field>`` (declare them in ``pyproject.toml`` too: Flower
refuses undeclared keys).  The conformance suite (``tests/unit/codecs``) then runs over it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpeft.codecs.base import Codec
from fedpeft.codecs.bitstream import Template
from fedpeft.codecs.compeft import CompeftCodec, CompeftSettings
from fedpeft.codecs.dense import Fp16Codec, Fp32Codec
from fedpeft.codecs.int8 import Int8Codec, Int8Settings
from fedpeft.codecs.sign import SignCodec, SignSettings
from fedpeft.codecs.split import codec_for_template
from fedpeft.codecs.topk import TopkCodec, TopkSettings

if TYPE_CHECKING:  # the run config assembles the codecs' settings: no import at run time
    from fedpeft.codecs.settings import CodecConfig


@dataclass(frozen=True)
class CodecSpec:
    """A registered codec: how to build it and which settings section it reads."""

    factory: type  # cls(density, settings) -> Codec
    settings: type | None  # a frozen dataclass: the ``codec.<name>.*`` keys, or None


CODECS: dict[str, CodecSpec] = {
    "none": CodecSpec(Fp32Codec, None),
    "fp16": CodecSpec(Fp16Codec, None),
    "int8": CodecSpec(Int8Codec, Int8Settings),
    "topk": CodecSpec(TopkCodec, TopkSettings),
    "sign": CodecSpec(SignCodec, SignSettings),
    "compeft": CodecSpec(CompeftCodec, CompeftSettings),
}


def settings_classes() -> dict[str, type]:
    """Codec name -> its settings dataclass, for the run-config schema."""
    return {name: spec.settings for name, spec in CODECS.items() if spec.settings is not None}


def build_codec(name: str, density: float, settings: Mapping[str, Any]) -> Codec:
    """The codec ``name`` at ``density``, with its section of ``settings`` (name -> object)."""
    spec = CODECS[name]
    own = settings.get(name, spec.settings() if spec.settings is not None else None)
    codec: Codec = spec.factory(density, own)
    return codec


def transport_codec(cfg: CodecConfig, direction: str, server_round: int, template: Template) -> Codec:
    """The codec one direction uses in round ``server_round`` for ``template``: the
    configured codec at that round's density (warm-up schedule), with small tensors split
    off to ``codec.small-codec`` when ``codec.small-tensors`` asks for it."""
    downlink = direction == "downlink"
    name = cfg.downlink_codec if downlink else cfg.name
    codec = build_codec(name, cfg.density_at(server_round, downlink), cfg.settings())
    if codec.passthrough or cfg.small_tensors <= 0:
        return codec
    small = build_codec(cfg.small_codec, cfg.density_at(server_round, downlink), cfg.settings())
    return codec_for_template(codec, small, cfg.small_tensors, template)
