"""The naive SepEn step, kept as the yardstick for exactness tests and benchmarks: the whole UNet
runs to its output with explicit attention in every layer, and backward goes through all of it,
as the authors' release does. Never used for training.
"""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor

from sepen_core.attention import CrossAttentionProcessor, MapRecorder, installed_processors, map_layers, unet_forward
from sepen_core.config import FinetuneConfig
from sepen_core.losses import sepen_loss
from sepen_core.models import BaseModel
from sepen_core.objective import StepOutput, TrainingBatch


def reference_objective(model: BaseModel, batch: TrainingBatch, config: FinetuneConfig) -> StepOutput:
    """SepEn loss through a full forward with explicit attention everywhere (no early exit, no prior loss)."""
    unet, maps_cfg = model.unet, config.maps
    layers = map_layers(unet, maps_cfg.map_downsample)
    grid = (batch.latents.shape[-2] // maps_cfg.map_downsample, batch.latents.shape[-1] // maps_cfg.map_downsample)
    recorder = MapRecorder(batch.concept_mask, batch.content_mask, grid)
    explicit = {key.removesuffix(".processor"): AttnProcessor() for key in unet.attn_processors}
    explicit.update({name: CrossAttentionProcessor(recorder) for name in layers})
    with installed_processors(unet, explicit):
        unet_forward(unet, batch.latents, batch.timesteps, batch.cond)
    maps = recorder.maps(maps_cfg.normalization)
    loss = sepen_loss(maps, batch.valid, lambda_sep=config.lambda_sep, lambda_en=config.lambda_en,
                      sigma=maps_cfg.smoothing_sigma)
    return StepOutput(loss, maps.detach())
