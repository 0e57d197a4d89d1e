"""Benchmark of mixed-adapter batches: throughput of 8 generate requests with 8 different adapters in one UNet batch,
side by side in one process with 8 requests sharing one adapter in one batch, and with the 8 requests one at a time.

Each round runs the three modes in a rotating order (abc, bca, cab, ...) so that machine noise hits all alike; the
table gives the median seconds per mode and the ratios of images per second. The mixed batch's images are checked
against the one-at-a-time images (max pixel difference, [0, 1] scale).

  python bench/batch_bench.py --json bench/results-batch-cpu.json --md bench/results-batch-cpu.md
  python bench/batch_bench.py --models toy --runs 1           # about a minute on a laptop CPU
  python bench/batch_bench.py --device cuda --models toy sd15 --sd15-size 512 --steps 20   # bench/run_gpu.sh
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench  # noqa: E402  (puts the repo root on sys.path too, through step_bench)

from sepen_core.config import SampleConfig  # noqa: E402
from sepen_core.models import BaseModel, load_model  # noqa: E402
from sepen_core.sampling import GenerationRequest, generate, generate_batch  # noqa: E402

MODES = ("mixed", "shared", "sequential")
LABELS = {
    "mixed": "8 jobs, 8 different adapters, one batch",
    "shared": "8 jobs, one adapter, one batch",
    "sequential": "8 jobs one at a time (8 adapters)",
}
PROMPTS = ("a {} and a {}", "a {} next to a {}")


def requests_for(model: BaseModel, nouns: tuple[str, str], config: SampleConfig, jobs: int) -> list[GenerationRequest]:
    """`jobs` requests, one image each, each with its own seed, prompt order and adapter (perturbed keys)."""
    adapters = [gpu_bench.make_adapter(model, seed=100 + i) for i in range(jobs)]
    requests = []
    for i, adapter in enumerate(adapters):
        pair = nouns if i % 2 == 0 else nouns[::-1]
        prompt = PROMPTS[i % len(PROMPTS)].format(*pair)
        requests.append(GenerationRequest(prompt, replace(config, seed=1000 * i, num_images=1), adapter))
    return requests


def synchronize(model: BaseModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def run_mode(model: BaseModel, mode: str, requests: list[GenerationRequest]) -> list[torch.Tensor]:
    if mode == "mixed":
        return [r.pixels for r in generate_batch(model, requests)]
    if mode == "shared":
        shared = [replace(r, adapter=requests[0].adapter) for r in requests]
        return [r.pixels for r in generate_batch(model, shared)]
    return [generate(model, r.prompt, r.config, adapter=r.adapter).pixels for r in requests]


def bench_model(name: str, model: BaseModel, config: SampleConfig, nouns, jobs: int, runs: int, log=print) -> dict:
    requests = requests_for(model, nouns, config, jobs)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    pixels: dict[str, list[torch.Tensor]] = {}
    for round_ in range(runs + 1):  # round 0 warms up and is dropped
        order = MODES[round_ % 3 :] + MODES[: round_ % 3]
        for mode in order:
            gc.collect()
            synchronize(model)
            start = time.perf_counter()
            pixels[mode] = run_mode(model, mode, requests)
            synchronize(model)
            took = time.perf_counter() - start
            log(f"  {name} {mode:<10} {'warm-up' if round_ == 0 else f'run {round_}/{runs}':<8} {took:8.3f} s")
            if round_:
                seconds[mode].append(took)
    median = {m: statistics.median(v) for m, v in seconds.items()}
    per_second = {m: jobs / s for m, s in median.items()}
    mixed_vs_alone = max(float((a - b).abs().max()) for a, b in zip(pixels["mixed"], pixels["sequential"], strict=True))
    adapters_matter = max(float((a - b).abs().max()) for a, b in zip(pixels["mixed"], pixels["shared"], strict=True))
    return {
        "model": name,
        "model_id": model.model_id,
        "jobs": jobs,
        "size_px": config.height or model.unet.config.sample_size * model.vae_scale_factor,
        "steps": config.num_inference_steps,
        "guidance": config.guidance_scale,
        "dtype": str(model.dtype).removeprefix("torch."),
        "runs": runs,
        "seconds": seconds,
        "median_s": median,
        "images_per_s": per_second,
        "mixed_vs_shared": per_second["mixed"] / per_second["shared"],
        "mixed_vs_sequential": per_second["mixed"] / per_second["sequential"],
        "max_pixel_difference_mixed_vs_alone": mixed_vs_alone,
        "max_pixel_difference_mixed_vs_shared": adapters_matter,
    }


def build(name: str, device: str, size: int) -> tuple[BaseModel, SampleConfig, tuple[str, str]]:
    if name == "toy":
        model = load_model("toy", device=device)
        return model, model.defaults.sample_config(), ("cherry", "sofa")
    model = gpu_bench.build_sd15_model(device)
    return model, SampleConfig(guidance_scale=6.0, height=size, width=size), ("cat", "dog")


def markdown(report: dict) -> str:
    lines = [
        "| model | size | steps | guidance | mode | median s (8 images) | images/s | vs one adapter |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in report["models"]:
        for mode in MODES:
            ratio = row["images_per_s"][mode] / row["images_per_s"]["shared"]
            lines.append(
                f"| {row['model']} | {row['size_px']} | {row['steps']} | {row['guidance']:g} | {LABELS[mode]} | "
                f"{row['median_s'][mode]:.3f} | {row['images_per_s'][mode]:.2f} | {ratio:.2f}x |"
            )
    lines.append("")
    for row in report["models"]:
        lines.append(
            f"{row['model']}: 8 adapters batched = {row['mixed_vs_shared']:.2f}x the images/s of one adapter batched, "
            f"{row['mixed_vs_sequential']:.2f}x one job at a time; max pixel difference batched vs alone "
            f"{row['max_pixel_difference_mixed_vs_alone']:.1e} (vs one shared adapter: "
            f"{row['max_pixel_difference_mixed_vs_shared']:.1e}: the adapters change the images)"
        )
    env = report["environment"]
    lines.append(f"\n{env['device']}, torch {env['torch']}, {env['threads']} threads, median of {env['runs']} runs")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "sd15"], choices=["toy", "sd15"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (the toy model: its own 20 if 0)")
    parser.add_argument("--sd15-size", type=int, default=128, help="image side for the SD 1.5-architecture model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model, config, nouns = build(name, args.device, args.sd15_size)
        if args.steps:
            config = replace(config, num_inference_steps=args.steps)
        rows.append(bench_model(name, model, config, nouns, args.jobs, args.runs))
        del model
    report = {
        "models": rows,
        "environment": {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "runs": args.runs,
            "command": "python bench/batch_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
    }
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(table)
    return report


if __name__ == "__main__":
    main()
