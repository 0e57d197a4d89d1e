"""Evaluation groups and intervals (sampling itself is covered by test_train)."""

from pathlib import Path

import pytest

from toyworld.evaluate import GROUPS, HELDOUT_GROUPS, TEST_GROUPS, group_prompts, wilson_interval
from toyworld.premise import PairSample, early_summary, pooled_auc, step_aucs
from toyworld.world import load_world

V2 = Path(__file__).parents[2] / "toyworld" / "world-v2.json"


def test_groups_follow_the_split_in_both_caption_orders():
    world = load_world()
    sizes = {group: len(group_prompts(world, group)) for group in ("single", "train_pairs", *HELDOUT_GROUPS)}
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


def test_world_v2_groups_are_its_roles():
    world = load_world(V2)
    sizes = {group: len(group_prompts(world, group)) for group in GROUPS}
    assert sizes["single"] == 24 and sizes["train_pairs"] == 24 and sizes["validation"] == 32
    assert [sizes[g] for g in TEST_GROUPS] == [48, 48, 24]
    validation = {frozenset(p) for p in group_prompts(world, "validation")}
    assert not validation & {frozenset(p) for g in TEST_GROUPS for p in group_prompts(world, g)}
    with pytest.raises(ValueError, match="validation"):
        group_prompts(load_world(), "validation")


def test_auc_pools_within_groups_only():
    assert pooled_auc([([3.0, 4.0], [1.0, 2.0])]) == 1.0
    assert pooled_auc([([1.0], [2.0]), ([5.0], [0.0])]) == 0.5  # one group each way
    assert pooled_auc([([2.0], [2.0])]) == 0.5 and pooled_auc([([1.0], [])]) is None


def test_premise_aucs_see_an_early_map_that_predicts_the_missing_object():
    # 'a' goes missing exactly when its step-1 peak is low; step 2 carries no information
    samples = [
        PairSample(
            ("a", "b"),
            frozenset({"b"} if low else {"a", "b"}),
            [{"a": 0.1 if low else 0.9, "b": 0.5}, {"a": 0.5, "b": 0.5}],
        )
        for low in (True, False, True, False, False)
    ]
    rows = step_aucs(samples)
    assert rows[0]["object_within_prompt"] == 1.0 and rows[0]["image_within_prompt"] == 1.0
    assert rows[1]["object_within_prompt"] == 0.5
    assert early_summary(rows, fraction=0.5)["image_within_prompt"] == 1.0
