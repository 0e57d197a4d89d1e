"""The naive SepEn step, kept as the yardstick for exactness tests and benchmarks: the whole UNet
runs to its output with explicit attention in every layer, and backward goes through all of it,
as the authors' release does. Never used for training.
"""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor

from sepen_core.attention import CrossAttentionProcessor, MapRecorder, installed_processors, unet_forward
from sepen_core.config import FinetuneConfig
from sepen_core.losses import sepen_loss
from sepen_core.models import BaseModel
from sepen_core.objective import StepOutput, TrainingBatch


def reference_objective(model: BaseModel, batch: TrainingBatch, config: FinetuneConfig) -> StepOutput:
    """SepEn loss through a full forward with explicit attention everywhere (no early exit, no prior loss)."""
    unet, maps_cfg = model.unet, config.maps
    recorder = MapRecorder(batch.targets)
    explicit = {key.removesuffix(".processor"): AttnProcessor() for key in unet.attn_processors}
    explicit.update({name: CrossAttentionProcessor(recorder) for name in batch.targets.layers})
    with installed_processors(unet, explicit):
        unet_forward(unet, batch.latents, batch.timesteps, batch.cond)
    maps = recorder.maps(maps_cfg.normalization)
    loss = sepen_loss(
        maps,
        batch.targets.valid,
        lambda_sep=config.lambda_sep,
        lambda_en=config.lambda_en,
        sigma=maps_cfg.smoothing_sigma,
    )
    return StepOutput(loss, maps.detach())
