"""GPU benchmark: the one-step comparison of bench/step_bench.py on CUDA in bf16, plus the time of a
50-step, guidance-6 generation at 512 px with sepen_core.sampling.generate, without and with an
adapter. Random weights in SD 1.5's architecture (UNet, CLIP text encoder, VAE): no downloads.

  python bench/gpu_bench.py --json $OUT/gpu.json           # on a GPU (see bench/run_gpu.sh)
  python bench/gpu_bench.py --smoke                        # the whole script on CPU, tiny model, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402  (puts the repo root on sys.path too)
from diffusers import AutoencoderKL  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sepen_core.adapters import KeyProjectionAdapter, restore_base_keys  # noqa: E402
from sepen_core.config import SampleConfig  # noqa: E402
from sepen_core.models import BaseModel, build_tiny_model  # noqa: E402
from sepen_core.sampling import generate  # noqa: E402

# SD 1.5's text encoder (openai/clip-vit-large-patch14's text tower) and VAE configs, written out.
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
)
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
PROMPT = "a photo of a cat and a dog"


def build_sd15_model(device: str) -> BaseModel:
    """UNet, text encoder and VAE of SD 1.5's sizes with random weights, fp32."""
    torch.manual_seed(1)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    return step_bench.build_model(False, device, text_encoder=text_encoder, vae=vae.eval())


def make_adapter(model: BaseModel, scale: float = 0.01, seed: int = 2) -> KeyProjectionAdapter:
    """An adapter from slightly perturbed keys (1% of each matrix's std); the base keys are restored after."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in step_bench.key_parameters(model).values():
            p.add_((torch.randn(p.shape, generator=generator) * p.float().std().item() * scale).to(p))
    adapter = KeyProjectionAdapter.from_model(model)  # no metadata: works with either from_model signature
    restore_base_keys(model)
    return adapter


def bench_generation(
    model: BaseModel, *, size: int, steps: int, guidance: float, runs: int, warmup: int, log=print
) -> dict:
    """Median wall time of generate() without and with the adapter, alternating the two (ABBA order)."""
    adapter = make_adapter(model)
    config = SampleConfig(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=0)
    cuda = model.device.type == "cuda"
    times: dict[str, list[float]] = {"base": [], "adapter": []}
    peak: dict[str, float] = {}
    pixels: dict[str, torch.Tensor] = {}
    for round_ in range(warmup + runs):
        for name in ("base", "adapter") if round_ % 2 == 0 else ("adapter", "base"):  # ABBA: no order bias
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            result = generate(model, PROMPT, config, adapter=adapter if name == "adapter" else None)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if cuda:
                peak[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
            label = "warm-up" if round_ < warmup else f"run {round_ - warmup + 1}/{runs}"
            log(f"  generate {size}px {steps} steps {name:<7} {label:<8} {seconds:8.3f} s")
            if round_ >= warmup:
                times[name].append(seconds)
            pixels[name] = result.pixels
    params = step_bench.key_parameters(model)
    restored = all(torch.equal(params[n].detach(), b) for n, b in model.base_keys.items())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "size_px": size,
        "steps": steps,
        "guidance": guidance,
        "dtype": str(model.dtype).removeprefix("torch."),
        "runs": runs,
        "times_s": times,
        "median_s": med,
        "adapter_overhead": med["adapter"] / med["base"] - 1,
        "per_step_ms": {k: v / steps * 1000 for k, v in med.items()},
        "peak_extra_mib": peak,
        "adapter_changes_image": bool((pixels["base"] - pixels["adapter"]).abs().max() > 0),
        "base_keys_restored": restored,
        "adapter_parameters": adapter.num_parameters,
    }


def format_generation(gen: dict) -> str:
    rows = [
        f"| generation ({gen['size_px']} px, {gen['steps']} steps, guidance {gen['guidance']}, {gen['dtype']}) "
        "| median (s) | per step (ms) | extra peak memory (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for name in ("base", "adapter"):
        mem = gen["peak_extra_mib"].get(name)
        memory = "n/a" if mem is None else f"{mem:.0f}"
        rows.append(f"| {name} | {gen['median_s'][name]:.3f} | {gen['per_step_ms'][name]:.1f} | {memory} |")
    rows.append(
        f"\nadapter overhead {gen['adapter_overhead'] * 100:+.1f}%; "
        f"adapter changes the image: {gen['adapter_changes_image']}; "
        f"base keys restored after: {gen['base_keys_restored']}"
    )
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="run everything on CPU with the tiny model, quickly")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 32])
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 4], help="step batch sizes (batch 1 is launch-bound on a GPU)"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gen-runs", type=int, default=3)
    parser.add_argument("--gen-steps", type=int, default=50)
    parser.add_argument("--gen-size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument(
        "--gen-dtype", choices=["fp32", "bf16", "fp16"], default="bf16", help="weights dtype for generation"
    )
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path, help="also write the markdown tables here")
    args = parser.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731

    device = args.device or ("cpu" if args.smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --smoke (or --device cpu)")
    if args.smoke:
        args.runs, args.warmup, args.gen_runs, args.gen_dtype, args.gen_steps = 1, 1, 1, "fp32", 10
        args.resolutions, args.batches = [32, 16], [1, 2]
    started = time.perf_counter()
    log(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else "")
    )
    model = build_tiny_model(0, sample_size=32, device=device) if args.smoke else build_sd15_model(device)
    log(f"model built in {time.perf_counter() - started:.1f} s")
    report: dict = {"device": device, "smoke": args.smoke, "torch": torch.__version__}
    if device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    tables = []

    if not args.skip_steps:
        report["steps"] = {}
        for b in args.batches:
            log(f"== one SepEn step, batch {b}, bf16 autocast")
            steps = step_bench.run_benchmark(
                tiny=args.smoke,
                device=device,
                dtype_name="bf16",
                resolutions=args.resolutions,
                runs=args.runs,
                warmup=args.warmup,
                memory=not args.smoke,
                log=log,
                model=model,
                batch_size=b,
            )
            report["steps"][str(b)] = steps
            tables.append(step_bench.format_table(steps))

    if not args.skip_generation:
        if args.gen_dtype != "fp32":
            model.to(dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.gen_dtype])
        size = args.gen_size if not args.smoke else model.unet.config.sample_size * model.vae_scale_factor
        gen = bench_generation(
            model, size=size, steps=args.gen_steps, guidance=args.guidance, runs=args.gen_runs, warmup=1, log=log
        )
        report["generation"] = gen
        tables.append(format_generation(gen))

    report["wall_s"] = time.perf_counter() - started
    text = "\n\n".join(tables)
    print("\n" + text + f"\n\ntotal {report['wall_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
