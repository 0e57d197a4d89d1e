"""The SepEn losses (METHOD.md section 2) and the map statistics they are read with, as pure functions.

Shapes: maps are (B, K, H, W): B samples, K objects per sample, an H x W attention map each.
`valid` (B, K) marks the real objects when samples name different numbers of objects; None
means all K are real. Losses return one value per sample, (B,), unless stated otherwise.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SEPARATE_EPS = 1e-6  # keeps M1*M2/(M1+M2) finite where both maps are 0, in fp16 too


def gaussian_kernel(sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """(size, size) normalised Gaussian, as Attend-and-Excite smooths its maps."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = torch.outer(g, g)
    return kernel / kernel.sum()


def smooth_maps(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Depthwise 3x3 Gaussian smoothing with reflect padding 1: (B, K, H, W) -> (B, K, H, W)."""
    b, k, h, w = maps.shape
    kernel = gaussian_kernel(sigma).to(maps)[None, None]  # (1, 1, 3, 3)
    flat = maps.reshape(b * k, 1, h, w)  # each object map is its own channel
    padded = F.pad(flat, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel).reshape(b, k, h, w)


def _pairs(valid: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """All object pairs (i < j) and a (B, P) mask of pairs whose two objects are real."""
    pairs = list(itertools.combinations(range(valid.shape[1]), 2))
    if not pairs:  # a single object: no pair, no overlap
        return pairs, valid.new_zeros((valid.shape[0], 0))
    pair_valid = torch.stack([valid[:, i] & valid[:, j] for i, j in pairs], dim=1)
    return pairs, pair_valid


def _stack_pairs(values: list[torch.Tensor], maps: torch.Tensor) -> torch.Tensor:
    """(B, P) from P per-pair (B,) values; (B, 0) when there is no pair."""
    return torch.stack(values, dim=1) if values else maps.new_zeros((maps.shape[0], 0))


def _valid(maps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones(maps.shape[:2], dtype=torch.bool, device=maps.device)
    return valid.to(maps.device)


def _mean_over_pairs(per_pair: torch.Tensor, pair_valid: torch.Tensor) -> torch.Tensor:
    """(B, P) values, (B, P) mask -> (B,) mean over each sample's real pairs."""
    kept = torch.where(pair_valid, per_pair, torch.zeros_like(per_pair))  # where, not *: padded pairs may be NaN
    return kept.sum(dim=1) / pair_valid.sum(dim=1).clamp_min(1).to(per_pair.dtype)


def separate_loss(maps: torch.Tensor, valid: torch.Tensor | None = None, eps: float = SEPARATE_EPS) -> torch.Tensor:
    """L_sep = max_pixels(M_i * M_j / (M_i + M_j + eps)), averaged over object pairs i < j.

    maps (B, K, H, W) unsmoothed, K >= 2 -> (B,). The soft intersection at the worst pixel: high
    when two objects claim the same pixels (the objects fuse).
    """
    valid = _valid(maps, valid)
    pairs, pair_valid = _pairs(valid)
    flat = maps.flatten(2)  # (B, K, H*W)
    per_pair = _stack_pairs(
        [(flat[:, i] * flat[:, j] / (flat[:, i] + flat[:, j] + eps)).amax(dim=-1) for i, j in pairs], maps
    )  # (B, P)
    return _mean_over_pairs(per_pair, pair_valid)


def peak_activation(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Each object's peak after Gaussian smoothing: (B, K, H, W) -> (B, K). The paper's activation score."""
    return smooth_maps(maps, sigma).flatten(2).amax(dim=-1)


def enhance_loss(maps: torch.Tensor, valid: torch.Tensor | None = None, sigma: float = 0.5) -> torch.Tensor:
    """L_en = 1 - min_k max_pixels(G * M_k): lifts the weakest object's smoothed peak. (B, K, H, W) -> (B,)."""
    valid = _valid(maps, valid)
    peaks = peak_activation(maps, sigma).masked_fill(~valid, math.inf)  # (B, K)
    return 1 - peaks.amin(dim=1)


def soft_iou(maps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Overlap of object maps: sum(min(M_i, M_j)) / sum(max(M_i, M_j)), averaged over pairs. (B, K, H, W) -> (B,).

    Reported beside L_sep because L_sep also grows with the maps' magnitude (TOYWORLD.md).
    """
    return pairwise_iou(maps, valid)[0]


def pairwise_iou(maps: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair soft IoU: returns (mean over pairs (B,), per pair (B, P)) in itertools.combinations order."""
    valid = _valid(maps, valid)
    pairs, pair_valid = _pairs(valid)
    flat = maps.flatten(2)
    per_pair = _stack_pairs(
        [
            torch.minimum(flat[:, i], flat[:, j]).sum(-1)
            / torch.maximum(flat[:, i], flat[:, j]).sum(-1).clamp_min(1e-12)
            for i, j in pairs
        ],
        maps,
    )  # (B, P)
    return _mean_over_pairs(per_pair, pair_valid), per_pair


def prior_loss(noise_pred: torch.Tensor, base_noise_pred: torch.Tensor) -> torch.Tensor:
    """L_norm = mse(eps_theta(x_t, t, c_single), eps_base(x_t, t, c_single)): a scalar, mean over all elements."""
    return F.mse_loss(noise_pred.float(), base_noise_pred.float())


@dataclass
class SepenLoss:
    total: torch.Tensor  # scalar that is back-propagated
    separate: torch.Tensor  # scalar, batch mean of L_sep
    enhance: torch.Tensor  # scalar, batch mean of L_en
    prior: torch.Tensor | None = None
    teacher: torch.Tensor | None = None  # the teacher's denoising loss (recipe teacher_weight > 0)


def sepen_loss(
    maps: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    lambda_sep: float = 1.0,
    lambda_en: float = 0.5,
    sigma: float = 0.5,
) -> SepenLoss:
    """L = lambda_sep * mean_batch(L_sep) + lambda_en * mean_batch(L_en); maps (B, K, H, W), K >= 2."""
    maps = maps.float()
    sep = separate_loss(maps, valid).mean()
    en = enhance_loss(maps, valid, sigma).mean()
    return SepenLoss(lambda_sep * sep + lambda_en * en, sep, en)
