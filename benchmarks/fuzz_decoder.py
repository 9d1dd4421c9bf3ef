"""Long fuzz run of every registered codec's decoder: random and mutated payloads.

Every input must either decode to finite tensors or raise PayloadError with a known
reason; anything else (another exception, a hang) is a bug.  The test suite runs a fast
slice of the same thing (tests/unit/codecs/test_fuzz.py).

    .venv/bin/python -m benchmarks.fuzz_decoder [--cases 200000]
"""

from __future__ import annotations

import argparse
import collections
import time
import zlib

import numpy as np

from benchmarks._common import write
from fedpeft.codecs import CODECS, PayloadError, Template, build_codec
from fedpeft.codecs.bitstream import CRC
from fedpeft.codecs.compeft import CompeftSettings
from fedpeft.codecs.topk import TopkSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    update = {
        "a": rng.normal(size=(256, 8)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(np.float32),
    }
    template = Template.of(update)
    codecs = [build_codec(name, 0.2, {}) for name in CODECS] + [
        build_codec(name, d, {"compeft": CompeftSettings(positions=p), "topk": TopkSettings(positions=p)})
        for name in ("compeft", "topk")
        for d in (0.01, 0.2)
        for p in ("ans", "rice")
    ]
    goods = [(c, c.encode(update)[0]) for c in codecs]
    outcomes: collections.Counter[str] = collections.Counter()
    slowest = 0.0
    t0 = time.perf_counter()
    for i in range(args.cases):
        codec, good = goods[i % len(goods)]
        kind = rng.integers(4)
        if kind == 0:
            data = rng.integers(0, 256, size=rng.integers(0, 400), dtype=np.uint8).tobytes()
        else:
            buf = bytearray(good)
            for _ in range(rng.integers(1, 6)):
                buf[rng.integers(len(buf))] ^= 1 << rng.integers(8)
            if kind == 2:
                buf = buf[: rng.integers(len(buf))]
            data = bytes(buf)
            if kind >= 2 and len(data) >= CRC.size:  # structure-aware: a valid checksum over the damage
                data = data[: -CRC.size] + CRC.pack(zlib.crc32(data[: -CRC.size]))
        t = time.perf_counter()
        try:
            out = codec.decode(data, template)
            assert all(np.isfinite(v).all() for v in out.values())
            outcomes[f"{codec.name}:decoded"] += 1
        except PayloadError as err:
            outcomes[f"{codec.name}:rejected:{err.reason}"] += 1
        slowest = max(slowest, time.perf_counter() - t)
    total = time.perf_counter() - t0
    print(
        f"{args.cases:,} cases in {total:.1f} s ({args.cases / total:,.0f}/s); slowest decode {slowest * 1e3:.2f} ms"
    )
    for key, count in sorted(outcomes.items()):
        print(f"  {key:32s} {count:,}")
    write(
        "fuzz_decoder",
        {"cases": args.cases, "seconds": total, "slowest_decode_s": slowest, "outcomes": dict(outcomes)},
    )


if __name__ == "__main__":
    main()
