"""Diagnose a prompt: each object's peak activation and each pair's overlap (the paper's two failure
signals, METHOD.md section 1), measured on the same data-free pseudo-latents SepEn trains on,
at timesteps spread evenly over the schedule, with or without an adapter.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.attention import capture_maps, map_targets
from sepen_core.config import MapConfig
from sepen_core.losses import separate_loss
from sepen_core.models import BaseModel
from sepen_core.objective import pseudo_latents
from sepen_core.scores import MapScores, mean_scores, object_scores


@dataclass(frozen=True)
class Diagnosis(MapScores):
    """A prompt's map scores averaged over its samples (peaks, overlaps, min_peak), and what was measured."""

    prompt: str
    concepts: list[str]
    separate_loss: float  # mean L_sep
    samples: int
    normalization: str
    adapter: str | None = None


@torch.no_grad()
def diagnose(
    model: BaseModel,
    prompt: str,
    concepts: list[str],
    *,
    adapter: KeyProjectionAdapter | None = None,
    samples: int = 16,
    seed: int = 0,
    maps: MapConfig | None = None,
    latent_size: int | None = None,
    chunk: int = 8,
) -> Diagnosis:
    """Average the object maps' statistics over `samples` pseudo-latents x_t (t evenly spaced)."""
    maps_cfg = maps or model.defaults.sample_config().maps
    size = latent_size or model.unet.config.sample_size
    cond = model.encode_prompts([prompt], (size, size)).select([0] * samples)
    targets = map_targets(model, cond, [concepts] * samples, maps_cfg.map_downsample, (size, size))
    num_train = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, num_train - 1, samples).round().long()
    latents, _ = pseudo_latents(model, samples, size, torch.Generator().manual_seed(seed), timesteps)

    all_maps = []
    with adapter.applied(model) if adapter is not None else nullcontext():
        for start in range(0, samples, chunk):
            rows = list(range(start, min(start + chunk, samples)))
            recorder = capture_maps(
                model.unet,
                latents[rows].to(model.device, model.dtype),
                timesteps[rows].to(model.device),
                cond.select(rows),
                targets.select(rows),
            )
            all_maps.append(recorder.maps(maps_cfg.normalization).cpu())
    object_maps = torch.cat(all_maps)  # (samples, K, h, w)
    scores = mean_scores(object_scores(object_maps, [concepts] * samples, maps_cfg.smoothing_sigma))
    return Diagnosis(
        peaks=scores.peaks,
        overlaps=scores.overlaps,
        min_peak=scores.min_peak,
        prompt=prompt,
        concepts=list(concepts),
        separate_loss=float(separate_loss(object_maps).mean()),
        samples=samples,
        normalization=maps_cfg.normalization,
        adapter=None if adapter is None else adapter.metadata.get("name", "adapter"),
    )
