"""Base-training data: a seeded mix of single-object and training-pair scenes, with empty captions for guidance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from toyworld.world import World, caption, render_scene


@dataclass(frozen=True)
class DataMix:
    """What one training image is. With the defaults: 60% single objects, 30% two objects, 10% empty captions.

    Scene kinds are drawn first (pairs and triples from the world's training pairs only: a held-out
    pair is never drawn together), then each caption is dropped with empty_caption_fraction, keeping
    its image (classifier-free guidance dropout).
    """

    pair_fraction: float = 1 / 3
    triple_fraction: float = 0.0  # three nouns whose three pairs are all training pairs
    empty_caption_fraction: float = 0.1

    def __post_init__(self):
        if not (
            0 <= self.pair_fraction and 0 <= self.triple_fraction and self.pair_fraction + self.triple_fraction <= 1
        ):
            raise ValueError("DataMix: pair_fraction and triple_fraction must be >= 0 with a sum <= 1")
        if not 0 <= self.empty_caption_fraction < 1:
            raise ValueError("DataMix: empty_caption_fraction must be in [0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]  # "" where the caption was dropped
    nouns: list[tuple[str, ...]]  # what each image shows, caption dropped or not


def sample_nouns(world: World, mix: DataMix, rng: np.random.Generator) -> tuple[str, ...]:
    """The nouns of one training scene, in caption order."""
    kind = rng.random()
    if kind < mix.triple_fraction:
        triples = world.train_triples()
        group = triples[int(rng.integers(len(triples)))]
    elif kind < mix.triple_fraction + mix.pair_fraction:
        group = world.train_pairs[int(rng.integers(len(world.train_pairs)))]
    elif len({g.frequency for g in world.glyphs}) == 1:  # world v1: uniform (this draw keeps its runs reproducible)
        group = (world.nouns[int(rng.integers(len(world.nouns)))],)
    else:  # world v2: singles at the nouns' Zipf-like frequencies
        weights = np.array([g.frequency for g in world.glyphs])
        group = (world.nouns[int(rng.choice(len(weights), p=weights / weights.sum()))],)
    return tuple(group[i] for i in rng.permutation(len(group)))


def training_batch(world: World, mix: DataMix, batch_size: int, seed: int) -> Batch:
    """The same seed always gives the same batch (train.py seeds each step's batch from the run seed and step)."""
    rng = np.random.default_rng(seed)
    images, captions, nouns = [], [], []
    for _ in range(batch_size):
        group = sample_nouns(world, mix, rng)
        image, _ = render_scene(world, group, int(rng.integers(2**63 - 1)))
        images.append(image)
        nouns.append(group)
        captions.append("" if rng.random() < mix.empty_caption_fraction else caption(group))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, H, W, 3) -> (B, 3, H, W)
    return Batch(pixels, captions, nouns)
