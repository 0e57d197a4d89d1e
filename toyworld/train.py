"""Train the toy base model from scratch (UNet and text encoder jointly, v-prediction, EMA), with checkpoints, resume.

    python -m toyworld.train --out runs/toy --steps 10000 [--eval-every 1000] [--bf16]

Every step's batch, timesteps and noise come from a seed derived from (seed, step), and a
checkpoint holds the weights, the EMA weights and the AdamW moments, so a resumed run continues
where the interrupted one stopped. The result is DIR/model (the EMA weights, via
BaseModel.save_pretrained) with training.json and world.json inside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sepen_core.attention import unet_forward
from sepen_core.checkpoints import read_checkpoint_state, restore_checkpoint, step_seed, write_checkpoint
from sepen_core.errors import CheckpointError
from sepen_core.models import BaseModel, load_base_model
from toyworld.data import DataMix, training_batch
from toyworld.evaluate import EvalConfig, evaluate, preview_grid
from toyworld.judge import name_judge
from toyworld.model import ToyModelConfig, build_toy_model, trainable_conditioning
from toyworld.world import WORLD_FILE, World, load_world


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    # The learning rate stays at its peak, then follows a cosine down to min_lr_ratio over the last
    # decay_fraction of steps.
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the forward pass (weights, loss and optimiser stay fp32)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: DataMix = field(default_factory=DataMix)
    # A saved model (DIR/model of an earlier run) whose weights start this run instead of a random init: a warm
    # start with a fresh optimiser and warmup, for a run that a session's time cut short.
    init_from: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Identifies a run for resuming; `steps` is left out so that a finished run can be extended."""
        settings = {**self.to_dict(), "steps": None}
        if self.init_from is None:  # runs from before warm starts existed keep their fingerprint
            del settings["init_from"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def warm_start(model: BaseModel, source: Path) -> None:
    """Copy a saved toy model's UNet and text-encoder weights into `model` (same ToyModelConfig required)."""
    saved = load_base_model(source)
    for name in ("unet", "text_encoder"):
        mine, theirs = getattr(model, name).state_dict(), getattr(saved, name).state_dict()
        if {k: v.shape for k, v in mine.items()} != {k: v.shape for k, v in theirs.items()}:
            raise CheckpointError(f"{source}: its {name} has another shape than this run's model config")
        getattr(model, name).load_state_dict(theirs)


@dataclass(frozen=True)
class Cadence:
    """How often a run logs, writes a checkpoint and evaluates, in steps (eval_every 0: only at the end).
    Not part of TrainConfig: a run may be resumed with another cadence."""

    log_every: int = 50
    checkpoint_every: int = 500
    eval_every: int = 0


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup, constant, then a cosine down to min_lr_ratio over the last decay_fraction of the run."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    decay_start = config.steps * (1 - config.decay_fraction)
    if step < decay_start:
        return config.learning_rate
    progress = min(1.0, (step - decay_start) / max(1.0, config.steps - decay_start))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


class EMA:
    """Exponential moving average of named parameters, with the usual warmup of the decay."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        # One multi-tensor kernel per step on a GPU instead of one launch per parameter.
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach() for p in self.params.values()], 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the averaged ones (call twice to undo)."""
        for name, p in self.params.items():
            live = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name] = live


def trained_parameters(model: BaseModel) -> dict[str, torch.nn.Parameter]:
    return {
        **{f"unet.{k}": p for k, p in model.unet.named_parameters()},
        **{f"text_encoder.{k}": p for k, p in model.text_encoder.named_parameters()},
    }


def training_loss(model: BaseModel, world: World, config: TrainConfig, step: int) -> torch.Tensor:
    """Mean squared error of the v-prediction on this step's batch."""
    seed = step_seed(config.seed, step)
    batch = training_batch(world, config.data, config.batch_size, seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = model.noise_scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
    noise = torch.randn(batch.images.shape, generator=generator)
    device = model.device
    images, noise, timesteps = (t.to(device, non_blocking=True) for t in (batch.images, noise, timesteps))
    noisy = scheduler.add_noise(images, noise, timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(images, noise, timesteps) if v_prediction else noise
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
        cond = trainable_conditioning(model, batch.captions)
        prediction = unet_forward(model.unet, noisy, timesteps, cond)
    return F.mse_loss(prediction.float(), target)


def save_checkpoint(
    directory: Path,
    step: int,
    config: TrainConfig,
    params: dict,
    ema: EMA,
    optimizer: torch.optim.AdamW,
    evals: list[dict],
) -> None:
    """Weights, AdamW moments and the EMA weights (as extras) through sepen_core.checkpoints."""
    write_checkpoint(
        directory,
        step,
        params,
        optimizer,
        {"run": config.fingerprint(), "evals": evals},
        extra={f"ema/{name}": shadow for name, shadow in ema.shadow.items()},
    )


def load_checkpoint(
    directory: Path, config: TrainConfig, params: dict, ema: EMA, optimizer: torch.optim.AdamW
) -> tuple[int, list[dict]]:
    state = read_checkpoint_state(directory)
    if state is None:
        return 0, []
    if state["run"] != config.fingerprint():
        raise CheckpointError(f"{directory} holds a checkpoint of another run (other settings)")
    tensors = restore_checkpoint(directory, state, params, optimizer)
    with torch.no_grad():
        for name in params:
            ema.shadow[name].copy_(tensors[f"ema/{name}"])
    return int(state["step"]), state["evals"]


def run_eval(model: BaseModel, world: World, ema: EMA, eval_config: EvalConfig, directory: Path, step: int) -> dict:
    """Evaluate the EMA weights and write a preview grid beside the checkpoints."""
    began = time.perf_counter()
    ema.swap()
    try:
        results, previews = evaluate(model, world, eval_config)
    finally:
        ema.swap()
    preview_grid(previews).save(directory / f"eval-{step:07d}.png")
    summary = {
        "step": step,
        "seconds": round(time.perf_counter() - began, 1),
        "config": eval_config.to_dict(),
        "results": results,
    }
    print(json.dumps({"eval_step": step, **{g: round(r["success"], 3) for g, r in results.items()}}), flush=True)
    return summary


def train(
    directory: str | Path,
    config: TrainConfig,
    *,
    world: World | None = None,
    eval_config: EvalConfig | None = None,
    cadence: Cadence = Cadence(),
    device: str = "cpu",
    time_budget_s: float | None = None,
) -> Path:
    """Train (or resume) into `directory`; returns the saved model's directory. eval_config None: no evaluation.
    Raises CheckpointError when `directory` holds a checkpoint of a run with other settings.

    time_budget_s (a borrowed GPU, a session's CPU): after 50 steps, and every 200 steps until the learning
    rate starts to decay, set `steps` (at most the requested number) to what fits in the budget at the pace
    of the last (up to) 200 steps, so the schedule still ends with its decay and the run ends with a saved
    model on time even when the machine's load changes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    world = world or load_world()
    model = build_toy_model(config.model, seed=config.seed)
    if config.init_from is not None:
        warm_start(model, Path(config.init_from))
    model = model.to(device)
    model.unet.train()
    model.text_encoder.train()
    params = trained_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:  # TF32 matmuls and convolutions: the toy model trains in fp32, and TF32 is ample for it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.AdamW(
        params.values(),
        lr=config.learning_rate,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
        fused=on_gpu or None,  # one fused kernel on a GPU; PyTorch's own choice elsewhere
    )
    ema = EMA(params, config.ema_decay)
    start, evals = load_checkpoint(directory, config, params, ema, optimizer)
    log_file = directory / "log.jsonl"
    if start and log_file.exists():  # forget what was logged after the checkpoint: those steps run again
        rows = [line for line in log_file.read_text().splitlines() if json.loads(line)["step"] <= start]
        log_file.write_text("".join(row + "\n" for row in rows))
    resuming = f", resuming at step {start}" if start else ""
    print(f"training {config.steps} steps into {directory}{resuming}", flush=True)

    began, window, window_began = time.perf_counter(), [], time.perf_counter()
    step, requested_steps, pace_mark = start, config.steps, (start, time.perf_counter())
    while step < config.steps:
        replan = step - start >= 50 and (step - start) % 200 == 50 and step < config.steps * (1 - config.decay_fraction)
        if time_budget_s is not None and replan:
            pace = (time.perf_counter() - pace_mark[1]) / (step - pace_mark[0])  # the recent pace: the load changes
            pace_mark = (step, time.perf_counter())
            left = time_budget_s - (time.perf_counter() - began)
            fits = min(requested_steps, max(step + 1, step + int(left / pace)))
            if fits != config.steps:
                config = dataclasses.replace(config, steps=fits)
                print(
                    f"time budget {time_budget_s:.0f}s at {pace * 1000:.1f} ms/step: training {config.steps} steps",
                    flush=True,
                )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = training_loss(model, world, config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
        optimizer.step()
        ema.update(step)
        window.append(loss.detach())  # read at log time: .item() every step would wait for the GPU every step
        done = step + 1
        if done % cadence.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            row = {
                "step": done,
                "loss": round(torch.stack(window).mean().item(), 5),
                "lr": learning_rate(config, step),
                "seconds_per_step": round((now - window_began) / len(window), 3),
                "elapsed": round(now - began, 1),
            }
            with log_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            window, window_began = [], now
        if eval_config is not None and cadence.eval_every and done % cadence.eval_every == 0 and done != config.steps:
            evals.append(run_eval(model, world, ema, eval_config, directory, done))
            window_began = time.perf_counter()
        if done % cadence.checkpoint_every == 0 or done == config.steps:
            save_checkpoint(directory, done, config, params, ema, optimizer, evals)
        step = done

    if eval_config is not None and not any(e["step"] == config.steps for e in evals):
        evals.append(run_eval(model, world, ema, eval_config, directory, config.steps))
        save_checkpoint(directory, config.steps, config, params, ema, optimizer, evals)
    ema.swap()  # the saved model is the EMA
    model.unet.eval()
    model.text_encoder.eval()
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    (model_dir / "world.json").write_text(json.dumps(world.to_dict(), indent=1) + "\n")
    name_judge(model_dir)  # sepen evaluate and POST /evaluate read its detector
    log = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
    speeds = [row["seconds_per_step"] for row in log[1:]] or [row["seconds_per_step"] for row in log]
    summary = {
        "config": config.to_dict(),
        "seed": config.seed,
        "data_mix": config.data.to_dict(),
        "steps": config.steps,
        "threads": torch.get_num_threads(),
        "median_seconds_per_step": float(np.median(speeds)) if speeds else None,
        "parameters": {
            "unet": sum(p.numel() for p in model.unet.parameters()),
            "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
        },
        "final_loss": log[-1]["loss"] if log else None,
        "evals": evals,
    }
    (model_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {model_dir}", flush=True)
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world base model from scratch.")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, log.jsonl, eval previews, model/")
    parser.add_argument("--world", default=str(WORLD_FILE), help="the world's definition (world.json, world-v2.json)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    parser.add_argument("--warmup", type=int, default=TrainConfig.warmup_steps)
    parser.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (about 25%% faster on a CPU with avx512_bf16)"
    )
    parser.add_argument("--pair-fraction", type=float, default=DataMix.pair_fraction)
    parser.add_argument("--triple-fraction", type=float, default=DataMix.triple_fraction)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: only at the end)")
    parser.add_argument(
        "--eval-samples", type=int, default=EvalConfig.samples_per_group, help="per group; 0 skips evaluation"
    )
    parser.add_argument("--eval-guidance", type=float, default=EvalConfig.guidance_scale)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--time-budget", type=float, help="seconds: shorten the run to fit (see train())")
    parser.add_argument("--init-from", help="start from this saved model's weights (a warm start; see TrainConfig)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        ema_decay=args.ema_decay,
        seed=args.seed,
        bf16=args.bf16,
        data=DataMix(pair_fraction=args.pair_fraction, triple_fraction=args.triple_fraction),
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
    )
    eval_config = None
    if args.eval_samples > 0:
        eval_config = EvalConfig(samples_per_group=args.eval_samples, guidance_scale=args.eval_guidance)
    cadence = Cadence(log_every=args.log_every, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every)
    try:
        train(
            args.out,
            config,
            world=load_world(args.world),
            eval_config=eval_config,
            cadence=cadence,
            device=args.device,
            time_budget_s=args.time_budget,
        )
    except CheckpointError as exc:
        raise SystemExit(f"{exc}; use another --out") from None


if __name__ == "__main__":
    main()
