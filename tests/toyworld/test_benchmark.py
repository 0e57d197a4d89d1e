"""The toy-world benchmark: its groups follow the split, its statistics are right, and a reduced run goes end to end
(the bundled model, SepEn on pairs and large-scale, Attend-and-Excite) with the same noise for every method."""

import json

import pytest
import torch

from sepen_core.models import BUNDLED_MODEL_DIR, load_base_model
from toyworld.benchmark import (
    GROUPS,
    BenchmarkConfig,
    group_items,
    group_pairs,
    mcnemar_p,
    methods,
    paired_difference,
    run,
    sepen_concepts,
)
from toyworld.world import load_world


def test_groups_follow_the_split():
    world = load_world()
    unseen = set(world.unseen_in_finetuning)
    sizes = {g: len(group_pairs(world, g)) for g in GROUPS}
    assert sizes == {
        "single": 12,
        "seen_pairs": 54,
        "heldout_seen_seen": 18,
        "unseen_concept": 24,
    }  # pairs in both orders
    train, held = {frozenset(p) for p in world.train_pairs}, {frozenset(p) for p in world.heldout_pairs}
    assert all(frozenset(p) in train and not set(p) & unseen for p in group_pairs(world, "seen_pairs"))
    assert all(frozenset(p) in held and not set(p) & unseen for p in group_pairs(world, "heldout_seen_seen"))
    assert all(frozenset(p) in held and set(p) & unseen for p in group_pairs(world, "unseen_concept"))
    pairs = sepen_concepts(world, "pairs")
    assert {frozenset(g) for g in pairs.groups} == {frozenset(p) for p in group_pairs(world, "seen_pairs")}
    large = sepen_concepts(world, "large_scale")
    assert set(large.training_concepts) == set(world.finetune_nouns) and set(large.held_out) == unseen


def test_items_spread_over_prompts_with_distinct_seeds():
    world = load_world()
    items = {g: group_items(world, g, 200, seed=7) for g in GROUPS}
    for group in items.values():
        counts = [len(seeds) for _, seeds in group]
        assert sum(counts) == 200 and max(counts) - min(counts) <= 1
    seeds = [s for group in items.values() for _, ss in group for s in ss]
    assert len(seeds) == len(set(seeds))


def test_methods_two_finetune_seeds_ablations_and_a_selection():
    names = [m.name for m in methods(BenchmarkConfig())]
    assert names == [
        "base",
        "sepen-pairs-s0",
        "sepen-pairs-s1",
        "sepen-large-s0",
        "sepen-large-s1",
        "attend-excite",
        "sepen-pairs-content",
        "sepen-pairs-separate-only",
        "sepen-pairs-enhance-only",
    ]
    assert [m.name for m in methods(BenchmarkConfig(only_methods=("attend-excite",)))] == ["base", "attend-excite"]
    with pytest.raises(ValueError, match="sepen-huge"):
        methods(BenchmarkConfig(only_methods=("sepen-huge",)))


def test_paired_statistics():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 5) == mcnemar_p(5, 3) == pytest.approx(2 * (1 + 8 + 28 + 56) / 256)
    base = [True] * 6 + [False] * 4
    other = [True] * 4 + [False] * 2 + [True] * 3 + [False]  # lost 2, gained 3
    d = paired_difference(base, other)
    assert (d["gained"], d["lost"]) == (3, 2) and d["difference"] == pytest.approx(0.1)
    assert d["ci95"][0] < 0.1 < d["ci95"][1]


def test_reduced_benchmark_end_to_end(tmp_path):
    torch.set_num_threads(1)
    config = BenchmarkConfig(
        items_per_group=4,
        finetune_seeds=(0,),
        finetune_steps=2,
        ablations=False,
        timing_repeats=1,
        timing_images=2,
        grid_columns=4,
    )
    report = run(load_base_model(BUNDLED_MODEL_DIR), load_world(), config, tmp_path, log=lambda line: None)
    assert list(report["methods"]) == ["base", "sepen-pairs-s0", "sepen-large-s0", "attend-excite"]
    for method in report["methods"].values():
        for group in GROUPS:
            summary = method["summary"][group]
            assert summary["n"] == 4 and 0 <= summary["success"] <= 1 and len(method["outcomes"][group]) == 4
            assert summary["success_ci95"][0] <= summary["success"] <= summary["success_ci95"][1]
    base = report["methods"]["base"]
    assert base["summary"]["single"]["success"] >= 0.75  # the bundled model draws single objects
    assert all(d["difference"] == 0 for d in base["vs_base"].values())
    for name in ("sepen-pairs-s0", "sepen-large-s0"):
        finetune = report["methods"][name]["finetune"]
        assert (
            finetune["recipe"]["steps"] == 2 and finetune["recipe"]["learning_rate"] == 1e-3
        )  # the toy model's recipe
        # The adapter changes the maps while sampling: the same items, other peaks.
        assert report["methods"][name]["summary"]["seen_pairs"]["min_peak"] != base["summary"]["seen_pairs"]["min_peak"]
    assert report["methods"]["sepen-large-s0"]["finetune"]["recipe"]["prior_weight"] == 0.5
    assert set(report["timing"]) == {"base", "sepen-pairs-s0", "sepen-large-s0", "attend-excite"}
    assert report["timing"]["base"]["ratio_to_base"] == 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["base"]["outcomes"] == base["outcomes"]
    table = (tmp_path / "table.md").read_text()
    assert all(label in table for label in ("base model", "SepEn, training pairs (seed 0)", "Attend-and-Excite"))
    assert "Objects missing from pair images" in table
    for method in report["methods"].values():  # every missing object is counted once, by kind
        for group in GROUPS[1:]:
            summary = method["summary"][group]
            missing = summary["missing"]["seen"] + summary["missing"]["unseen"]
            assert missing == sum(count * (2 - int(found)) for found, count in summary["failures_by_found"].items())
    assert all((tmp_path / f"grid-{g}.png").exists() for g in GROUPS)
    assert len((tmp_path / "methods.jsonl").read_text().splitlines()) == 4
