"""One SepEn training step's inputs and loss: data-free pseudo-latents (METHOD.md section 4) and the
early-exit forward that reads the maps (exact or local gradients), plus the optional prior loss.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

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
    noise = torch.randn(clean.shape, generator=generator)
    if timesteps is None:
        num_train = model.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_train, (clean.shape[0],), generator=generator)
    return model.noise_scheduler.add_noise(clean, noise, timesteps), timesteps


@dataclass(frozen=True)
class LatentPool:
    """The base model's own samples of training prompts (recipe latents="generated"), each step's clean x0."""

    prompts: list[TrainingPrompt]
    latents: torch.Tensor  # (N, C, h, w) on the CPU: prompts[i]'s sample


def generated_pool(
    model: BaseModel, concepts: ConceptSet, config: FinetuneConfig, should_cancel: Callable[[], bool] | None = None
) -> LatentPool:
    """config.latent_pool samples of prompts drawn like training prompts, with the model's current keys and
    its own sampling settings, config.batch_size images per sampling call (memory stays a training step's);
    the same seed always gives the same pool (a resumed run remakes it)."""
    from sepen_core.sampling import generate  # sampling imports what this module does: import it late

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
    latents: list[torch.Tensor | None] = [None] * len(prompts)
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
            result = generate(model, text, sample, should_cancel=should_cancel)
        except Canceled:
            raise Canceled(0) from None  # no training step ran yet
        for row, latent in zip(rows, result.latents, strict=True):
            latents[row] = latent
    return LatentPool(prompts, torch.stack(latents))


POOL_STEP = 2**40  # the pool's seeds come from step numbers no training step reaches


@dataclass
class TrainingBatch:
    prompts: list[TrainingPrompt]
    latents: torch.Tensor  # (B, C, h, w) noisy pseudo-latents x_t
    timesteps: torch.Tensor  # (B,)
    cond: TextConditioning  # multi-object prompts
    targets: MapTargets  # where each prompt's object maps are read
    prior_cond: TextConditioning | None = None  # single-object prompts, when the prior loss is on


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
    if pool is None:
        prompts = [concepts.sample(rng) for _ in range(config.batch_size)]
        latents, timesteps = pseudo_latents(model, config.batch_size, size, generator)
    else:
        rows = [rng.randrange(len(pool.prompts)) for _ in range(config.batch_size)]
        prompts = [pool.prompts[r] for r in rows]
        latents, timesteps = noised(model, pool.latents[rows].float(), generator)
    cond = model.encode_prompts([p.prompt for p in prompts], (size, size))
    targets = map_targets(model, cond, [p.concepts for p in prompts], config.maps.map_downsample, (size, size))
    prior_cond = (
        model.encode_prompts([p.prior_prompt for p in prompts], (size, size)) if config.prior_weight > 0 else None
    )
    return TrainingBatch(
        prompts, latents.to(model.device, model.dtype), timesteps.to(model.device), cond, targets, prior_cond
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
    return StepOutput(loss, maps.detach())
