"""The base-training data mix."""

from collections import Counter

import torch

from toyworld.data import DataMix, training_batch
from toyworld.world import caption, load_world


def test_batches_are_seeded_pixels_in_range_with_matching_captions():
    world = load_world()
    batch = training_batch(world, DataMix(), 16, seed=3)
    again = training_batch(world, DataMix(), 16, seed=3)
    assert batch.images.shape == (16, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1 and batch.images.max() <= 1 and (batch.images == -1).float().mean() > 0.5
    assert torch.equal(batch.images, again.images) and batch.captions == again.captions
    for text, nouns in zip(batch.captions, batch.nouns, strict=True):
        assert text in ("", caption(nouns))


def test_mix_has_the_intended_proportions_and_never_a_heldout_pair():
    world = load_world()
    mix = DataMix(pair_fraction=1 / 3, triple_fraction=0.05, empty_caption_fraction=0.1)
    kinds, captions, seen_pairs = Counter(), Counter(), set()
    for seed in range(150):
        batch = training_batch(world, mix, 32, seed)
        for text, nouns in zip(batch.captions, batch.nouns, strict=True):
            kinds[len(nouns)] += 1
            captions["empty" if text == "" else "captioned"] += 1
            assert len(set(nouns)) == len(nouns)
            for i, a in enumerate(nouns):
                for b in nouns[i + 1 :]:
                    assert not world.is_heldout(a, b), f"held-out pair {a}+{b} in the training data"
                    seen_pairs.add(frozenset((a, b)))
    total = sum(kinds.values())
    assert abs(kinds[2] / total - 1 / 3) < 0.03 and abs(kinds[3] / total - 0.05) < 0.015
    assert abs(captions["empty"] / total - 0.1) < 0.02
    assert seen_pairs == {frozenset(p) for p in world.train_pairs}
