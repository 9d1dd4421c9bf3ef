"""Hostile payloads: the decoder raises PayloadError with a reason, never anything else.

A fast slice for the suite; ``benchmarks/fuzz_decoder.py`` runs the long version.
"""

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.codecs import CompeftCodec, PayloadError, Template
from fedpeft.codecs.bitstream import CRC, HEADER
from fedpeft.config import CodecConfig

RNG = np.random.default_rng(0)
UPDATE = {"a": RNG.normal(size=(64, 8)).astype(np.float32), "b": RNG.normal(size=(5,)).astype(np.float32)}
TEMPLATE = Template.of(UPDATE)
CODECS = {
    pos: CompeftCodec(CodecConfig(name="compeft", density=0.2, positions=pos)) for pos in ("ans", "rice")
}
GOOD = {pos: codec.encode(UPDATE)[0] for pos, codec in CODECS.items()}
FP16 = CompeftCodec(CodecConfig(name="compeft", density=0.2, values="fp16"))
REASONS = {"truncated", "checksum", "version", "fingerprint", "count", "malformed", "nonfinite"}


def _decode_must_be_clean(codec, data):
    try:
        out = codec.decode(data, TEMPLATE)
    except PayloadError as err:
        assert err.reason in REASONS
        return None
    assert all(np.isfinite(v).all() for v in out.values())
    return out


def _refresh_crc(body: bytes) -> bytes:
    core = body[: -CRC.size] if len(body) >= CRC.size else body
    return core + CRC.pack(zlib.crc32(core))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes(data):
    for codec in CODECS.values():
        _decode_must_be_clean(codec, data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pos=st.sampled_from(sorted(CODECS)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), min_size=1, max_size=6),
    cut=st.integers(0, 40),
    fix_crc=st.booleans(),
)
def test_mutated_payloads(pos, flips, cut, fix_crc):
    data = bytearray(GOOD[pos])
    for i, bit in flips:
        data[i % len(data)] ^= 1 << bit
    if cut:
        data = data[: max(0, len(data) - cut)]
    blob = _refresh_crc(bytes(data)) if fix_crc else bytes(data)
    _decode_must_be_clean(CODECS[pos], blob)


@settings(max_examples=200, deadline=None)
@given(
    field=st.sampled_from(["n", "k", "tensors", "plen", "coder", "flags"]), value=st.integers(0, 2**32 - 1)
)
def test_header_fields_out_of_range(field, value):
    data = bytearray(GOOD["rice"])
    magic, ver, flags, coder, res, fp, n, k, t, base, plen = HEADER.unpack_from(data)
    fields = {"n": n, "k": k, "tensors": t, "plen": plen, "coder": coder, "flags": flags}
    fields[field] = value % 256 if field in ("coder", "flags") else value
    head = HEADER.pack(
        magic,
        ver,
        fields["flags"],
        fields["coder"],
        res,
        fp,
        fields["n"],
        fields["k"],
        fields["tensors"],
        base,
        fields["plen"],
    )
    _decode_must_be_clean(CODECS["rice"], _refresh_crc(head + bytes(data[HEADER.size :])))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[:10], "truncated"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
        (lambda d: _refresh_crc(d[:4] + bytes([9]) + d[5:]), "version"),
        (lambda d: _refresh_crc(d[:8] + bytes(8) + d[16:]), "fingerprint"),
    ],
)
def test_each_rejection_names_its_reason(mutate, reason):
    with pytest.raises(PayloadError) as err:
        CODECS["ans"].decode(mutate(GOOD["ans"]), TEMPLATE)
    assert err.value.reason == reason


def test_nonfinite_values_are_rejected():
    payload, stats = FP16.encode(UPDATE)
    start = len(payload) - CRC.size - 2 * stats.k  # the fp16 values close the body
    values = np.frombuffer(payload[start : -CRC.size], dtype="<f2").copy()
    values[0] = np.inf
    with pytest.raises(PayloadError) as err:
        FP16.decode(_refresh_crc(payload[:start] + values.tobytes() + bytes(CRC.size)), TEMPLATE)
    assert err.value.reason == "nonfinite"


def test_a_payload_for_other_tensors_is_refused():
    other = Template.of({"a": np.zeros((64, 9), np.float32), "b": np.zeros(5, np.float32)})
    with pytest.raises(PayloadError, match="fingerprint"):
        CODECS["ans"].decode(GOOD["ans"], other)
