"""The toy world's data file, renderer and captions."""

from itertools import combinations

import numpy as np

from sepen_core.models import load_clip_tokenizer
from toyworld.world import SHAPES, caption, load_world, render_scene


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
