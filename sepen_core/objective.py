"""One SepEn training step's inputs and loss: data-free latents (the paper's Gaussian pseudo-latents, or a pool of
the model's own samples or sampling trajectories, or Attend-and-Excite's samples as a teacher), the early-exit forward
that reads the maps (exact or local gradients), plus the optional prior and teacher losses.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sepen_core.attention import MapTargets, base_key_forward, capture_maps, map_targets, unet_forward
from sepen_core.checkpoints import step_seed
from sepen_core.concepts import locate_concepts
from sepen_core.config import FinetuneConfig
from sepen_core.errors import Canceled
from sepen_core.losses import SepenLoss, prior_loss, sepen_loss
from sepen_core.models import BaseModel, TextConditioning
from sepen_core.prompts import ConceptSet, TrainingPrompt, fill_template


def pseudo_latents(
    model: BaseModel, count: int, size: int, generator: torch.Generator, timesteps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free noisy latents x_t (METHOD.md section 4): a Gaussian x0 = randn * the VAE's scaling factor
    stands in for encoded images, noised at `timesteps` (None: drawn uniformly, after both noises).
    Returns (x_t (count, C, size, size), t (count,)) on the CPU."""
    shape = (count, model.unet.config.in_channels, size, size)
    clean = torch.randn(shape, generator=generator) * model.latent_scaling_factor
    return noised(model, clean, generator, timesteps)


def noised(
    model: BaseModel, clean: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t): clean x0 (N, C, h, w) noised by the model's training schedule at `timesteps` (None: uniform)."""
    noisy, timesteps, _ = _noised(model, clean, generator, timesteps)
    return noisy, timesteps


def _noised(
    model: BaseModel, clean: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, the noise added)."""
    noise = torch.randn(clean.shape, generator=generator)
    if timesteps is None:
        num_train = model.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train, (clean.shape[0],), generator=generator)
    return model.noise_scheduler.add_noise(clean, noise, timesteps), timesteps, noise


def denoising_target(
    model: BaseModel, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict for clean x0 noised with `noise` at `timesteps`, in its own parametrisation
    (epsilon, v or x0): the teacher loss's target."""
    kind = model.noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return model.noise_scheduler.get_velocity(clean, noise, timesteps)
    return clean


@dataclass(frozen=True)
class LatentPool:
    """Samples made once before training, each step's latents (every recipe latents source but "pseudo")."""

    prompts: list[TrainingPrompt]
    # (N, C, h, w) on the CPU, prompts[i]'s: clean samples ("generated", "attend-excite"), or noisy latents of the
    # base model's trajectories ("trajectory") with their timesteps
    latents: torch.Tensor
    timesteps: torch.Tensor | None = None  # (N,) "trajectory": each latent's; otherwise None
    window: torch.Tensor | None = None  # (S,) "attend-excite": the window's timesteps, where clean samples are noised


def window_steps(config: FinetuneConfig, num_steps: int) -> tuple[int, ...]:
    """The 0-based sampling steps of config.trajectory_window (at least one)."""
    start, end = config.trajectory_window
    steps = tuple(i for i in range(num_steps) if start * num_steps <= i < end * num_steps)
    return steps or (min(int(start * num_steps), num_steps - 1),)


def generated_pool(
    model: BaseModel, concepts: ConceptSet, config: FinetuneConfig, should_cancel: Callable[[], bool] | None = None
) -> LatentPool:
    """config.latent_pool samples of prompts drawn like training prompts, with the model's current keys and
    its own sampling settings (with Attend-and-Excite for latents="attend-excite"), config.batch_size images per
    sampling call (memory stays a training step's); the same seed always gives the same pool (a resumed run remakes
    it). latents="trajectory" keeps each sample's latents at every window step instead of its end."""
    from sepen_core.attend_excite import AttendExciteConfig  # sampling imports what this module does: import late
    from sepen_core.sampling import generate

    rng = random.Random(step_seed(config.seed, POOL_STEP))
    prompts = [concepts.sample(rng) for _ in range(config.latent_pool)]
    size = config.latent_size or model.unet.config.sample_size
    side = size * model.vae_scale_factor
    by_text: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_text.setdefault(prompt.prompt, []).append(i)
    calls = [
        (text, rows[k : k + config.batch_size])
        for text, rows in by_text.items()
        for k in range(0, len(rows), config.batch_size)
    ]
    teacher = AttendExciteConfig() if config.latents == "attend-excite" else None
    steps = window_steps(config, model.defaults.sample_config().num_inference_steps)
    latents: list[torch.Tensor | None] = [None] * len(prompts)
    trajectories: list[dict[int, tuple[int, torch.Tensor]]] = [{}] * len(prompts)
    for j, (text, rows) in enumerate(calls):
        sample = model.defaults.sample_config(
            {
                "num_images": len(rows),
                "seed": step_seed(config.seed, POOL_STEP + 1 + j) % (2**31 - 4096),
                "height": side,
                "width": side,
            }
        )
        try:
            result = generate(
                model,
                text,
                sample,
                concepts=list(prompts[rows[0]].concepts) if teacher else None,
                attend_excite=teacher,
                record_steps=steps,
                should_cancel=should_cancel,
            )
        except Canceled:
            raise Canceled(0) from None  # no training step ran yet
        for k, row in enumerate(rows):
            latents[row] = result.latents[k]
            trajectories[row] = {i: (t, x[k]) for i, (t, x) in result.trajectory.items()}
    window = torch.tensor([trajectories[0][i][0] for i in steps])
    if config.latents != "trajectory":
        return LatentPool(prompts, torch.stack(latents), window=window if teacher else None)
    return LatentPool(
        [p for p in prompts for _ in steps],
        torch.stack([trajectory[i][1] for trajectory in trajectories for i in steps]),
        timesteps=window.repeat(len(prompts)),
    )


POOL_STEP = 2**40  # the pool's seeds come from step numbers no training step reaches


@dataclass
class TrainingBatch:
    prompts: list[TrainingPrompt]
    latents: torch.Tensor  # (B, C, h, w) noisy pseudo-latents x_t
    timesteps: torch.Tensor  # (B,)
    cond: TextConditioning  # multi-object prompts
    targets: MapTargets  # where each prompt's object maps are read
    prior_cond: TextConditioning | None = None  # single-object prompts, when the prior loss is on
    teacher_target: torch.Tensor | None = None  # (B, C, h, w) the teacher's denoising target, when its loss is on


def check_concepts(model: BaseModel, concepts: ConceptSet) -> None:
    """Fail before training if any concept cannot be located in any prompt it will appear in."""
    if concepts.groups:
        samples = [(g, t) for g in concepts.groups for t in concepts.templates_for(len(g))]
    else:
        pool = concepts.training_concepts
        partners = {c: pool[(i + 1) % len(pool)] for i, c in enumerate(pool)}
        samples = [((c, partners[c]), t) for c in pool for t in concepts.templates_for(2)]  # held-out ones never train
        samples += [((partners[c], c), t) for c in pool for t in concepts.templates_for(2)]
    for group, template in samples:
        locate_concepts(model.tokenizer, fill_template(template, group), group)


def make_training_batch(
    model: BaseModel, concepts: ConceptSet, config: FinetuneConfig, step: int, pool: LatentPool | None = None
) -> TrainingBatch:
    """This step's prompts and noisy latents: pseudo-latents, or (with a pool) the pool's samples and their prompts."""
    rng = random.Random(step_seed(config.seed, step))
    generator = torch.Generator().manual_seed(step_seed(config.seed, step))
    size = config.latent_size or model.unet.config.sample_size
    teacher_target = None
    if pool is None:
        prompts = [concepts.sample(rng) for _ in range(config.batch_size)]
        latents, timesteps = pseudo_latents(model, config.batch_size, size, generator)
    elif pool.timesteps is not None:  # trajectory latents, already noisy
        rows = [rng.randrange(len(pool.prompts)) for _ in range(config.batch_size)]
        prompts = [pool.prompts[r] for r in rows]
        latents, timesteps = pool.latents[rows].float(), pool.timesteps[rows]
    else:
        rows = [rng.randrange(len(pool.prompts)) for _ in range(config.batch_size)]
        prompts = [pool.prompts[r] for r in rows]
        clean = pool.latents[rows].float()
        at = None if pool.window is None else pool.window[[rng.randrange(len(pool.window)) for _ in rows]]
        latents, timesteps, noise = _noised(model, clean, generator, at)
        if config.teacher_weight > 0:
            teacher_target = denoising_target(model, clean, noise, timesteps)
    cond = model.encode_prompts([p.prompt for p in prompts], (size, size))
    targets = map_targets(model, cond, [p.concepts for p in prompts], config.maps.map_downsample, (size, size))
    prior_cond = (
        model.encode_prompts([p.prior_prompt for p in prompts], (size, size)) if config.prior_weight > 0 else None
    )
    return TrainingBatch(
        prompts,
        latents.to(model.device, model.dtype),
        timesteps.to(model.device),
        cond,
        targets,
        prior_cond,
        None if teacher_target is None else teacher_target.to(model.device),
    )


@dataclass
class StepOutput:
    loss: SepenLoss
    maps: torch.Tensor  # (B, K, H, W), detached


def sepen_objective(model: BaseModel, batch: TrainingBatch, config: FinetuneConfig) -> StepOutput:
    """The SepEn loss of one batch, ready for backward (plus the prior loss when its weight is > 0)."""
    maps_cfg = config.maps
    recorder = capture_maps(
        model.unet,
        batch.latents,
        batch.timesteps,
        batch.cond,
        batch.targets,
        local_gradients=config.grad_mode == "local",
        compile=config.compile,
    )
    maps = recorder.maps(maps_cfg.normalization)
    loss = sepen_loss(
        maps,
        batch.targets.valid,
        lambda_sep=config.lambda_sep,
        lambda_en=config.lambda_en,
        sigma=maps_cfg.smoothing_sigma,
    )
    if config.prior_weight > 0:
        noise_pred = unet_forward(model.unet, batch.latents, batch.timesteps, batch.prior_cond)
        base_pred = base_key_forward(model.unet, model.base_keys, batch.latents, batch.timesteps, batch.prior_cond)
        loss.prior = prior_loss(noise_pred, base_pred)
        loss.total = loss.total + config.prior_weight * loss.prior
    if batch.teacher_target is not None:
        prediction = unet_forward(model.unet, batch.latents, batch.timesteps, batch.cond)
        loss.teacher = F.mse_loss(prediction.float(), batch.teacher_target.float())
        loss.total = loss.total + config.teacher_weight * loss.teacher
    return StepOutput(loss, maps.detach())
