"""Codec throughput and size: every registered codec's encode / decode speed against a plain
NumPy copy, and bits per parameter against the information bound, at 1M parameters and at
LoRA size (75,653: LoRA r=8 on query/value of MiniLM plus a 5-class head).

Throughput is parameters per second on 1M and 10M element float32 updates, side by side
with ``np.copy`` of the same array (the memory-bound limit), as a ratio (best of 5).
Sizes count the whole payload: header, scales, positions, values and checksum.

    .venv/bin/python -m benchmarks.codec
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from benchmarks._common import table, write
from fedpeft.codecs import CODECS, Template, build_codec
from fedpeft.codecs.compeft import CompeftSettings

LORA_SHAPES = {f"l{i}.{m}.lora_{ab}": (8, 384) for i in range(6) for m in ("q", "v") for ab in ("A", "B")} | {
    "classifier.weight": (5, 384),
    "classifier.bias": (5,),
}


def best_of(fn: Callable[..., object], *args: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def throughput(rng: np.random.Generator) -> tuple[list[list[object]], list[dict]]:
    rows, figures = [], []
    for n in (1_000_000, 10_000_000):
        update = {"w": rng.normal(size=n).astype(np.float32)}
        template = Template.of(update)
        copy_s = best_of(np.copy, update["w"])
        for name in CODECS:
            for positions in ("ans", "rice") if name in ("compeft", "topk") else ("",):
                codec = build_codec(
                    name, 0.1, {name: CODECS[name].settings(positions=positions)} if positions else {}
                )
                payload, _ = codec.encode(update)
                enc_s = best_of(codec.encode, update)
                dec_s = best_of(codec.decode, payload, template)
                label = f"{name} {positions}".strip()
                figures.append(
                    {
                        "n": n,
                        "codec": label,
                        "encode_params_per_s": n / enc_s,
                        "decode_params_per_s": n / dec_s,
                        "copy_params_per_s": n / copy_s,
                        "encode_over_copy": copy_s / enc_s,
                        "decode_over_copy": copy_s / dec_s,
                    }
                )
                rows.append(
                    [
                        f"{n:,}",
                        label,
                        f"{n / enc_s / 1e6:.1f} M/s",
                        f"{n / dec_s / 1e6:.1f} M/s",
                        f"{n / copy_s / 1e6:.0f} M/s",
                        f"{copy_s / enc_s:.4f}",
                        f"{copy_s / dec_s:.4f}",
                    ]
                )
    return rows, figures


def sizes(rng: np.random.Generator) -> tuple[list[list[object]], list[dict]]:
    rows, figures = [], []
    updates = {
        "1M": {"w": rng.normal(size=1_000_000).astype(np.float32)},
        "LoRA 75,653": {k: rng.normal(size=s).astype(np.float32) for k, s in LORA_SHAPES.items()},
    }
    for label, update in updates.items():
        n = sum(v.size for v in update.values())
        cases = [
            (f"compeft {d:.0%} {p}", build_codec("compeft", d, {"compeft": CompeftSettings(positions=p)}))
            for d in (0.01, 0.05, 0.10, 0.20)
            for p in ("ans", "rice")
        ]
        cases += [(f"topk {d:.0%}", build_codec("topk", d, {})) for d in (0.01, 0.1)]
        cases += [(name, build_codec(name, 1.0, {})) for name in ("sign", "int8", "fp16", "none")]
        for name, codec in cases:
            payload, stats = codec.encode(update)
            bound = stats.bound_bits_per_param
            figures.append(
                {
                    "update": label,
                    "codec": name,
                    "n": n,
                    "bytes": len(payload),
                    "bits_per_param": stats.bits_per_param,
                    "bound_bits_per_param": bound,
                    "over_bound": stats.bits_per_param / bound if bound else float("nan"),
                    "overhead_bytes": stats.header_bytes,
                }
            )
            rows.append(
                [
                    label,
                    name,
                    f"{len(payload):,}",
                    f"{stats.bits_per_param:.4f}",
                    f"{bound:.4f}",
                    f"{stats.bits_per_param / bound:.3f}" if bound else "-",
                    stats.header_bytes,
                    f"{32 / stats.bits_per_param:.1f}x",
                ]
            )
    return rows, figures


def main() -> None:
    rng = np.random.default_rng(0)
    speed_rows, speed = throughput(rng)
    size_rows, size = sizes(rng)
    print("encode / decode throughput, density 10% for sparse codecs (ratio = copy time / codec time)")
    print(table(["params", "codec", "encode", "decode", "np.copy", "encode/copy", "decode/copy"], speed_rows))
    print("\nsize: whole payload in bits per parameter against the information bound (fp32 is 32)")
    print(
        table(
            ["update", "codec", "bytes", "bits/param", "bound", "payload/bound", "overhead B", "vs fp32"],
            size_rows,
        )
    )
    write("codec", {"throughput": speed, "size": size})


if __name__ == "__main__":
    main()
