"""Text-to-image sampling with or without an adapter: seeded, classifier-free guidance, the model's
own scheduler; optionally records the per-object attention maps over the whole trajectory.

The loop follows diffusers' StableDiffusionPipeline step for step (a test checks the images are
the same), so an adapter behaves here exactly as it does in a plain diffusers pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attend_excite import AttendExcite, AttendExciteConfig
from sepen_core.attention import CrossAttentionProcessor, MapRecorder, installed_processors, map_layers, unet_forward
from sepen_core.concepts import concept_token_mask, content_token_mask, locate_concepts
from sepen_core.config import SampleConfig
from sepen_core.errors import Canceled, ConfigError
from sepen_core.heatmap import render_heatmaps
from sepen_core.losses import pairwise_iou, peak_activation
from sepen_core.models import BaseModel, TextConditioning


@dataclass
class ObjectScores:
    """The paper's two failure signals for one image: each object's peak activation and each pair's overlap."""

    peaks: dict[str, float]
    overlaps: dict[str, float]  # "a & b" -> soft IoU

    @property
    def min_peak(self) -> float:
        return min(self.peaks.values())

    def to_dict(self) -> dict:
        return {"peaks": self.peaks, "overlaps": self.overlaps, "min_peak": self.min_peak}


def object_scores(maps: torch.Tensor, concepts: list[str], sigma: float) -> list[ObjectScores]:
    """maps (N, K, h, w) -> per-image ObjectScores."""
    peaks = peak_activation(maps, sigma)  # (N, K)
    _, per_pair = pairwise_iou(maps)  # (N, P)
    pairs = [(a, b) for i, a in enumerate(concepts) for b in concepts[i + 1 :]]
    return [ObjectScores({c: float(peaks[n, k]) for k, c in enumerate(concepts)},
                         {f"{a} & {b}": float(per_pair[n, p]) for p, (a, b) in enumerate(pairs)})
            for n in range(maps.shape[0])]


@dataclass
class GenerationResult:
    prompt: str
    images: list[Image.Image]
    pixels: torch.Tensor  # (N, 3, H, W) in [0, 1]
    seeds: list[int]
    concepts: list[str] = field(default_factory=list)
    maps: torch.Tensor | None = None  # (N, K, h, w), averaged over heads, layers and timesteps
    scores: list[ObjectScores] | None = None

    def heatmap(self, index: int) -> Image.Image:
        if self.maps is None or self.scores is None:
            raise ValueError("no attention maps were recorded: pass concepts= to generate()")
        peaks = [self.scores[index].peaks[c] for c in self.concepts]
        return render_heatmaps(self.images[index], self.maps[index], self.concepts, peaks)


def _decode(model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> (N, 3, H, W) pixels in [0, 1]; a model without a VAE samples in pixel space."""
    if model.vae is not None:
        latents = model.vae.decode(latents / model.latent_scaling_factor).sample
    return (latents.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate(model: BaseModel, prompt: str, config: SampleConfig | None = None, *,
             adapter: KeyProjectionAdapter | None = None, concepts: list[str] | None = None,
             attend_excite: AttendExciteConfig | None = None, on_step: Callable[[int, int], None] | None = None, should_cancel: Callable[[], bool] | None = None) -> GenerationResult:
    """Sample config.num_images images of `prompt`; image i starts from the noise of seed config.seed + i.

    With an adapter, its keys are applied for this call only (the unconditional branch uses them
    too, as in the paper). With concepts, their maps and scores are recorded (conditional branch).
    With attend_excite (needs concepts), the latents are optimised at test time (the A&E baseline).
    """
    config = config or model.defaults.sample_config()
    concepts = list(concepts or [])
    positions = locate_concepts(model.tokenizer, prompt, concepts) if concepts else []
    unet, n = model.unet, config.num_images
    scale = model.vae_scale_factor
    height = config.height or unet.config.sample_size * scale
    width = config.width or unet.config.sample_size * scale
    if height % (scale * 8) or width % (scale * 8):
        raise ConfigError("height", f"height and width must be multiples of {scale * 8} for this model")
    guided = config.guidance_scale > 1.0

    cond = model.encode_prompts([prompt] * n)
    batch_cond = TextConditioning.cat([model.encode_prompts([config.negative_prompt] * n), cond]) if guided else cond
    seeds = [config.seed + i for i in range(n)]
    shape = (1, unet.config.in_channels, height // scale, width // scale)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    scheduler = type(model.scheduler).from_config(model.scheduler.config)  # schedulers are stateful: one per call
    scheduler.set_timesteps(config.num_inference_steps, device=model.device)
    latents = noise.to(model.device, model.dtype) * scheduler.init_noise_sigma

    recorder, processors = None, {}
    if concepts:
        concept_mask, _ = concept_token_mask([positions] * n, cond.input_ids.shape[1])
        content_mask = content_token_mask(cond.input_ids, model.tokenizer.eos_token_id)
        d = config.maps.map_downsample
        recorder = MapRecorder(concept_mask, content_mask, (latents.shape[-2] // d, latents.shape[-1] // d),
                               rows=slice(n, 2 * n) if guided else None)
        processors = {name: CrossAttentionProcessor(recorder) for name in map_layers(unet, d)}

    excite = None
    if attend_excite is not None:
        if not concepts:
            raise ConfigError("concepts", "Attend-and-Excite needs the concepts whose attention it excites")
        d = config.maps.map_downsample
        excite = AttendExcite(attend_excite, unet, cond, concept_mask, content_mask, map_layers(unet, d), d,
                              config.num_inference_steps)

    # Stochastic schedulers draw their step noise from the first image's seed; deterministic ones take no generator.
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": torch.Generator().manual_seed(seeds[0])} if takes_generator else {}
    with adapter.applied(model) if adapter is not None else nullcontext(), installed_processors(unet, processors):
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise Canceled(i)
            if excite is not None:
                latents = excite.update(latents, i, t)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = unet_forward(unet, model_input, t, batch_cond)
            if guided:
                uncond_pred, cond_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + config.guidance_scale * (cond_pred - uncond_pred)
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        pixels = _decode(model, latents)

    images = [Image.fromarray((p.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)) for p in pixels]
    result = GenerationResult(prompt, images, pixels.cpu(), seeds, concepts)
    if recorder is not None:
        result.maps = recorder.maps(config.maps.normalization).cpu()
        result.scores = object_scores(result.maps, concepts, config.maps.smoothing_sigma)
    return result

