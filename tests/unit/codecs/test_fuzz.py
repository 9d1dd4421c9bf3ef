"""Hostile payloads against the container itself: every header field, every reason.

The conformance suite (test_conformance.py) fuzzes every codec's payload; this file
rewrites header fields with arbitrary values and checks each rejection names its reason.
``benchmarks/fuzz_decoder.py`` runs the long version.
"""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.codecs import PayloadError, Template, build_codec
from fedpeft.codecs.bitstream import CRC, FIXED, REASONS, get_varint, put_varint
from fedpeft.codecs.compeft import CompeftSettings

RNG = np.random.default_rng(0)
UPDATE = {"a": RNG.normal(size=(64, 8)).astype(np.float32), "b": RNG.normal(size=(5,)).astype(np.float32)}
TEMPLATE = Template.of(UPDATE)
CODECS = {
    pos: build_codec("compeft", 0.2, {"compeft": CompeftSettings(positions=pos)}) for pos in ("ans", "rice")
}
GOOD = {pos: codec.encode(UPDATE)[0] for pos, codec in CODECS.items()}
TOPK = build_codec("topk", 0.2, {})


def _refresh_crc(body: bytes) -> bytes:
    core = body[: -CRC.size] if len(body) >= CRC.size else body
    return core + CRC.pack(zlib.crc32(core))


def _fields(payload: bytes) -> tuple[tuple, list[int], bytes]:
    fixed = FIXED.unpack_from(payload)
    pos, values = FIXED.size, []
    for _ in range(5):
        value, pos = get_varint(payload, pos)
        values.append(value)
    return fixed, values, payload[pos : -CRC.size]


@settings(max_examples=300, deadline=None)
@given(
    pos=st.sampled_from(sorted(CODECS)),
    field=st.integers(0, 7),
    value=st.integers(0, 2**64 - 1),
)
def test_header_fields_out_of_range(pos, field, value):
    (magic, version, codec_id, flags, fp), values, rest = _fields(GOOD[pos])
    head = [codec_id, flags, version]
    if field < 5:
        values[field] = value
    else:
        head[field - 5] = value % 256
    data = FIXED.pack(magic, head[2], head[0], head[1], fp) + b"".join(put_varint(v) for v in values) + rest
    try:
        out = CODECS[pos].decode(_refresh_crc(data + bytes(CRC.size)), TEMPLATE)
    except PayloadError as err:
        assert err.reason in REASONS
    else:
        assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:6], "truncated"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: _refresh_crc(d[:2] + bytes([9]) + d[3:]), "version"),
        (lambda d: _refresh_crc(d[:3] + bytes([3]) + d[4:]), "codec"),
        (lambda d: _refresh_crc(d[:5] + bytes(4) + d[9:]), "fingerprint"),
    ],
)
def test_each_rejection_names_its_reason(mutate, reason):
    with pytest.raises(PayloadError) as err:
        CODECS["ans"].decode(mutate(GOOD["ans"]), TEMPLATE)
    assert err.value.reason == reason


def test_nonfinite_values_are_rejected():
    payload, stats = TOPK.encode(UPDATE)
    start = len(payload) - CRC.size - 2 * stats.k  # the fp16 values close the body
    values = np.frombuffer(payload[start : -CRC.size], dtype="<f2").copy()
    values[0] = np.inf
    with pytest.raises(PayloadError) as err:
        TOPK.decode(_refresh_crc(payload[:start] + values.tobytes() + bytes(CRC.size)), TEMPLATE)
    assert err.value.reason == "nonfinite"


def test_an_oversized_payload_is_refused_before_it_is_parsed():
    with pytest.raises(PayloadError) as err:
        CODECS["ans"].decode(GOOD["ans"] + bytes(CODECS["ans"].size_bound(TEMPLATE)), TEMPLATE)
    assert err.value.reason == "count"
