"""Evaluation groups and intervals (sampling itself is covered by test_train)."""

from toyworld.evaluate import GROUPS, group_prompts, wilson_interval
from toyworld.world import load_world


def test_groups_follow_the_split_in_both_caption_orders():
    world = load_world()
    sizes = {group: len(group_prompts(world, group)) for group in GROUPS}
    assert sizes == {
        "single": 12,
        "train_pairs": 90,
        "heldout_pairs": 42,
        "heldout_seen_seen": 18,
        "heldout_seen_unseen": 18,
        "heldout_unseen_unseen": 6,
    }
    unseen = set(world.unseen_in_finetuning)
    assert all(set(p) <= unseen for p in group_prompts(world, "heldout_unseen_unseen"))
    assert all(not set(p) & unseen for p in group_prompts(world, "heldout_seen_seen"))
    assert all(world.is_heldout(*p) for p in group_prompts(world, "heldout_pairs"))
    assert not any(world.is_heldout(*p) for p in group_prompts(world, "train_pairs"))


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(0, 0) == (0.0, 1.0)
