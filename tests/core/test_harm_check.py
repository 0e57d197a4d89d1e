"""The do-no-harm check (sepen_core.harm_check) on the toy model with its judge: an adapter that changes nothing has
no clear effect; one that zeroes the keys hurts its pairs and its nouns alone; the numbers pool both orders; without
a judge nothing is sampled and the verdict is `not judged`. On given judgements: the verdicts are decided on McNemar's
p adjusted by Holm's method across the check's pairs and nouns, and the record keeps both p-values."""

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
from sepen_core.stats import holm, mcnemar_p, paired_difference
from sepen_store.contract import HarmCheck


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
    assert hurt and all(row["paired"]["ci95"][1] < 0 and row["paired"]["p_holm"] < 0.05 for row in hurt)
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


FOUR_PAIRS = ConceptSet.pairs(("cat", "dog"), ("car", "apple"), ("sofa", "cup"), ("bus", "moon"))  # and 8 nouns


def judged_as(lost_by_noun: dict[str, int], samples: int):
    """evaluate_adapter as it would report an adapter that changes nothing, except that it loses `lost` of the
    `samples` images of each noun named here alone (judgements given, so that the p-values are known exactly)."""

    def evaluate(model, adapter, prompts, config, *, judge, on_prompt=None, should_cancel=None):
        rows = []
        for item in prompts:
            lost = lost_by_noun.get(item.concepts[0], 0) if len(item.concepts) == 1 else 0
            base, adapter_side = [True] * samples, [False] * lost + [True] * (samples - lost)
            rows.append(
                {
                    "prompt": item.prompt,
                    "concepts": list(item.concepts),
                    "base": {"success": 1.0, "min_peak": 0.5, "overlap": None},
                    "adapter": {"success": sum(adapter_side) / samples, "min_peak": 0.5, "overlap": None},
                    "paired": paired_difference(base, adapter_side),
                }
            )
        return {"prompts": rows}

    return evaluate


def checked(monkeypatch, lost_by_noun: dict[str, int]) -> dict:
    monkeypatch.setattr(harm_check, "evaluate_adapter", judged_as(lost_by_noun, 16))
    return check_adapter(None, None, FOUR_PAIRS, HarmCheckConfig(samples=16), judge=object())


def row_of(report: dict, noun: str) -> dict:
    (row,) = [row for row in report["nouns"] if row["concepts"] == [noun]]
    return row


def test_a_loss_that_one_test_alone_would_call_harm_is_no_clear_effect_among_twelve(monkeypatch):
    """7 of 16 images of one noun lost, none gained: McNemar's p is 2/2^7 = 0.016, under 0.05 for that test alone;
    but the check made 12 tests (4 pairs, 8 nouns), and Holm's adjusted p is 12 x 0.016 = 0.19."""
    report = checked(monkeypatch, {"cat": 7})
    cat = row_of(report, "cat")
    assert cat["paired"]["p_mcnemar"] == pytest.approx(mcnemar_p(0, 7)) == pytest.approx(0.015625)
    assert cat["paired"]["p_holm"] == pytest.approx(12 * 0.015625)
    assert cat["paired"]["ci95"][1] < 0  # the unadjusted interval, kept for the size of the change
    assert cat["verdict"] == "no clear effect" and report["verdict"] == "no clear effect"
    others = [row for row in report["pairs"] + report["nouns"] if row is not cat]
    assert len(others) == 11 and all(row["paired"]["p_holm"] == 1.0 for row in others)
    assert HarmCheck.model_validate(report).nouns[0].paired.p_holm is not None


def test_a_loss_that_stands_the_correction_hurts(monkeypatch):
    """12 of 16 lost: p = 2/2^12 = 0.00049, adjusted 0.0059: the noun is hurt, and so is the adapter."""
    report = checked(monkeypatch, {"cat": 12, "dog": 5})
    assert row_of(report, "cat")["paired"]["p_holm"] == pytest.approx(12 * mcnemar_p(0, 12))
    assert row_of(report, "cat")["verdict"] == "hurts" and report["verdict"] == "hurts"
    dog = row_of(report, "dog")  # the next smallest p is multiplied by 11, and never ends below cat's adjusted p
    assert dog["paired"]["p_holm"] == pytest.approx(11 * mcnemar_p(0, 5)) and dog["verdict"] == "no clear effect"


def test_holm_adjusts_step_down_in_the_order_given():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002]) and holm([0.9, 0.8]) == [1.0, 1.0] and holm([]) == []


def test_a_check_recorded_before_the_correction_still_reads():
    """Versions published before it carry no p_holm: their records stay valid."""
    paired = {"difference": -0.4, "ci95": [-0.6, -0.2], "gained": 1, "lost": 14, "p_mcnemar": 0.001}
    row = {"concepts": ["cat", "dog"], "base": {"success": 0.7}, "adapter": {"success": 0.3}, "paired": paired}
    record = {"verdict": "hurts", "pairs": [{**row, "verdict": "hurts"}], "nouns": [], "images": 128}
    check = HarmCheck.model_validate({**record, "samples_per_prompt": 16, "seed": HELD_OUT_SEED})
    assert check.pairs[0].paired.p_holm is None
