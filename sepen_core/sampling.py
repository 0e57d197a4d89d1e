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
from diffusers import UNet2DConditionModel
from PIL import Image

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attend_excite import AttendExcite, AttendExciteConfig
from sepen_core.attention import CrossAttentionProcessor, MapRecorder, installed_processors, map_targets, unet_forward
from sepen_core.config import SampleConfig
from sepen_core.errors import Canceled, ConfigError
from sepen_core.heatmap import render_heatmaps
from sepen_core.images import png_bytes, sample_metadata, sampler_name
from sepen_core.models import BaseModel, TextConditioning
from sepen_core.scores import MapScores, object_scores


@dataclass
class GenerationResult:
    prompt: str
    images: list[Image.Image]
    pixels: torch.Tensor  # (N, 3, H, W) in [0, 1]
    seeds: list[int]
    concepts: list[str] = field(default_factory=list)
    maps: torch.Tensor | None = None  # (N, K, h, w), averaged over heads, layers and timesteps
    scores: list[MapScores] | None = None
    # step_scores[s][i]: image i's scores from the maps of denoising step s alone (when the object is decided)
    step_scores: list[list[MapScores]] | None = None
    latents: torch.Tensor | None = None  # (N, C, h, w): the final latents, before the VAE decodes them
    # How the images were made, for their PNG metadata: the settings, the model, its sampler, the adapter's name.
    config: SampleConfig | None = None
    model_id: str = ""
    sampler: str = ""
    adapter_name: str | None = None

    def image_metadata(
        self,
        index: int,
        *,
        model: str | None = None,
        adapter: str | None = None,
        adapter_name: str | None = None,
        **extra: str,
    ) -> dict[str, str]:
        """The PNG text chunks of image `index` (sepen_core.images.sample_metadata, with A1111's `parameters`).
        `model` and `adapter` name them as the caller knows them (the service's model name, `name@N`, a file);
        by default the model's id and the adapter's own name. `adapter_name`: how `parameters` names the adapter
        when `adapter` is a file path. `extra`: more entries (the service's job id)."""
        return sample_metadata(
            self.prompt,
            self.seeds[index],
            self.config or SampleConfig(),
            model=model or self.model_id,
            adapter=adapter if adapter is not None else self.adapter_name,
            size=self.images[index].size,
            sampler=self.sampler,
            adapter_name=adapter_name,
            **extra,
        )

    def png(self, index: int, **metadata) -> bytes:
        """Image `index` as a PNG file with its metadata (image_metadata's keywords)."""
        return png_bytes(self.images[index], self.image_metadata(index, **metadata))

    def heatmap(self, index: int) -> Image.Image:
        if self.maps is None or self.scores is None:
            raise ValueError("no attention maps were recorded: pass concepts= to generate()")
        peaks = [self.scores[index].peaks[c] for c in self.concepts]
        return render_heatmaps(self.images[index], self.maps[index], self.concepts, peaks)


def _latent_size(model: BaseModel, config: SampleConfig) -> tuple[int, int]:
    """The latents' (h, w) for the configured image size (default: the UNet's sample size)."""
    scale = model.vae_scale_factor
    height = config.height or model.unet.config.sample_size * scale
    width = config.width or model.unet.config.sample_size * scale
    if height % (scale * 8) or width % (scale * 8):
        raise ConfigError("height", f"height and width must be multiples of {scale * 8} for this model")
    return height // scale, width // scale


def _initial_noise(model: BaseModel, seeds: list[int], latent_size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w): image i starts from the noise of seeds[i] alone, so any image can be made again by itself."""
    shape = (1, model.unet.config.in_channels, *latent_size)
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return noise.to(model.device, model.dtype)


@dataclass
class _Denoiser:
    """One sampling run's denoising: the UNet, its own scheduler and the (classifier-free guided) conditioning."""

    unet: UNet2DConditionModel
    scheduler: object  # a fresh copy of the model's: schedulers are stateful
    cond: TextConditioning  # under guidance, the negative prompts' rows, then the prompts'
    guidance_scale: float
    step_kwargs: dict

    @classmethod
    def start(cls, model: BaseModel, config: SampleConfig, cond: TextConditioning, seed: int) -> _Denoiser:
        scheduler = type(model.scheduler).from_config(model.scheduler.config)
        scheduler.set_timesteps(config.num_inference_steps, device=model.device)
        if config.guidance_scale > 1.0:
            cond = TextConditioning.cat([model.encode_prompts([config.negative_prompt] * len(cond)), cond])
        # Stochastic schedulers draw their step noise from the first image's seed; deterministic ones take no generator.
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
        return cls(model.unet, scheduler, cond, config.guidance_scale, step_kwargs)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def step(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The latents one scheduler step later."""
        model_input = torch.cat([latents] * 2) if self.guided else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        noise_pred = unet_forward(self.unet, model_input, t, self.cond)
        if self.guided:
            uncond_pred, cond_pred = noise_pred.chunk(2)
            noise_pred = uncond_pred + self.guidance_scale * (cond_pred - uncond_pred)
        return self.scheduler.step(noise_pred, t, latents, **self.step_kwargs).prev_sample

    def denoise(
        self,
        latents: torch.Tensor,
        excite: AttendExcite | None,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> torch.Tensor:
        """Every step of the schedule from the initial noise (scaled here), polling should_cancel before each."""
        latents = latents * self.scheduler.init_noise_sigma
        timesteps = self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise Canceled(i)
            if excite is not None:
                latents = excite.update(latents, i, t)
            latents = self.step(latents, t)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        return latents


def _decode(model: BaseModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> (N, 3, H, W) pixels in [0, 1]; a model without a VAE samples in pixel space."""
    if model.vae is not None:
        latents = model.vae.decode(latents / model.latent_scaling_factor).sample
    return (latents.float() / 2 + 0.5).clamp(0, 1)


def _to_images(pixels: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((p.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)) for p in pixels]


@torch.no_grad()
def generate(
    model: BaseModel,
    prompt: str,
    config: SampleConfig | None = None,
    *,
    adapter: KeyProjectionAdapter | None = None,
    concepts: list[str] | None = None,
    attend_excite: AttendExciteConfig | None = None,
    on_step: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Sample config.num_images images of `prompt`; image i starts from the noise of seed config.seed + i.

    With an adapter, its keys are applied for this call only (the unconditional branch uses them
    too, as in the paper). With concepts, their maps and scores are recorded (conditional branch).
    With attend_excite (needs concepts), the latents are optimised at test time (the A&E baseline).
    on_step(i, total) is called after each step; should_cancel() is polled before each.
    """
    config = config or model.defaults.sample_config()
    concepts = list(concepts or [])
    latent_size = _latent_size(model, config)
    if attend_excite is not None and not concepts:
        raise ConfigError("concepts", "Attend-and-Excite needs the concepts whose attention it excites")
    n = config.num_images
    cond = model.encode_prompts([prompt] * n)
    targets = map_targets(model, cond, [concepts] * n, config.maps.map_downsample, latent_size) if concepts else None
    seeds = [config.seed + i for i in range(n)]
    denoiser = _Denoiser.start(model, config, cond, seeds[0])
    recorder = None if targets is None else MapRecorder(targets, rows=slice(n, 2 * n) if denoiser.guided else None)
    processors = {} if targets is None else {name: CrossAttentionProcessor(recorder) for name in targets.layers}
    excite = None
    if attend_excite is not None:
        excite = AttendExcite(attend_excite, model.unet, cond, targets, config.num_inference_steps)

    step_scores = None
    if recorder is not None:
        step_scores, mark = [], [recorder.mark()]

        def score_step(i: int, total: int) -> None:
            step_maps = recorder.maps_since(mark[0], config.maps.normalization).cpu()
            step_scores.append(object_scores(step_maps, [concepts] * n, config.maps.smoothing_sigma))
            mark[0] = recorder.mark()
            if on_step is not None:
                on_step(i, total)

    with adapter.applied(model) if adapter is not None else nullcontext(), installed_processors(model.unet, processors):
        latents = denoiser.denoise(
            _initial_noise(model, seeds, latent_size),
            excite,
            on_step if recorder is None else score_step,
            should_cancel,
        )
        pixels = _decode(model, latents)

    maps = None if recorder is None else recorder.maps(config.maps.normalization).cpu()
    scores = None if maps is None else object_scores(maps, [concepts] * n, config.maps.smoothing_sigma)
    return GenerationResult(
        prompt,
        _to_images(pixels),
        pixels.cpu(),
        seeds,
        concepts,
        maps,
        scores,
        step_scores,
        latents.cpu(),
        config=config,
        model_id=model.model_id,
        sampler=sampler_name(model.scheduler),
        adapter_name=None if adapter is None else str(adapter.metadata.get("name") or "sepen-adapter"),
    )
