"""Attend-and-Excite (Chefer et al., SIGGRAPH 2023), the test-time baseline SepEn is compared with:
during the first denoising steps, move the latents down the gradient of a loss that lifts the
weakest object token's smoothed attention peak, refining further at a few steps until each object's
peak passes a threshold. Our own implementation of the published algorithm, checked step by step
against diffusers' StableDiffusionAttendAndExcitePipeline (tests/core/test_attend_excite_reference.py;
docs/method.md lists what differs on purpose); it reuses the early-exit map capture, so each update
costs a forward up to the last map layer plus its backward.

A&E's maps: attention averaged over heads and the map layers, re-softmaxed with temperature 1/100 over
every token but the start token and the last position (as the reference, and the authors' SD 1.x runs)
or over the prompt's tokens only (`token_softmax="prompt"`, the authors' SD 2.x runs); smoothed with
the reference's 3x3 kernel; loss = max over objects of (1 - peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sepen_core.attention import MapTargets, capture_maps
from sepen_core.config import AE_MAX_REFINEMENT_STEPS, AE_REFINEMENT, AE_STEPS_TO_ALTER, SampleConfig
from sepen_core.errors import ConfigError
from sepen_core.losses import peak_activation
from sepen_core.models import TextConditioning

TOKEN_SOFTMAXES = ("all", "prompt")
# The reference's kernel exp(-((x - mean) / (2 * sigma))**2) at its sigma 0.5 is a Gaussian of standard
# deviation 0.5 * sqrt(2); SepEn's Enhance loss keeps METHOD.md's sigma 0.5 (losses.gaussian_kernel).
REFERENCE_SMOOTHING_SIGMA = 0.5 * math.sqrt(2)


@dataclass(frozen=True)
class AttendExciteConfig:
    """Published defaults for 50 steps; indices scale with the number of sampling steps."""

    steps_to_alter: float = AE_STEPS_TO_ALTER  # fraction of the sampling steps that update the latents (25 of 50)
    scale_factor: float = 20.0  # step size alpha_t = scale_factor * sqrt(linspace(1.0, 0.5)[i])
    scale_range: tuple[float, float] = (1.0, 0.5)
    # Refinement at fractions of the schedule (steps 0, 10, 20 of 50): until every object's peak >= threshold.
    refinement: dict[float, float] = field(default_factory=lambda: dict(AE_REFINEMENT))
    max_refinement_steps: int = AE_MAX_REFINEMENT_STEPS
    temperature: float = 100.0
    smoothing_sigma: float = REFERENCE_SMOOTHING_SIGMA
    # "all": tokens 1 .. T-2 (end and padding tokens included), as diffusers and the authors' SD 1.x runs;
    # "prompt": the prompt's tokens between start and end token, the authors' setting for SD 2.x (normalize_eot).
    token_softmax: str = "all"

    def __post_init__(self) -> None:
        if self.token_softmax not in TOKEN_SOFTMAXES:
            raise ConfigError("token_softmax", f"must be one of {TOKEN_SOFTMAXES}, not {self.token_softmax!r}")


def attend_excite_config(config: SampleConfig) -> AttendExciteConfig | None:
    """The A&E settings a sampling config asks for (guidance_method "attend-excite": the published schedule with its
    excite_scale as step size), or None."""
    if config.guidance_method != "attend-excite":
        return None
    return AttendExciteConfig(scale_factor=float(config.excite_scale))


class AttendExcite:
    """Latent updates for one sampling run: call `update(latents, i, t)` before each denoising step."""

    def __init__(self, config: AttendExciteConfig, unet, cond: TextConditioning, targets: MapTargets, num_steps: int):
        self.config = config
        self.unet = unet
        self.cond = cond  # conditional branch only, one row per image
        self.targets = targets  # one row per image
        self.steps_to_alter = round(config.steps_to_alter * num_steps)
        # float64, as the reference's numpy schedule
        self.step_sizes = (
            config.scale_factor * torch.linspace(*config.scale_range, num_steps, dtype=torch.float64).sqrt()
        )
        self.refine_at = {
            round(f * num_steps): thr
            for f, thr in config.refinement.items()
            if round(f * num_steps) < self.steps_to_alter
        }
        self.updates = 0  # latent updates made, refinements included (their cost is the method's cost)

    def _softmax_tokens(self, probs: torch.Tensor, targets: MapTargets) -> torch.Tensor:
        """(N, T) mask of the tokens A&E's softmax runs over."""
        if self.config.token_softmax == "prompt":
            return targets.content_mask.to(probs).bool()
        tokens = torch.zeros(probs.shape[::2], dtype=torch.bool, device=probs.device)  # (N, T)
        tokens[:, 1:-1] = True  # the reference's attention_maps[:, :, 1:-1]
        return tokens

    def peaks(self, latents: torch.Tensor, t: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """(N, K) smoothed peaks of each object's A&E map; differentiable w.r.t. latents. With rows, latents are
        those images' only."""
        cond, targets = (
            (self.cond, self.targets) if rows is None else (self.cond.select(rows), self.targets.select(rows))
        )
        timesteps = t.expand(latents.shape[0]) if t.ndim == 0 else t
        recorder = capture_maps(self.unet, latents, timesteps, cond, targets, keep_tokens=True)
        probs = recorder.token_probs()  # (N, H*W, T)
        tokens = self._softmax_tokens(probs, targets)  # (N, T)
        logits = (probs * self.config.temperature).masked_fill(~tokens[:, None, :], float("-inf"))
        renormalised = logits.softmax(dim=-1).nan_to_num(0.0)  # (N, H*W, T), 0 outside the softmax's tokens
        maps = torch.einsum("bnt,bkt->bkn", renormalised, targets.concept_mask.to(probs))  # (N, K, H*W)
        maps = maps.reshape(*maps.shape[:2], *targets.grid)  # (N, K, h, w)
        return peak_activation(maps, self.config.smoothing_sigma)

    def _loss_gradient(
        self, latents: torch.Tensor, t: torch.Tensor, rows: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) losses max_k(max(0, 1 - peak)) and their gradient w.r.t. latents, per image (of rows only)."""
        latents = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            losses = (1 - self.peaks(latents, t, rows)).clamp_min(0).amax(dim=1)  # (N,) the weakest object's shortfall
            (grad,) = torch.autograd.grad(losses.sum(), latents)  # images are independent: per-image gradients
        return losses.detach(), grad

    def _step(self, latents: torch.Tensor, grad: torch.Tensor, size: float, rows: torch.Tensor) -> torch.Tensor:
        """latents - size * grad on the images in rows (N,) bool."""
        self.updates += 1
        return latents.detach() - size * grad * rows.to(grad.dtype)[:, None, None, None]

    def update(self, latents: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        """The latents to denoise at step i (unchanged after the first steps_to_alter steps)."""
        if i >= self.steps_to_alter:
            return latents
        size = float(self.step_sizes[i])
        losses, grad = self._loss_gradient(latents, t)
        if i in self.refine_at:
            target = 1.0 - self.refine_at[i]
            refining = losses > target  # (N,) as the reference: refine an image whose weakest peak is short
            for _ in range(self.config.max_refinement_steps):
                if not refining.any():
                    break
                moved = refining.nonzero().squeeze(1).tolist()
                latents = self._step(latents, grad, size, refining)
                # The reference decides on another iteration by the loss before this update, so each image makes
                # one update more than "until the threshold is passed": matched, not improved on.
                refining = refining & (losses > target)
                # Only the moved images are measured again: the others' latents, losses and gradients are as they were.
                losses[moved], grad[moved] = self._loss_gradient(latents[moved], t, moved)
        return self._step(latents, grad, size, losses > 0)  # the reference skips an update at zero loss
