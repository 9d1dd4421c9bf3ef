"""The GPU path end to end, in one short script: run it where a GPU is at hand.

Checks, each timed, one table at the end (``benchmarks/results/gpu_path.{json,md}``):

1. **The device** -- CUDA's name, whether it computes in bfloat16, and what ``device =
   "auto"`` and ``model.dtype = "auto"`` resolve to (cuda, bfloat16 where supported).
2. **LLM steps on the GPU** -- SmolLM2-135M LoRA, batch 8 x 192 tokens (the issue's
   instruction setting, BBC News as questions): seconds per training step, evaluation
   seconds (scoring + greedy answers), peak GPU memory, against the same on the CPU for
   two steps (the speed-up, side by side in this run).
3. **Several clients per GPU on Ray** -- the LLM task (4 clients on one GPU, 0.25 each)
   and DINOv2-S/14 LoRA at 224 px (the vision task), 2 rounds each through Flower's
   simulation engine, bound to 127.0.0.1: seconds per round and the final figure.

Under 10 minutes on one H100 (most of it Ray's and the models' start-up).  Without a
GPU it says so and exits 0 (``--cpu-smoke`` runs the same steps on the CPU at toy sizes,
to check the script itself).

    .venv/bin/python -m benchmarks.gpu_path [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from benchmarks._common import RESULTS, table, write

LLM = {
    "task.name": "causal-lm",
    "model.name": "smollm2-135m",
    "data.dataset": "bbc-news",
    "data.test-fraction": 0.2,
    "data.max-test-examples": 64,
    "lm.generate-examples": 32,
    "lm.max-new-tokens": 8,
    "model.max-length": 192,
    "lora.target-modules": "q_proj,v_proj",
    "lora.r": 8,
    "lora.alpha": 16.0,
    "train.batch-size": 8,
    "train.learning-rate": 2e-3,
    "train.max-steps": 8,
    "min-train-clients": 1,
}
VISION = {
    "task.name": "image-classification",
    "model.name": "dinov2-small",
    "model.image-size": 224,
    "data.dataset": "fashion-mnist",
    "data.max-examples": 2000,
    "data.max-test-examples": 500,
    "train.batch-size": 32,
    "train.max-steps": 8,
    "min-train-clients": 1,
}
SMOKE = {  # --cpu-smoke: the same steps at toy sizes
    "model.max-length": 48,
    "model.image-size": 56,
    "data.max-examples": 240,
    "data.max-test-examples": 16,
    "lm.generate-examples": 4,
    "train.max-steps": 2,
    "train.batch-size": 4,
}


def device_facts(device: str) -> dict[str, Any]:
    import torch

    from fedpeft.models.backbone import backbone_dtype
    from fedpeft.runtime import resolve_device

    dev = resolve_device(device)
    return {
        "device": str(dev),
        "name": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "bf16": bool(dev.type == "cuda" and torch.cuda.is_bf16_supported()),
        "dtype_auto": str(backbone_dtype("auto", dev)),
    }


def llm_steps(device: str, overrides: dict[str, Any], steps: int) -> dict[str, Any]:
    """Training steps and one evaluation of the LLM task on ``device`` (in this process)."""
    import torch

    from fedpeft.config import RunConfig
    from fedpeft.models import build_model
    from fedpeft.tasks.registry import get_task
    from fedpeft.training import train_local

    cfg = RunConfig.from_run_config(LLM | overrides | {"device": device, "train.max-steps": steps})
    task = get_task(cfg)
    model = build_model(cfg, task.num_outputs(cfg), device, task.model_kind)
    data, test = task.client_train_set(cfg, 0, cfg.num_clients), task.server_test_set(cfg)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_local(model, data, cfg.train, 0, task=task)  # warm-up (kernels, allocator)
    _sync(cuda)
    start = time.perf_counter()
    result = train_local(model, data, cfg.train, 1, task=task)
    _sync(cuda)
    per_step = (time.perf_counter() - start) / max(result.steps, 1)
    start = time.perf_counter()
    evaluation = task.evaluate(model, test, cfg.train.eval_batch_size)
    _sync(cuda)
    return {
        "s_per_step": per_step,
        "evaluate_s": time.perf_counter() - start,
        "exact_match": evaluation.metrics.get("exact_match"),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "dtype": str(next(p for p in model.module.parameters() if not p.requires_grad).dtype),
    }


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def ray_run(name: str, overrides: dict[str, Any], gpus_per_client: float, tmp: str) -> dict[str, Any]:
    """A 2-round simulation on Flower's Ray engine with ``gpus_per_client`` of a GPU each."""
    from fedpeft.results.records import read_rounds
    from fedpeft.running.launch import RayOptions, simulate

    sets = overrides | {"num-clients": 4, "num-rounds": 2, "results-dir": tmp, "run-name": name}
    start = time.perf_counter()
    run_dir = simulate(sets, RayOptions(gpus_per_client=gpus_per_client, cpus_per_client=1.0), engine="ray")
    rounds = read_rounds(run_dir)
    return {
        "wall_s": time.perf_counter() - start,
        "s_per_round": sum(r["wall_seconds"] for r in rounds[1:]) / (len(rounds) - 1),
        "accuracy": rounds[-1]["accuracy"],
        "clients_ok": rounds[-1]["num_replied"],
    }


def main() -> None:
    import torch

    from fedpeft.models import quiet_libraries

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="no GPU: the same steps on the CPU, toy sizes"
    )
    args = parser.parse_args()
    quiet_libraries()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_path: no CUDA device here; nothing to check (run it on a machine with a GPU)")
        return
    device = "cpu" if args.cpu_smoke else "cuda"
    size = SMOKE if args.cpu_smoke else {}
    rows: list[list[Any]] = []
    figures: dict[str, Any] = {"facts": device_facts(device), "smoke": args.cpu_smoke}
    rows.append(["device", f"{figures['facts']['name']}, dtype auto = {figures['facts']['dtype_auto']}", ""])
    t0 = time.perf_counter()
    figures["llm_gpu"] = llm_steps(device, size, SMOKE["train.max-steps"] if args.cpu_smoke else 8)
    figures["llm_cpu"] = llm_steps("cpu", size, 2)
    ratio = figures["llm_cpu"]["s_per_step"] / figures["llm_gpu"]["s_per_step"]
    gpu = figures["llm_gpu"]
    rows.append(
        [
            "LLM train (8 x 192, LoRA)",
            f"{gpu['s_per_step']:.3f} s/step ({ratio:.1f}x the CPU's {figures['llm_cpu']['s_per_step']:.2f}), "
            f"{gpu['dtype']}",
            f"peak GPU {gpu['peak_gpu_mb']:.0f} MB" if gpu["peak_gpu_mb"] else "",
        ]
    )
    rows.append(
        ["LLM evaluate (64 scored, 32 answered)", f"{gpu['evaluate_s']:.1f} s", f"EM {gpu['exact_match']}"]
    )
    gpus = 0.0 if args.cpu_smoke else 0.25
    with tempfile.TemporaryDirectory() as tmp:
        for name, base in (("llm", LLM), ("vision", VISION)):
            result = ray_run(name, base | size | {"device": device}, gpus, tmp)
            figures[f"ray_{name}"] = result
            rows.append(
                [
                    f"Ray, 4 clients x {gpus} GPU: {name}",
                    f"{result['s_per_round']:.1f} s/round ({result['wall_s']:.0f} s with start-up)",
                    f"accuracy {result['accuracy']:.3f}, {result['clients_ok']} clients ok",
                ]
            )
    figures["total_s"] = time.perf_counter() - t0
    report = table(["check", "figure", "note"], rows) + f"\n\nTotal {figures['total_s']:.0f} s."
    print(report)
    if not args.cpu_smoke:  # the smoke run checks the script, its figures are not the GPU's
        write("gpu_path", figures)
        (RESULTS / "gpu_path.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
