"""ComPEFT codec throughput and size: encode / decode speed against a plain NumPy copy,
and encoded bits per parameter against the entropy bound n*(H(d)+d).

Throughput is in parameters per second on 1M and 10M element float32 updates, side by
side with ``np.copy`` of the same array (the memory-bound limit), as a ratio.  Both
position coders are measured: ``ans`` (constriction) and ``rice`` (our vectorized
Golomb-Rice).

    .venv/bin/python -m benchmarks.codec
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from benchmarks._common import table, write
from fedpeft.codecs import CompeftCodec, Template, entropy_bound_bits
from fedpeft.config import CodecConfig


def best_of(fn: Callable[..., object], *args: object, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    speed_rows, size_rows, figures = [], [], {"throughput": [], "size": []}
    for n in (1_000_000, 10_000_000):
        update = {"w": rng.normal(size=n).astype(np.float32)}
        template = Template.of(update)
        copy_s = best_of(np.copy, update["w"])
        for pos in ("ans", "rice"):
            codec = CompeftCodec(CodecConfig(name="compeft", density=0.1, positions=pos))
            payload, _ = codec.encode(update)
            enc_s = best_of(codec.encode, update)
            dec_s = best_of(codec.decode, payload, template)
            row = {
                "n": n,
                "coder": pos,
                "encode_params_per_s": n / enc_s,
                "decode_params_per_s": n / dec_s,
                "copy_params_per_s": n / copy_s,
                "encode_over_copy": copy_s / enc_s,
                "decode_over_copy": copy_s / dec_s,
            }
            figures["throughput"].append(row)
            speed_rows.append(
                [
                    f"{n:,}",
                    pos,
                    f"{n / enc_s / 1e6:.1f} M/s",
                    f"{n / dec_s / 1e6:.1f} M/s",
                    f"{n / copy_s / 1e6:.0f} M/s",
                    f"{copy_s / enc_s:.4f}",
                    f"{copy_s / dec_s:.4f}",
                ]
            )
    n = 1_000_000
    update = {"w": rng.normal(size=n).astype(np.float32)}
    for d in (0.01, 0.05, 0.10, 0.20):
        for pos in ("ans", "rice"):
            codec = CompeftCodec(CodecConfig(name="compeft", density=d, positions=pos))
            payload, stats = codec.encode(update)
            bound = entropy_bound_bits(stats.n, stats.k) / n
            body = 8 * (len(payload) - stats.header_bytes) / n
            figures["size"].append(
                {
                    "density": d,
                    "coder": pos,
                    "bits_per_param": stats.bits_per_param,
                    "body_bits_per_param": body,
                    "bound_bits_per_param": bound,
                    "body_over_bound": body / bound,
                    "header_bytes": stats.header_bytes,
                }
            )
            size_rows.append(
                [
                    f"{d:.0%}",
                    pos,
                    f"{stats.bits_per_param:.4f}",
                    f"{bound:.4f}",
                    f"{body / bound:.4f}",
                    stats.header_bytes,
                    f"{32 / stats.bits_per_param:.1f}x",
                ]
            )
    print("encode / decode throughput at density 10% (ratio = copy time / codec time)")
    print(table(["params", "coder", "encode", "decode", "np.copy", "encode/copy", "decode/copy"], speed_rows))
    print("\nsize at n = 1M (bits per parameter; fp32 is 32)")
    print(table(["density", "coder", "bits/param", "bound", "body/bound", "header B", "vs fp32"], size_rows))
    write("codec", figures)


if __name__ == "__main__":
    main()
