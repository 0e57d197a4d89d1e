"""The toy-world benchmark: its groups follow the split, its statistics are right, and reduced runs go end to end
(the bundled world-v2 model: one SepEn adapter per test pair, SepEn on training pairs and large-scale,
Attend-and-Excite) with the same noise for every method."""

import json

import pytest
import torch

from sepen_core.models import BUNDLED_MODEL_DIR, load_base_model
from toyworld.benchmark import (
    V1_GROUPS,
    V2_GROUPS,
    BenchmarkConfig,
    group_items,
    group_pairs,
    mcnemar_p,
    methods,
    paired_difference,
    run,
    sepen_concepts,
    world_groups,
)
from toyworld.failures import KINDS
from toyworld.world import load_world


def test_groups_follow_the_split():
    world = load_world()
    unseen = set(world.unseen_in_finetuning)
    assert world_groups(world) == V1_GROUPS
    sizes = {g: len(group_pairs(world, g)) for g in V1_GROUPS}
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


def test_world_v2_is_benchmarked_on_its_test_pairs():
    world = load_world(BUNDLED_MODEL_DIR / "world.json")
    unseen = set(world.unseen_in_finetuning)
    assert world_groups(world) == V2_GROUPS
    sizes = {g: len(group_pairs(world, g)) for g in V2_GROUPS}
    assert sizes == {"single": 24, "test_seen_seen": 48, "test_seen_unseen": 48, "test_unseen_unseen": 24}
    test = {frozenset(p) for p in world.test_pairs}
    for group, count in (("test_seen_seen", 0), ("test_seen_unseen", 1), ("test_unseen_unseen", 2)):
        assert all(frozenset(p) in test and len(set(p) & unseen) == count for p in group_pairs(world, group))
    one = sepen_concepts(world, "per_pair", ("moon", "bus"))  # the README's --pair A B --template "a {A} and a {B}"
    assert one.groups == (("bus", "moon"),) and one.templates == ("a {A} and a {B}",)


def test_items_spread_over_prompts_with_distinct_seeds():
    world = load_world()
    items = {g: group_items(world, g, 200, seed=7) for g in V1_GROUPS}
    for group in items.values():
        counts = [len(seeds) for _, seeds in group]
        assert sum(counts) == 200 and max(counts) - min(counts) <= 1
    seeds = [s for group in items.values() for _, ss in group for s in ss]
    assert len(seeds) == len(set(seeds))


def test_methods_three_finetune_seeds_ablations_and_a_selection():
    names = [m.name for m in methods(BenchmarkConfig())]
    assert names == [
        "base",
        *(f"sepen-per-pair-s{s}" for s in range(3)),
        *(f"sepen-per-pair-excite-s{s}" for s in range(3)),
        *(f"sepen-pairs-s{s}" for s in range(3)),
        *(f"sepen-large-s{s}" for s in range(3)),
        "attend-excite",
        "sepen-pairs-content",
        "sepen-pairs-separate-only",
        "sepen-pairs-enhance-only",
    ]
    assert [m.name for m in methods(BenchmarkConfig(only_methods=("attend-excite",)))] == ["base", "attend-excite"]
    with pytest.raises(ValueError, match="sepen-huge"):
        methods(BenchmarkConfig(only_methods=("sepen-huge",)))


def test_per_pair_pools_both_caption_orders_and_names_the_worst_pair():
    from toyworld.benchmark import per_pair

    prompts = ["a / b", "b / a", "c / d", "d / c"]  # 8 items: 2 per prompt
    base = [True, False, True, False, False, False, True, True]
    runs = [[True, True, True, True, False, False, False, False]]  # a + b gains 2 of 4, c + d loses 2 of 4
    numbers = per_pair(prompts, 8, base, runs)
    assert numbers["pairs"]["a + b"] == {
        "n": 4,
        "base": 0.5,
        "difference": 0.5,
        "significant_loss": False,
        "significant_gain": False,
    }
    assert numbers["worst"] == "c + d" and numbers["best"] == "a + b"
    assert numbers["pairs"]["c + d"]["difference"] == -0.5 and (numbers["hurt"], numbers["count"]) == (1, 2)
    two_seeds = per_pair(prompts, 8, base, [runs[0], base])  # the mean over seeds, per pair
    assert two_seeds["pairs"]["c + d"]["difference"] == -0.25


def test_the_checks_verdicts_are_compared_with_the_pairs_significant_differences():
    from toyworld.benchmark import check_agreement

    def numbers(difference, loss=False, gain=False):
        return {"difference": difference, "significant_loss": loss, "significant_gain": gain}

    pairs = {"a + b": numbers(-0.5, loss=True), "c + d": numbers(0.4, gain=True), "e + f": numbers(0.1)}
    groups = {"g": {"pairs": pairs}}
    checks = {
        "a + b": {"pairs": [{"verdict": "hurts"}]},
        "c + d": {"pairs": [{"verdict": "no clear effect"}]},
        "e + f": {"pairs": [{"verdict": "hurts"}]},
    }
    agreement = check_agreement(groups, checks)
    assert (agreement["significant"], agreement["same_sign"]) == (2, 1)  # c + d's gain went unseen by the check
    assert agreement["verdicts"] == {"helps": 0, "no clear effect": 1, "hurts": 2}
    assert (agreement["hurts_and_lose"], agreement["significant_losses_flagged"]) == (1, 1)


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
    """Every method on the bundled model (world v2): one adapter per test pair, SepEn on training pairs and
    large-scale, Attend-and-Excite; the same items and noise for each."""
    torch.set_num_threads(1)
    config = BenchmarkConfig(
        items_per_group=2,
        finetune_seeds=(0,),
        finetune_steps=2,
        ablations=False,
        timing_repeats=1,
        timing_images=1,
        grid_columns=2,
        check_samples=1,
    )
    world, model = load_world(BUNDLED_MODEL_DIR / "world.json"), load_base_model(BUNDLED_MODEL_DIR)
    report = run(model, world, config, tmp_path, log=lambda line: None)
    names = ["base", "sepen-per-pair-s0", "sepen-per-pair-excite-s0", "sepen-pairs-s0", "sepen-large-s0"]
    assert list(report["methods"]) == [*names, "attend-excite"]
    assert report["groups"] == list(V2_GROUPS) and tuple(report["config"]["groups"]) == V2_GROUPS
    for method in report["methods"].values():
        for group in V2_GROUPS:
            summary = method["summary"][group]
            assert summary["n"] == 2 and 0 <= summary["success"] <= 1 and len(method["outcomes"][group]) == 2
            assert summary["success_ci95"][0] <= summary["success"] <= summary["success_ci95"][1]
        for group in V2_GROUPS[1:]:  # every missing object is counted once, by noun and by kind
            summary = method["summary"][group]
            missing = summary["missing"]["seen"] + summary["missing"]["unseen"]
            assert missing == sum(count * (2 - int(found)) for found, count in summary["failures_by_found"].items())
            assert sum(summary["missing_by_kind"].values()) == missing and set(summary["missing_by_kind"]) == set(KINDS)
            assert 0 <= summary["early_min_peak"] <= 1
    base = report["methods"]["base"]
    assert base["summary"]["single"]["success"] >= 1 / 2  # the bundled model draws single objects
    assert all(d["difference"] == 0 for d in base["vs_base"].values())
    per_pair = report["methods"]["sepen-per-pair-s0"]
    # One adapter per pair sampled, shared by its two caption orders (2 items per group: A+B and B+A).
    sampled = {frozenset(nouns) for g in V2_GROUPS[1:] for nouns, _ in group_items(world, g, 2, config.seed)}
    assert per_pair["finetune"]["adapters"] == len(sampled) == 3
    assert per_pair["outcomes"]["single"] == base["outcomes"]["single"]  # single objects keep the base model
    for name in ("sepen-per-pair-s0", "sepen-pairs-s0", "sepen-large-s0"):
        recipe = report["methods"][name]["finetune"]["recipe"]
        own = model.defaults.large_scale if name == "sepen-large-s0" else model.defaults.finetune
        assert recipe["steps"] == 2 and recipe["learning_rate"] == own["learning_rate"]  # the model's own recipe
        # The adapter changes the maps while sampling: the same items, other peaks.
        summary = report["methods"][name]["summary"]["test_seen_seen"]
        assert summary["min_peak"] != base["summary"]["test_seen_seen"]["min_peak"]
    assert report["methods"]["sepen-large-s0"]["finetune"]["recipe"]["prior_weight"] == 0.5
    assert set(report["timing"]) == {"base", "sepen-per-pair-s0", "sepen-pairs-s0", "sepen-large-s0", "attend-excite"}
    assert report["timing"]["base"]["ratio_to_base"] == 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["base"]["outcomes"] == base["outcomes"]
    table = (tmp_path / "table.md").read_text()
    labels = ("base model", "SepEn, per pair (seed 0)", "SepEn, training pairs (seed 0)", "Attend-and-Excite")
    assert all(label in table for label in labels)
    assert "Objects missing from pair images" in table and "by kind: absent / wrong_shape / fused / twice" in table
    assert all((tmp_path / f"grid-{g}.png").exists() for g in V2_GROUPS)
    assert len((tmp_path / "methods.jsonl").read_text().splitlines()) == 6
    # Per pair, for every method: both caption orders pooled, the worst and best pair named in the table.
    excite = report["methods"]["sepen-per-pair-excite-s0"]
    assert excite["finetune"]["adapters"] == 3  # its own adapters, sampled with Attend-and-Excite on top
    for name in names[1:]:
        for group in V2_GROUPS[1:]:
            numbers = report["methods"][name]["per_pair"][group]
            assert numbers["count"] == 1 and numbers["pairs"][numbers["worst"]]["n"] == 2
    assert "### Per pair" in table and "worst " in table
    # Every per-pair adapter's do-no-harm check, compared with what the benchmark's own items show.
    checks = per_pair["finetune"]["check"]
    assert set(checks) == {" + ".join(sorted(p)) for p in sampled}
    assert all(c["verdict"] in ("helps", "no clear effect", "hurts") for c in checks.values())
    assert per_pair["check_agreement"]["pairs"] == 3 and "do-no-harm check of each per-pair adapter" in table
