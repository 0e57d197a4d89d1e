"""Recipe choice on validation pairs: one adapter per pair and recipe, scored in both caption orders on the same seeds
as the base model, per pair and pooled, each candidate against the reference with Holm's correction; only
validation pairs are touched when choosing (development pairs have no role in the world), and runs of other
candidates join into one report (the bundled world-v2 model, 2 finetune steps)."""

import json

import pytest

from sepen_core.models import BUNDLED_MODEL_DIR
from sepen_core.stats import holm
from toyworld.recipes import choose, chosen_pairs, join, main
from toyworld.world import load_world

MODEL = BUNDLED_MODEL_DIR  # world v2's base model


def test_adapters_are_scored_against_the_base_on_the_same_seeds_of_validation_pairs(tmp_path):
    world = load_world(MODEL / "world.json")
    out = tmp_path / "recipes.json"
    main(["--model", str(MODEL), "--out", str(out), "--pairs", "2", "--samples", "3", "--steps", "2",
          "--recipes", "default", "lr3e-4"])  # fmt: skip
    report = json.loads(out.read_text())
    pairs = [tuple(p) for p in report["pairs"]]
    assert pairs == chosen_pairs(world, "validation", 2) and all(p in world.validation_pairs for p in pairs)
    for recipe in report["recipes"].values():
        assert len(recipe["per_pair"]) == 2
        pooled = recipe["pooled"]
        base = [s for p in pairs for s in report["base"][" + ".join(p)]]
        after = [s for numbers in recipe["per_pair"].values() for s in numbers["adapter"]]
        assert pooled["n"] == len(base) == len(after) == 12  # 2 pairs x 2 caption orders x 3 seeds
        assert pooled["base"] == sum(base) / 12 and pooled["sepen"] == sum(after) / 12
        assert pooled["gained"] - pooled["lost"] == sum(after) - sum(base)
        differences = [n["difference"] for n in recipe["per_pair"].values()]
        assert recipe["pairs"]["worst"]["difference"] == min(differences)
        assert recipe["pairs"]["hurt"] == sum(d < 0 for d in differences)
    rates = {r["recipe"]["learning_rate"] for r in report["recipes"]["lr3e-4"]["per_pair"].values()}
    assert rates == {3e-4}
    against = report["against_reference"]["lr3e-4"]
    reference = [s for n in report["recipes"]["default"]["per_pair"].values() for s in n["adapter"]]
    assert against["gained"] - against["lost"] == sum(after) - sum(reference)
    assert report["choice"]["recipe"] in ("default", "lr3e-4")
    assert "| lr3e-4 | 12 |" in out.with_suffix(".md").read_text()

    other = tmp_path / "other.json"
    main(["--model", str(MODEL), "--out", str(other), "--pairs", "2", "--samples", "3", "--steps", "2",
          "--recipes", "lr1e-4"])  # fmt: skip
    joined = join([report, json.loads(other.read_text())])
    assert set(joined["recipes"]) == {"default", "lr3e-4", "lr1e-4"} and set(joined["against_reference"]) == {
        "lr3e-4",
        "lr1e-4",
    }
    with pytest.raises(SystemExit, match="same items"):
        join([report, {**json.loads(other.read_text()), "base": {"x": [True]}}])


def test_development_pairs_have_no_role_in_the_world():
    world = load_world(MODEL / "world.json")
    roles = {frozenset(p) for p in world.validation_pairs + world.test_pairs}
    pairs = chosen_pairs(world, "development", 6)
    assert len(set(pairs)) == 6 and not {frozenset(p) for p in pairs} & roles
    assert all(frozenset(p) in {frozenset(h) for h in world.heldout_pairs} for p in pairs)


def test_holm_adjusts_step_down_and_the_choice_needs_a_significant_gain():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    against = {
        "a": {"difference": 0.08, "p_holm": 0.2},
        "b": {"difference": 0.05, "p_holm": 0.01},
        "c": {"difference": -0.09, "p_holm": 0.001},
    }
    assert choose({"against_reference": against})["recipe"] == "b"  # a's larger gain is not significant
    assert choose({"against_reference": {"c": against["c"]}})["recipe"] == "default"


def test_large_scale_recipes_share_one_adapter_over_the_validation_pairs(tmp_path):
    out = tmp_path / "large.json"
    main(["--model", str(MODEL), "--out", str(out), "--mode", "large-scale", "--pairs", "2", "--samples", "2",
          "--steps", "2", "--recipes", "lr1e-4"])  # fmt: skip
    report = json.loads(out.read_text())
    per_pair = report["recipes"]["lr1e-4"]["per_pair"]
    assert report["mode"] == "large-scale" and len(per_pair) == 2
    recipes = [numbers["recipe"] for numbers in per_pair.values()]
    assert recipes[0] == recipes[1] and recipes[0]["learning_rate"] == 1e-4 and recipes[0]["prior_weight"] == 0.5
    assert len({numbers["finetune_seconds"] for numbers in per_pair.values()}) == 1  # one adapter, trained once
    assert "SepEn (large-scale)" in out.with_suffix(".md").read_text()
