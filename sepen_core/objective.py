"""One SepEn training step's inputs and loss: data-free pseudo-latents (METHOD.md section 4) and the
early-exit forward that reads the maps (exact or local gradients), plus the optional prior loss.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from sepen_core.attention import base_key_forward, capture_maps, map_layers, unet_forward
from sepen_core.concepts import concept_token_mask, content_token_mask, locate_concepts
from sepen_core.config import FinetuneConfig
from sepen_core.losses import SepenLoss, peak_activation, prior_loss, sepen_loss, soft_iou
from sepen_core.models import BaseModel, TextConditioning
from sepen_core.prompts import ConceptSet, TrainingPrompt, fill_template


def step_seed(seed: int, step: int) -> int:
    """Each step draws from its own seed, so a resumed run replays exactly what it would have drawn."""
    return (seed * 1_000_003 + step * 7_919) % (2**63)


@dataclass
class TrainingBatch:
    prompts: list[TrainingPrompt]
    latents: torch.Tensor  # (B, C, h, w) noisy pseudo-latents x_t
    timesteps: torch.Tensor  # (B,)
    cond: TextConditioning  # multi-object prompts
    concept_mask: torch.Tensor  # (B, K, T)
    valid: torch.Tensor  # (B, K) real objects
    content_mask: torch.Tensor  # (B, T)
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


def make_training_batch(model: BaseModel, concepts: ConceptSet, config: FinetuneConfig, step: int) -> TrainingBatch:
    rng = random.Random(step_seed(config.seed, step))
    generator = torch.Generator().manual_seed(step_seed(config.seed, step))
    prompts = [concepts.sample(rng) for _ in range(config.batch_size)]
    size = config.latent_size or model.unet.config.sample_size
    shape = (config.batch_size, model.unet.config.in_channels, size, size)
    clean = torch.randn(shape, generator=generator) * model.latent_scaling_factor  # pseudo-clean x0: no images
    noise = torch.randn(shape, generator=generator)
    num_train = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train, (config.batch_size,), generator=generator)
    latents = model.noise_scheduler.add_noise(clean, noise, timesteps)

    cond = model.encode_prompts([p.prompt for p in prompts])
    positions = [locate_concepts(model.tokenizer, p.prompt, p.concepts) for p in prompts]
    concept_mask, valid = concept_token_mask(positions, cond.input_ids.shape[1])
    content_mask = content_token_mask(cond.input_ids, model.tokenizer.eos_token_id)
    prior_cond = model.encode_prompts([p.prior_prompt for p in prompts]) if config.prior_weight > 0 else None
    device, dtype = model.device, model.dtype
    return TrainingBatch(prompts, latents.to(device, dtype), timesteps.to(device), cond, concept_mask.to(device),
                         valid.to(device), content_mask.to(device), prior_cond)


@dataclass
class StepOutput:
    loss: SepenLoss
    maps: torch.Tensor  # (B, K, H, W), detached


def sepen_objective(model: BaseModel, batch: TrainingBatch, config: FinetuneConfig) -> StepOutput:
    """The SepEn loss of one batch, ready for backward (plus the prior loss when its weight is > 0)."""
    maps_cfg = config.maps
    layers = map_layers(model.unet, maps_cfg.map_downsample)
    recorder = capture_maps(model.unet, batch.latents, batch.timesteps, batch.cond, batch.concept_mask,
                            batch.content_mask, layers, maps_cfg.map_downsample,
                            local_gradients=config.grad_mode == "local")
    maps = recorder.maps(maps_cfg.normalization)
    loss = sepen_loss(maps, batch.valid, lambda_sep=config.lambda_sep, lambda_en=config.lambda_en,
                      sigma=maps_cfg.smoothing_sigma)
    if config.prior_weight > 0:
        noise_pred = unet_forward(model.unet, batch.latents, batch.timesteps, batch.prior_cond)
        base_pred = base_key_forward(model.unet, model.base_keys, batch.latents, batch.timesteps, batch.prior_cond)
        loss.prior = prior_loss(noise_pred, base_pred)
        loss.total = loss.total + config.prior_weight * loss.prior
    return StepOutput(loss, maps.detach())


def map_statistics(prompts: list[TrainingPrompt], maps: torch.Tensor, valid: torch.Tensor, sigma: float) -> dict:
    """Per-concept mean peak activation, the weakest object's mean peak, and mean soft IoU of a batch."""
    peaks = peak_activation(maps, sigma)  # (B, K)
    per_concept: dict[str, list[float]] = {}
    for b, prompt in enumerate(prompts):
        for k, concept in enumerate(prompt.concepts):
            per_concept.setdefault(concept, []).append(float(peaks[b, k]))
    weakest = peaks.masked_fill(~valid, float("inf")).amin(dim=1)
    return {"peaks": {c: sum(v) / len(v) for c, v in per_concept.items()},
            "min_peak": float(weakest.mean()), "overlap": float(soft_iou(maps, valid).mean())}

