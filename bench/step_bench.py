"""Benchmark of ONE SepEn training step: the naive reference vs our exact and local objectives.

Per latent resolution, on the same model and the same fixed inputs, this times (alternating the
methods a, b, c, a, b, c, ... so that machine noise hits all of them alike):

  reference  sepen_core.reference.reference_objective: whole UNet, explicit attention everywhere
  exact      sepen_core.objective.sepen_objective, FinetuneConfig(grad_mode="exact")
  local      sepen_core.objective.sepen_objective, FinetuneConfig(grad_mode="local")

one step each = forward + SepEn loss + backward into the attn2.to_k weights (no optimizer step:
AdamW on the 16 key matrices is identical for all three and small). Beside them it times the
"floor" pieces, which are not training steps:

  floor      the early-exit forward alone (capture layers explicit, every other layer SDPA) under no_grad
  exact_fwd  the exact path's forward with its autograd graph, without the backward
  full_fwd   a whole-UNet forward (SDPA everywhere) under no_grad: what the early exit saves

Memory is the peak above the model's own weights: on CPU in a fresh subprocess per (method,
resolution) from the process's high-water mark (VmHWM after resetting it through
/proc/self/clear_refs), on CUDA from torch.cuda.max_memory_allocated.

The exact path's gradients are checked against the reference's (cosine per to_k layer, min over
layers, in fp32); the exact row is only marked valid when that cosine is >= 0.9999.

  python bench/step_bench.py --resolutions 64 32 --runs 3 --json bench/results-cpu.json
  python bench/step_bench.py --tiny            # seconds-long smoke test
  python bench/step_bench.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sepen_core.attention import MapTargets, capture_maps, map_layers, unet_forward  # noqa: E402
from sepen_core.concepts import concept_token_mask  # noqa: E402
from sepen_core.config import FinetuneConfig  # noqa: E402
from sepen_core.models import BaseModel, TextConditioning, load_clip_tokenizer, tiny_unet_config  # noqa: E402
from sepen_core.objective import TrainingBatch, sepen_objective  # noqa: E402
from sepen_core.reference import reference_objective  # noqa: E402

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), written out: no downloads.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# SD's scheduler (scheduler/scheduler_config.json of SD 1.x).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)

STEP_METHODS = ("reference", "exact", "local")  # training steps: forward + loss + backward
FLOOR_METHODS = ("floor", "exact_fwd", "full_fwd")  # forward-only pieces, for the analysis
ALL_METHODS = STEP_METHODS + FLOOR_METHODS
COSINE_VALID = 0.9999
CONCEPT_POSITIONS = [(2,), (5,)]  # two one-token objects, e.g. "a cat and a dog": start token at 0
CONTENT_POSITIONS = range(1, 7)
TIMESTEP = 500
MAP_DOWNSAMPLE = 4  # FinetuneConfig's default, as CONFIGS use it
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# -- model and inputs ------------------------------------------------------------------------------
def unet_config(tiny: bool) -> dict:
    return tiny_unet_config() if tiny else dict(SD15_UNET_CONFIG)


def build_model(
    tiny: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    text_encoder: CLIPTextModel | None = None,
    vae=None,
) -> BaseModel:
    """A random-weight SD 1.5-architecture BaseModel (or the tiny layout), fp32, no downloads.

    The step benchmark feeds fixed random text embeddings, so by default the text encoder is a
    tiny stand-in (BaseModel wants one); gpu_bench passes SD's real-size one and a VAE.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(tiny))
        if text_encoder is None:
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    max_position_embeddings=77,
                    projection_dim=32,
                )
            )
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    model = BaseModel(
        unet.eval(),
        text_encoder.eval(),
        load_clip_tokenizer(),
        scheduler,
        vae,
        "sd15-random" if not tiny else "tiny-random",
    )
    return model.to(device)


def make_batch(model: BaseModel, resolution: int, seed: int = 0, batch: int = 1) -> TrainingBatch:
    """Fixed inputs: random text states (1, 77, D), objects at tokens 2 and 5, content tokens 1..6,
    pseudo-latents x_t at a fixed timestep, exactly as make_training_batch shapes them."""
    generator = torch.Generator().manual_seed(seed)
    dim = model.unet.config.cross_attention_dim
    hidden = torch.randn(batch, 77, dim, generator=generator)
    input_ids = torch.zeros(batch, 77, dtype=torch.long)  # not read by the objectives
    cond = TextConditioning(["<fixed random text states>"] * batch, input_ids, hidden.to(model.device, model.dtype))
    concept_mask, valid = concept_token_mask([CONCEPT_POSITIONS] * batch, 77)
    content_mask = torch.zeros(batch, 77)
    content_mask[:, list(CONTENT_POSITIONS)] = 1.0
    device = model.device
    targets = MapTargets(
        concept_mask.to(device),
        valid.to(device),
        content_mask.to(device),
        tuple(map_layers(model.unet, MAP_DOWNSAMPLE)),
        (resolution // MAP_DOWNSAMPLE,) * 2,
    )
    shape = (batch, model.unet.config.in_channels, resolution, resolution)
    clean = torch.randn(shape, generator=generator) * 0.18215
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.tensor([TIMESTEP] * batch)
    latents = model.noise_scheduler.add_noise(clean, noise, timesteps)
    return TrainingBatch([], latents.to(device, model.dtype), timesteps.to(device), cond, targets)


def key_parameters(model: BaseModel) -> dict[str, torch.nn.Parameter]:
    params = dict(model.unet.named_parameters())
    return {name: params[name] for name in model.base_keys}


def set_trainable(model: BaseModel, on: bool = True) -> None:
    """As finetune() does: only the attn2.to_k weights require grad."""
    for p in key_parameters(model).values():
        p.requires_grad_(on)
        p.grad = None


def zero_grads(model: BaseModel) -> None:
    for p in key_parameters(model).values():
        p.grad = None


def key_grads(model: BaseModel) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().float().clone() for name, p in key_parameters(model).items() if p.grad is not None}


# -- one step of each method ---------------------------------------------------------------------
CONFIGS = {
    "exact": FinetuneConfig(grad_mode="exact", batch_size=1),
    "local": FinetuneConfig(grad_mode="local", batch_size=1),
    "exact_compiled": FinetuneConfig(grad_mode="exact", batch_size=1, compile=True),  # bench/compile_bench.py
}


def autocast_for(model: BaseModel, dtype: torch.dtype | None):
    return torch.autocast(model.device.type, dtype=dtype) if dtype is not None else nullcontext()


def run_method(model: BaseModel, batch: TrainingBatch, method: str, dtype: torch.dtype | None = None) -> float | None:
    """Run one step (or forward piece) of `method`; returns the loss for training steps."""
    zero_grads(model)
    with autocast_for(model, dtype):
        if method == "reference":
            out = reference_objective(model, batch, CONFIGS["exact"])
        elif method in CONFIGS:
            out = sepen_objective(model, batch, CONFIGS[method])
        elif method == "floor":
            with torch.no_grad():
                capture_maps(model.unet, batch.latents, batch.timesteps, batch.cond, batch.targets).maps()
            return None
        elif method == "exact_fwd":
            # the exact step's forward, graph and loss included, without the backward
            out = sepen_objective(model, batch, CONFIGS["exact"])
            out.loss.total.detach()
            del out
            return None
        elif method == "full_fwd":
            with torch.no_grad():
                unet_forward(model.unet, batch.latents, batch.timesteps, batch.cond)
            return None
        else:
            raise ValueError(method)
    out.loss.total.backward()
    return float(out.loss.total.detach())


def synchronize(model: BaseModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def timed(model: BaseModel, batch: TrainingBatch, method: str, dtype: torch.dtype | None) -> tuple[float, float | None]:
    gc.collect()
    synchronize(model)
    start = time.perf_counter()
    loss = run_method(model, batch, method, dtype)
    synchronize(model)
    return time.perf_counter() - start, loss


# -- gradient check -------------------------------------------------------------------------------
def cosine_check(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """Per-layer cosine of `other`'s to_k gradients vs the reference's, over the layers the reference
    has a gradient for; a layer missing in `other` counts as cosine 0."""
    per_layer = {}
    for name, g in reference.items():
        h = other.get(name)
        if h is None:
            per_layer[name] = 0.0
        else:
            per_layer[name] = float(F.cosine_similarity(g.flatten().double(), h.flatten().double(), dim=0))
    extra = sorted(set(other) - set(reference))
    return {
        "min_cosine": min(per_layer.values()) if per_layer else 0.0,
        "layers": len(per_layer),
        "extra_layers": extra,
        "per_layer": per_layer,
    }


def gradient_check(
    model: BaseModel,
    batch: TrainingBatch,
    dtype: torch.dtype | None = None,
    reference_grads: dict | None = None,
    exact_grads: dict | None = None,
    local_grads: dict | None = None,
    losses: dict | None = None,
) -> dict:
    """Exact (and, for information, local) gradients vs the reference's; reuses grads already computed."""
    losses = dict(losses or {})
    if reference_grads is None:
        losses["reference"] = run_method(model, batch, "reference", dtype)
        reference_grads = key_grads(model)
    if exact_grads is None:
        losses["exact"] = run_method(model, batch, "exact", dtype)
        exact_grads = key_grads(model)
    if local_grads is None:
        losses["local"] = run_method(model, batch, "local", dtype)
        local_grads = key_grads(model)
    zero_grads(model)
    exact = cosine_check(reference_grads, exact_grads)
    # local trains only the capture layers' keys, each through its own maps: compare where it has grads
    local = cosine_check({k: v for k, v in reference_grads.items() if k in local_grads}, local_grads)
    return {
        "dtype": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "exact_min_cosine": exact["min_cosine"],
        "exact_layers": exact["layers"],
        "exact_extra_layers": exact["extra_layers"],
        "local_min_cosine": local["min_cosine"],
        "local_layers": local["layers"],
        "reference_layers": len(reference_grads),
        "losses": losses,
        "valid": exact["min_cosine"] >= COSINE_VALID and not exact["extra_layers"],
        "exact_per_layer": exact["per_layer"],
        "local_per_layer": local["per_layer"],
    }


# -- memory ---------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(args) -> dict:
    """In a fresh process: build the model, reset the RSS high-water mark, run one step, read the peak."""
    model = build_model(args.tiny, "cpu")
    batch = make_batch(model, args.resolutions[0], batch=args.batch)
    set_trainable(model)
    method = args.memory_child
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline = _proc_status_kib("VmRSS")
    run_method(model, batch, method, DTYPES[args.dtype])
    peak = _proc_status_kib("VmHWM")
    return {
        "method": method,
        "resolution": args.resolutions[0],
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "extra_mib": (peak - baseline) / 1024,
    }


def memory_cpu_subprocess(method: str, resolution: int, tiny: bool, dtype: str, batch: int = 1) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        method,
        "--resolutions",
        str(resolution),
        "--dtype",
        dtype,
        "--batch",
        str(batch),
    ]
    if tiny:
        cmd.append("--tiny")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line.removeprefix("MEMORY "))
    raise RuntimeError(
        f"memory child for {method} at {resolution} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


def memory_cuda(model: BaseModel, batch: TrainingBatch, method: str, dtype: torch.dtype | None) -> dict:
    zero_grads(model)
    gc.collect()
    torch.cuda.synchronize(model.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(model.device)
    baseline = torch.cuda.memory_allocated(model.device)
    run_method(model, batch, method, dtype)
    torch.cuda.synchronize(model.device)
    peak = torch.cuda.max_memory_allocated(model.device)
    zero_grads(model)
    return {
        "method": method,
        "baseline_mib": baseline / 2**20,
        "peak_mib": peak / 2**20,
        "extra_mib": (peak - baseline) / 2**20,
    }


# -- the benchmark --------------------------------------------------------------------------------
def bench_resolution(
    model: BaseModel,
    resolution: int,
    *,
    runs: int,
    warmup: int,
    dtype: torch.dtype | None,
    methods: tuple[str, ...] = ALL_METHODS,
    log=print,
    batch_size: int = 1,
) -> dict:
    """Time every method `runs` times after `warmup` rounds, alternating methods within each round."""
    batch = make_batch(model, resolution, batch=batch_size)
    times: dict[str, list[float]] = {m: [] for m in methods}
    load: list[float] = []  # 1-minute load average before each timed round: the machine is shared
    losses: dict[str, float | None] = {}
    grads: dict[str, dict] = {}
    for round_ in range(warmup + runs):
        if round_ >= warmup:
            load.append(os.getloadavg()[0])
        for method in methods:
            seconds, loss = timed(model, batch, method, dtype)
            label = "warm-up" if round_ < warmup else f"run {round_ - warmup + 1}/{runs}"
            shown_loss = f"  loss {loss:.6f}" if loss is not None else ""
            log(f"  {resolution}x{resolution} {method:<10} {label:<8} {seconds:8.3f} s{shown_loss}")
            if round_ >= warmup:
                times[method].append(seconds)
            if loss is not None:
                losses[method] = loss
                if round_ == 0 and method in STEP_METHODS:
                    grads[method] = key_grads(model)
            zero_grads(model)
    # Gradient check in fp32: reuse the warm-up grads when the timed dtype is fp32, else recompute.
    if dtype is None:
        check = gradient_check(
            model, batch, None, grads.get("reference"), grads.get("exact"), grads.get("local"), losses
        )
    else:
        check = gradient_check(model, batch, None)
        check_timed = gradient_check(
            model, batch, dtype, grads.get("reference"), grads.get("exact"), grads.get("local"), losses
        )
        check["timed_dtype"] = {k: check_timed[k] for k in ("dtype", "exact_min_cosine", "local_min_cosine", "losses")}
    log(
        f"  {resolution}x{resolution} gradient check (fp32): exact min cosine {check['exact_min_cosine']:.6f} over "
        f"{check['exact_layers']} layers -> {'VALID' if check['valid'] else 'INVALID'}; "
        f"local min cosine {check['local_min_cosine']:.4f} "
        f"over the {check['local_layers']} of {check['reference_layers']} layers it trains"
    )
    return {
        "resolution": resolution,
        "times_s": times,
        "median_s": {m: statistics.median(t) for m, t in times.items() if t},
        "min_s": {m: min(t) for m, t in times.items() if t},
        "losses": losses,
        "gradient_check": check,
        "load_1min": load,
    }


def run_benchmark(
    *,
    tiny: bool,
    device: str,
    dtype_name: str,
    resolutions: list[int],
    runs: int,
    warmup: int,
    memory: bool = True,
    log=print,
    model: BaseModel | None = None,
    batch_size: int = 1,
) -> dict:
    """The whole comparison; memory on CPU runs in fresh subprocesses after the timings."""
    dtype = DTYPES[dtype_name]
    started = time.perf_counter()
    if model is None:
        log(f"building {'tiny' if tiny else 'SD 1.5'} UNet (random weights) on {device} ...")
        model = build_model(tiny, device)
    set_trainable(model)
    weights_mib = sum(p.numel() * p.element_size() for p in model.unet.parameters()) / 2**20
    layers = map_layers(model.unet, 4)
    log(f"UNet weights {weights_mib:.0f} MiB; map layers: {len(layers)}; trained key layers: {len(model.base_keys)}")
    per_res = []
    for res in resolutions:
        result = bench_resolution(model, res, runs=runs, warmup=warmup, dtype=dtype, log=log, batch_size=batch_size)
        if memory and device.startswith("cuda"):
            batch = make_batch(model, res, batch=batch_size)
            result["memory"] = {m: memory_cuda(model, batch, m, dtype) for m in STEP_METHODS + ("floor",)}
        per_res.append(result)
    set_trainable(model, False)
    if memory and not device.startswith("cuda"):
        del model
        gc.collect()
        for result in per_res:
            result["memory"] = {}
            for m in STEP_METHODS:
                log(f"  {result['resolution']}x{result['resolution']} memory of {m} (fresh subprocess) ...")
                result["memory"][m] = memory_cpu_subprocess(m, result["resolution"], tiny, dtype_name, batch_size)
                log(f"    extra {result['memory'][m]['extra_mib']:.0f} MiB")
    setup = environment(tiny, device, dtype_name, runs, warmup, weights_mib)
    setup["batch"] = batch_size
    return {"setup": setup, "results": per_res, "wall_s": time.perf_counter() - started}


def environment(tiny: bool, device: str, dtype_name: str, runs: int, warmup: int, weights_mib: float) -> dict:
    env = {
        "model": "tiny_unet_config (cross_attention_dim 32)" if tiny else "SD 1.5 UNet architecture, random weights",
        "unet_weights_mib": round(weights_mib, 1),
        "device": device,
        "dtype": dtype_name,
        "weights_dtype": "fp32",
        "batch": 1,
        "runs": runs,
        "warmup": warmup,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "step": "forward + loss + backward into attn2.to_k (no optimizer step)",
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            env["cpu"] = next(
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            )
        except (OSError, StopIteration):
            env["cpu"] = platform.processor()
    return env


# -- report ---------------------------------------------------------------------------------------
def format_table(report: dict) -> str:
    b = report["setup"].get("batch", 1)
    setup = report["setup"]
    rows = [
        f"batch {b}, {setup['dtype']} on {setup.get('gpu') or setup.get('cpu', setup['device'])}",
        "",
        "| latent | method | median step (s) | speedup vs reference | best step (s) | best-vs-best speedup "
        "| extra memory (MiB) | memory vs reference | exact grads (min cos) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        res, med, mem = r["resolution"], r["median_s"], r.get("memory", {})
        check = r["gradient_check"]
        ref_t = med.get("reference")
        best = {m: min(t) for m, t in r["times_s"].items() if t}
        ref_m = mem.get("reference", {}).get("extra_mib")
        for m in STEP_METHODS:
            t = med.get(m)
            extra = mem.get(m, {}).get("extra_mib")
            if m == "reference":
                grad = "(yardstick)"
            elif m == "exact":
                grad = f"{check['exact_min_cosine']:.6f} {'valid' if check['valid'] else 'INVALID'}"
            else:
                grad = (
                    f"{check['local_min_cosine']:.4f} on its {check['local_layers']}/{check['reference_layers']} "
                    "layers (approximate by design)"
                )
            memory = f"{extra:.0f} | {extra / ref_m:.2f} |" if extra is not None and ref_m else "n/a | n/a |"
            rows.append(
                f"| {res}x{res} | {m} | {t:.3f} | {ref_t / t:.2f}x | {best[m]:.3f} | "
                f"{best['reference'] / best[m]:.2f}x | {memory} {grad} |"
            )
    rows.append("")
    rows.append(
        "| latent | floor: early-exit fwd, no_grad (s) | exact fwd only (s) | exact bwd (= step - fwd) (s) "
        "| full UNet fwd, no_grad (s) | exact / floor | local / floor |"
    )
    rows.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        med = r["median_s"]
        if not all(k in med for k in ("floor", "exact_fwd", "full_fwd")):
            continue
        rows.append(
            f"| {r['resolution']}x{r['resolution']} | {med['floor']:.3f} | {med['exact_fwd']:.3f} | "
            f"{med['exact'] - med['exact_fwd']:.3f} | {med['full_fwd']:.3f} | "
            f"{med['exact'] / med['floor']:.2f}x | {med['local'] / med['floor']:.2f}x |"
        )
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 32], help="latent sides (64 = 512 px)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="bf16: torch.autocast over fp32 weights"
    )
    parser.add_argument("--batch", type=int, default=1, help="samples per step (the paper trains with 4)")
    parser.add_argument("--tiny", action="store_true", help="tiny_unet_config(): a seconds-long smoke test")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--memory-child", choices=STEP_METHODS + ("floor",), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.memory_child:
        print("MEMORY " + json.dumps(memory_child(args)), flush=True)
        return None
    log = lambda s: print(s, flush=True)  # noqa: E731
    report = run_benchmark(
        tiny=args.tiny,
        device=args.device,
        dtype_name=args.dtype,
        resolutions=args.resolutions,
        runs=args.runs,
        warmup=args.warmup,
        memory=not args.no_memory,
        log=log,
        batch_size=args.batch,
    )
    report["command"] = "python bench/step_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = format_table(report)
    report["table_markdown"] = table
    print()
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
