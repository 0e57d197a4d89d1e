"""Recipe choice on validation pairs: one adapter per pair and recipe, scored on the same seeds as the base model,
pooled over pairs; only validation pairs are ever touched (the bundled world-v2 model, 2 finetune steps)."""

import json

from sepen_core.models import BUNDLED_MODEL_DIR
from toyworld.recipes import main, validation_pairs
from toyworld.world import load_world

MODEL = BUNDLED_MODEL_DIR  # world v2's base model


def test_adapters_are_scored_against_the_base_on_the_same_seeds_of_validation_pairs(tmp_path):
    world = load_world(MODEL / "world.json")
    out = tmp_path / "recipes.json"
    main(["--model", str(MODEL), "--out", str(out), "--pairs", "2", "--samples", "3", "--steps", "2",
          "--recipes", "model-default", "lr1e-4"])  # fmt: skip
    report = json.loads(out.read_text())
    pairs = [tuple(p) for p in report["pairs"]]
    assert pairs == validation_pairs(world, 2) and all(p in world.validation_pairs for p in pairs)
    for recipe in report["recipes"].values():
        assert len(recipe["per_pair"]) == 2
        pooled = recipe["pooled"]
        base = [s for p in pairs for s in report["base"][" + ".join(p)]]
        after = [s for numbers in recipe["per_pair"].values() for s in numbers["adapter"]]
        assert pooled["n"] == len(base) == len(after) == 6
        assert pooled["base"] == sum(base) / 6 and pooled["sepen"] == sum(after) / 6
        assert pooled["gained"] - pooled["lost"] == sum(after) - sum(base)
    rates = {r["recipe"]["learning_rate"] for r in report["recipes"]["lr1e-4"]["per_pair"].values()}
    assert rates == {1e-4}
    assert "| lr1e-4 | 6 |" in out.with_suffix(".md").read_text()


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
