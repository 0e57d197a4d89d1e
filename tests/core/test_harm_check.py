"""The do-no-harm check (sepen_core.harm_check) on the toy model with its judge: an adapter that changes nothing has
no clear effect; one that zeroes the keys hurts its pairs and its nouns alone; the numbers pool both orders; without
a judge nothing is sampled and the verdict is `not judged`."""

import pytest

from sepen_core import harm_check
from sepen_core.adapters import KeyProjectionAdapter
from sepen_core.config import FinetuneConfig
from sepen_core.errors import ConfigError
from sepen_core.evaluation import load_judge
from sepen_core.harm_check import HELD_OUT_SEED, HarmCheckConfig, check_adapter, checked_pairs
from sepen_core.model_card import model_card
from sepen_core.models import load_model
from sepen_core.prompts import ConceptSet


@pytest.fixture(scope="module")
def toy():
    model = load_model("toy")
    card = model_card("toy")
    return model, load_judge(card.judge, card.path)


def pair_of(judge) -> tuple[str, str]:
    return tuple(judge.default_prompts()[0].concepts)


def scaled_keys(model, scale: float) -> KeyProjectionAdapter:
    """The keys times `scale`: 1 changes nothing, 0 zeroes them (every pixel attends to every token alike)."""
    deltas = {name: (scale - 1) * weight for name, weight in model.base_keys.items()}
    return KeyProjectionAdapter(deltas, model.model_id, model.base_fingerprint, {})


def test_an_adapter_that_changes_nothing_has_no_clear_effect(toy):
    model, judge = toy
    concepts = ConceptSet.pairs(pair_of(judge))
    config = HarmCheckConfig(samples=4, sample=model.defaults.sample_config())
    report = check_adapter(model, scaled_keys(model, 1.0), concepts, config, judge=judge)
    assert report["verdict"] == "no clear effect" and report["seed"] == HELD_OUT_SEED
    (pair,) = report["pairs"]
    assert pair["paired"]["gained"] == pair["paired"]["lost"] == 0 and pair["verdict"] == "no clear effect"
    assert pair["base"] == pair["adapter"]  # the same images: both orders of 4 seeds each
    assert [n["concepts"] for n in report["nouns"]] == [[c] for c in pair_of(judge)]
    assert report["images"] == 2 * 4 * 4  # two orders and two nouns, four seeds, both sides


def test_an_adapter_that_zeroes_the_keys_hurts(toy):
    model, judge = toy
    concepts = ConceptSet.pairs(pair_of(judge))
    config = HarmCheckConfig(samples=6, sample=model.defaults.sample_config())
    report = check_adapter(model, scaled_keys(model, 0.0), concepts, config, judge=judge)
    assert report["verdict"] == "hurts"
    hurt = [row for row in report["pairs"] + report["nouns"] if row["verdict"] == "hurts"]
    assert hurt and all(row["paired"]["ci95"][1] < 0 for row in hurt)
    assert all(row["paired"]["difference"] <= 0 for row in report["nouns"])
    assert report["pairs"][0]["adapter"]["success"] < report["pairs"][0]["base"]["success"]


def test_without_a_judge_nothing_is_sampled_and_nothing_judged(tiny_model, monkeypatch):
    monkeypatch.setattr(harm_check, "evaluate_adapter", lambda *a, **k: pytest.fail("sampled without a judge"))
    config = HarmCheckConfig(samples=2, sample=tiny_model.defaults.sample_config())
    report = check_adapter(tiny_model, scaled_keys(tiny_model, 1.0), ConceptSet.pairs(("cat", "dog")), config)
    assert report["verdict"] == "not judged" and report["images"] == 0 and report["pairs"] == []


def test_a_collection_is_checked_on_a_few_seen_held_out_and_mixed_pairs():
    concepts = ConceptSet(collection=("cat", "dog", "car", "apple", "sofa", "cup"), held_out=("sofa", "cup"))
    pairs = checked_pairs(concepts)
    assert ("sofa", "cup") in pairs and ("cat", "sofa") in pairs and 3 <= len(pairs) <= 8


def test_the_check_size_is_a_recipe_option():
    assert FinetuneConfig().check_samples == 16 and FinetuneConfig(check_samples=0).check_samples == 0
    with pytest.raises(ConfigError, match="check_samples"):
        FinetuneConfig(check_samples=65)
