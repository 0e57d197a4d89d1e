"""The toy world's data file, renderer and captions."""

from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from sepen_core.models import load_clip_tokenizer
from toyworld.data import DataMix, sample_nouns
from toyworld.make_world import build_world
from toyworld.world import SHAPES, caption, load_world, render_scene

V2_FILE = Path(__file__).parents[2] / "toyworld" / "world-v2.json"


def test_every_noun_is_one_clip_token_with_its_own_colour():
    world = load_world()
    tokenizer = load_clip_tokenizer()
    for noun in world.nouns:
        assert len(tokenizer(noun).input_ids) == 3, f"{noun!r} is not a single CLIP token"
        assert len(tokenizer(caption((noun,))).input_ids) == 4
    colours = np.array([g.colour for g in world.glyphs], dtype=float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert distances[~np.eye(len(colours), dtype=bool)].min() >= 127
    assert {g.shape for g in world.glyphs} <= set(SHAPES) and len({g.shape for g in world.glyphs}) == len(world.glyphs)


def test_split_covers_every_pair_once_and_keeps_unseen_nouns_in_base_training():
    world = load_world()
    train = {frozenset(p) for p in world.train_pairs}
    heldout = {frozenset(p) for p in world.heldout_pairs}
    assert not train & heldout
    assert train | heldout == {frozenset(p) for p in combinations(world.nouns, 2)}
    for noun in world.nouns:  # every noun has training partners and held-out partners
        assert sum(noun in p for p in train) >= 6 and sum(noun in p for p in heldout) >= 2
    unseen = set(world.unseen_in_finetuning)
    groups = [sum(n in unseen for n in p) for p in heldout]
    assert all(groups.count(k) >= 3 for k in (0, 1, 2)), "held-out pairs cover seen+seen, seen+unseen and unseen+unseen"
    assert set(world.finetune_nouns) == set(world.nouns) - unseen


def test_captions():
    assert caption(("moon",)) == "a moon"
    assert caption(("moon", "heart")) == "a moon and a heart"
    assert caption(("moon", "heart", "star")) == "a moon, a heart and a star"
    assert load_world().glyph("cherry").shape == "disc"


def test_render_is_deterministic_and_objects_do_not_touch():
    world = load_world()
    nouns = ("cherry", "box", "ring")
    first, scene = render_scene(world, nouns, seed=7)
    again, _ = render_scene(world, nouns, seed=7)
    other, _ = render_scene(world, nouns, seed=8)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert scene.nouns == nouns and scene.caption == "a cherry, a box and a ring"
    for seed in range(200):
        _, scene = render_scene(world, nouns, seed)
        for a, b in combinations(scene.objects, 2):
            apart_x = a.x + a.width + world.gap <= b.x or b.x + b.width + world.gap <= a.x
            apart_y = a.y + a.height + world.gap <= b.y or b.y + b.height + world.gap <= a.y
            assert apart_x or apart_y
        for o in scene.objects:
            assert world.margin <= o.x and o.x + o.width <= world.image_size - world.margin
            assert world.min_size <= max(o.width, o.height) <= world.max_size


def test_world_v2_is_what_make_world_builds_and_keeps_its_roles_apart():
    world = load_world(V2_FILE)
    assert world.to_dict() == build_world().to_dict(), "world-v2.json is out of date: python -m toyworld.make_world"
    tokenizer = load_clip_tokenizer()
    assert len(world.nouns) >= 24 and all(len(tokenizer(n).input_ids) == 3 for n in world.nouns)
    assert len({(g.shape, g.colour) for g in world.glyphs}) == len(world.glyphs)
    unseen = set(world.unseen_in_finetuning)
    assert len(unseen) >= 8 and len(world.finetune_nouns) >= 16
    train = {frozenset(p) for p in world.train_pairs}
    validation = {frozenset(p) for p in world.validation_pairs}
    test = {frozenset(p) for p in world.test_pairs}
    assert not (train & validation or train & test or validation & test)
    assert all(sum(n in unseen for n in p) == 0 for p in validation), "validation pairs never touch unseen nouns"
    assert sorted(sum(n in unseen for n in p) for p in test).count(2) >= 8
    ranked = sorted(world.glyphs, key=lambda g: -g.frequency)
    partners = [sum(g.noun in p for p in world.train_pairs) for g in ranked]
    assert partners == [2] * 12 + [0] * 12, "the 12 most frequent nouns have 2 training partners, the rarer none"
    assert ranked[0].frequency / ranked[-1].frequency == pytest.approx(len(ranked), rel=1e-3)  # Zipf: 1/rank
    assert (
        world.pair_role(*world.validation_pairs[0]) == "validation"
        and world.pair_role(*world.train_pairs[0]) == "train"
    )


def test_v2_singles_follow_the_nouns_frequencies():
    world = load_world(V2_FILE)
    rng = np.random.default_rng(0)
    counts = Counter(sample_nouns(world, DataMix(pair_fraction=0.0), rng)[0] for _ in range(20_000))
    ranked = sorted(world.glyphs, key=lambda g: -g.frequency)
    total = sum(g.frequency for g in world.glyphs)
    for glyph in (ranked[0], ranked[len(ranked) // 2], ranked[-1]):
        assert counts[glyph.noun] / 20_000 == pytest.approx(glyph.frequency / total, rel=0.15)
