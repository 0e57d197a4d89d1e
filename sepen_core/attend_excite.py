"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023), the test-time baseline SepEn is compared with:
during the first denoising steps, move the latents down the gradient of a loss that lifts the
weakest object token's smoothed attention peak, refining further at a few steps until each object's
peak passes a threshold. Our own implementation of the published algorithm; it reuses the early-exit
map capture, so each update costs a forward up to the last map layer plus its backward.

A&E's maps: attention over the prompt's tokens without the start token, re-softmaxed with
temperature 1/100 over the content tokens, averaged over the map layers; smoothed (3x3 Gaussian,
sigma 0.5); loss = max over objects of (1 - peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sepen_core.attention import MapTargets, capture_maps
from sepen_core.losses import peak_activation
from sepen_core.models import TextConditioning


@dataclass(frozen=True)
class AttendExciteConfig:
    """Published defaults for 50 steps; indices scale with the number of sampling steps."""

    steps_to_alter: float = 0.5  # fraction of the sampling steps that update the latents (25 of 50)
    scale_factor: float = 20.0  # step size alpha_t = scale_factor * sqrt(linspace(1.0, 0.5)[i])
    scale_range: tuple[float, float] = (1.0, 0.5)
    # Refinement at fractions of the schedule (steps 0, 10, 20 of 50): until every object's peak >= threshold.
    refinement: dict[float, float] = field(default_factory=lambda: {0.0: 0.05, 0.2: 0.5, 0.4: 0.8})
    max_refinement_steps: int = 20
    temperature: float = 100.0
    smoothing_sigma: float = 0.5


class AttendExcite:
    """Latent updates for one sampling run: call `update(latents, i, t)` before each denoising step."""

    def __init__(self, config: AttendExciteConfig, unet, cond: TextConditioning, targets: MapTargets, num_steps: int):
        self.config = config
        self.unet = unet
        self.cond = cond  # conditional branch only, one row per image
        self.targets = targets  # one row per image
        self.steps_to_alter = round(config.steps_to_alter * num_steps)
        self.step_sizes = config.scale_factor * torch.linspace(*config.scale_range, num_steps).sqrt()
        self.refine_at = {
            round(f * num_steps): thr
            for f, thr in config.refinement.items()
            if round(f * num_steps) < self.steps_to_alter
        }
        self.updates = 0  # latent updates made, refinements included (their cost is the method's cost)

    def peaks(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(N, K) smoothed peaks of each object's A&E map; differentiable w.r.t. latents."""
        timesteps = t.expand(latents.shape[0]) if t.ndim == 0 else t
        recorder = capture_maps(self.unet, latents, timesteps, self.cond, self.targets, keep_tokens=True)
        probs = recorder.token_probs()  # (N, H*W, T)
        content = self.targets.content_mask.to(probs).bool()  # (N, T)
        logits = (probs * self.config.temperature).masked_fill(~content[:, None, :], float("-inf"))
        renormalised = logits.softmax(dim=-1).nan_to_num(0.0)  # (N, H*W, T) over content tokens only
        maps = torch.einsum("bnt,bkt->bkn", renormalised, self.targets.concept_mask.to(probs))  # (N, K, H*W)
        maps = maps.reshape(*maps.shape[:2], *self.targets.grid)  # (N, K, h, w)
        return peak_activation(maps, self.config.smoothing_sigma)

    def _descend(
        self, latents: torch.Tensor, t: torch.Tensor, size: float, threshold: float | None
    ) -> tuple[torch.Tensor, bool]:
        """One gradient step on the images whose weakest peak is below `threshold` (all of them if None).
        Returns the latents and whether any image still needed the step."""
        latents = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            peaks = self.peaks(latents, t)  # (N, K)
            losses = (1 - peaks).amax(dim=1)  # (N,) the weakest object's shortfall
            if threshold is None:
                active = torch.ones_like(losses, dtype=torch.bool)
            else:
                active = peaks.amin(dim=1) < threshold
            if not active.any():
                return latents.detach(), False
            (grad,) = torch.autograd.grad(losses.sum(), latents)  # images are independent: per-image gradients
        self.updates += 1
        return latents.detach() - size * grad * active.to(grad.dtype)[:, None, None, None], True

    def update(self, latents: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        """The latents to denoise at step i (unchanged after the first steps_to_alter steps)."""
        if i >= self.steps_to_alter:
            return latents
        size = float(self.step_sizes[i])
        if i in self.refine_at:
            for _ in range(self.config.max_refinement_steps):
                latents, moved = self._descend(latents, t, size, self.refine_at[i])
                if not moved:
                    break
        latents, _ = self._descend(latents, t, size, None)
        return latents
