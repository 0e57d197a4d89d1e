"""Diagnose a prompt: each object's peak activation and each pair's overlap (the paper's two failure
signals, METHOD.md section 1), measured on the same data-free pseudo-latents SepEn trains on,
at timesteps spread evenly over the schedule, with or without an adapter.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attention import capture_maps, map_layers
from sepen_core.concepts import concept_token_mask, content_token_mask, locate_concepts
from sepen_core.config import MapConfig
from sepen_core.losses import separate_loss
from sepen_core.models import BaseModel
from sepen_core.sampling import object_scores


@dataclass
class Diagnosis:
    prompt: str
    concepts: list[str]
    peaks: dict[str, float]  # mean smoothed peak activation per object
    min_peak: float  # mean over samples of the weakest object's peak
    overlaps: dict[str, float]  # "a & b" -> mean soft IoU
    separate_loss: float  # mean L_sep
    samples: int
    normalization: str
    adapter: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def diagnose(model: BaseModel, prompt: str, concepts: list[str], *, adapter: KeyProjectionAdapter | None = None,
             samples: int = 16, seed: int = 0, maps: MapConfig | None = None, latent_size: int | None = None,
             chunk: int = 8) -> Diagnosis:
    """Average the object maps' statistics over `samples` pseudo-latents x_t (t evenly spaced)."""
    maps_cfg = maps or model.defaults.sample_config().maps
    positions = locate_concepts(model.tokenizer, prompt, concepts)
    layers = map_layers(model.unet, maps_cfg.map_downsample)
    size = latent_size or model.unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    num_train = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, num_train - 1, samples).round().long()
    shape = (samples, model.unet.config.in_channels, size, size)
    clean = torch.randn(shape, generator=generator) * model.latent_scaling_factor
    latents = model.noise_scheduler.add_noise(clean, torch.randn(shape, generator=generator), timesteps)
    cond_one = model.encode_prompts([prompt])

    all_maps = []
    with adapter.applied(model) if adapter is not None else nullcontext():
        for start in range(0, samples, chunk):
            rows = list(range(start, min(start + chunk, samples)))
            cond = cond_one.select([0] * len(rows))
            concept_mask, _ = concept_token_mask([positions] * len(rows), cond.input_ids.shape[1])
            content_mask = content_token_mask(cond.input_ids, model.tokenizer.eos_token_id)
            recorder = capture_maps(model.unet, latents[rows].to(model.device, model.dtype), timesteps[rows].to(model.device),
                                    cond, concept_mask, content_mask, layers, maps_cfg.map_downsample)
            all_maps.append(recorder.maps(maps_cfg.normalization).cpu())
    object_maps = torch.cat(all_maps)  # (samples, K, h, w)
    scores = object_scores(object_maps, list(concepts), maps_cfg.smoothing_sigma)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return Diagnosis(
        prompt, list(concepts),
        peaks={c: mean([s.peaks[c] for s in scores]) for c in concepts},
        min_peak=mean([s.min_peak for s in scores]),
        overlaps={p: mean([s.overlaps[p] for s in scores]) for p in scores[0].overlaps},
        separate_loss=float(separate_loss(object_maps).mean()),
        samples=samples, normalization=maps_cfg.normalization,
        adapter=None if adapter is None else adapter.metadata.get("name", "adapter"),
    )
