"""Bytes per client per round: LoRA (+ head) against full fine-tuning of the same model.

Both are one config switch (``peft.method``) of the same code path, run as real Ray-backed
simulations for one round; bytes are the protobuf-serialized sizes that the metered grid
recorded for every message.

    .venv/bin/python -m benchmarks.bytes_per_round [--clients 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks._common import table, write
from fedpeft.models import quiet_libraries
from fedpeft.results.records import read_rounds
from fedpeft.running.launch import RayOptions, simulate


def one_round(method: str, clients: int, tmp: str) -> dict[str, float]:
    overrides = {
        "num-clients": clients,
        "num-rounds": 1,
        "min-train-clients": clients,
        "device": "cpu",
        "peft.method": method,
        "data.partitioner": "iid",
        "data.max-examples": 300,
        "model.max-length": 32,
        "train.batch-size": 8,
        "train.max-steps": 1,
        "results-dir": tmp,
        "run-name": method,
    }
    rounds = read_rounds(Path(simulate(overrides, RayOptions())))
    r1 = rounds[1]
    trainable = rounds[0]["clients"][0]["metrics"]["num-trainable"]  # from the discovery reply
    return {
        "bytes_down_per_client": r1["bytes_down"] / len(r1["clients"]),
        "bytes_up_per_client": r1["bytes_up"] / len(r1["clients"]),
        "payload_up_per_client": sum(c["payload_up"] for c in r1["clients"]) / len(r1["clients"]),
        "trainable": trainable,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    args = ap.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        figures = {m: one_round(m, args.clients, tmp) for m in ("lora", "full")}
    ratio_up = figures["full"]["bytes_up_per_client"] / figures["lora"]["bytes_up_per_client"]
    ratio_down = figures["full"]["bytes_down_per_client"] / figures["lora"]["bytes_down_per_client"]
    print(
        table(
            ["method", "exchanged params", "bytes down / client", "bytes up / client", "array payload up"],
            [
                [
                    m,
                    int(f["trainable"]),
                    int(f["bytes_down_per_client"]),
                    int(f["bytes_up_per_client"]),
                    int(f["payload_up_per_client"]),
                ]
                for m, f in figures.items()
            ],
        )
    )
    print(f"full / lora: {ratio_up:.1f}x up, {ratio_down:.1f}x down")
    write(
        "bytes_per_round",
        {
            "clients": args.clients,
            **figures,
            "ratio_full_over_lora_up": ratio_up,
            "ratio_full_over_lora_down": ratio_down,
        },
    )


if __name__ == "__main__":
    main()
