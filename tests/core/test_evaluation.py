"""Evaluating an adapter against the base model: paired seeds, per-step attention numbers on any model, success with
the toy world's judge (its detector), the statistics, `sepen evaluate` and its errors."""

import json

import pytest

from sepen_core.cli import main as sepen
from sepen_core.config import SampleConfig
from sepen_core.errors import ConfigError
from sepen_core.evaluation import EvaluationConfig, EvaluationPrompt, evaluate_adapter, load_judge
from sepen_core.model_card import model_card
from sepen_core.models import load_model
from sepen_core.sampling import generate
from sepen_core.stats import mcnemar_p, paired_difference, wilson_interval
from tests.interop import spectral_adapter
from toyworld.judge import WorldJudge

STEPS = 3


def test_the_maps_of_both_sides_on_a_model_without_a_judge(tiny_model):
    adapter = spectral_adapter(tiny_model, seed=3, top=2.0)
    prompts = [EvaluationPrompt("a cat and a dog", ("cat", "dog")), EvaluationPrompt("a photo of a dog", ("dog",))]
    config = EvaluationConfig(samples=2, seed=7, sample=SampleConfig(num_inference_steps=STEPS))
    done = []
    report = evaluate_adapter(tiny_model, adapter, prompts, config, on_prompt=lambda i, n: done.append((i, n)))
    assert done == [(1, 2), (2, 2)]
    assert report["judged"] is False and report["summary"]["paired"] is None
    first = report["prompts"][0]
    assert first["concepts"] == ["cat", "dog"] and first["paired"] is None and first["base"]["success"] is None
    assert len(first["base"]["min_peak_by_step"]) == STEPS and first["adapter"]["overlap"] is not None
    assert report["prompts"][1]["base"]["overlap"] is None  # one object: no pair to overlap
    # Paired seeds: the base side's images are the base model's own for seeds 7, 8 (prompt 0) and 1007 (prompt 1).
    alone = generate(
        tiny_model,
        "a cat and a dog",
        SampleConfig(num_inference_steps=STEPS, num_images=2, seed=7),
        concepts=["cat", "dog"],
    )
    assert first["base"]["min_peak"] == pytest.approx(sum(s.min_peak for s in alone.scores) / 2, abs=1e-5)
    assert first["adapter"]["min_peak"] != pytest.approx(first["base"]["min_peak"], abs=1e-6)
    json.dumps(report)  # what a job stores


def test_the_toy_worlds_judge_counts_drawn_objects():
    model = load_model("toy")
    card = model_card("toy")
    judge = load_judge(card.judge, card.path)
    assert isinstance(judge, WorldJudge) and len(judge.default_prompts()) == len(judge.world.test_pairs)
    # A strong random adapter on the keys: the toy model stops drawing what it is asked.
    adapter = spectral_adapter(model, seed=1, top=20.0)
    prompts = judge.default_prompts()[:2]
    report = evaluate_adapter(
        model, adapter, prompts, EvaluationConfig(samples=4, seed=0, sample=model.defaults.sample_config()), judge=judge
    )
    rows = report["prompts"]
    base_successes = [round(r["base"]["success"] * 4) for r in rows]
    adapter_successes = [round(r["adapter"]["success"] * 4) for r in rows]
    summary = report["summary"]
    assert summary["base"]["success"] == sum(base_successes) / 8
    assert summary["adapter"]["success"] == sum(adapter_successes) / 8
    assert summary["base"]["success"] >= 0.25  # the base model draws some pairs whole
    paired = summary["paired"]
    assert paired["difference"] == pytest.approx(summary["adapter"]["success"] - summary["base"]["success"])
    assert paired["p_mcnemar"] == mcnemar_p(paired["gained"], paired["lost"])
    low, high = summary["base"]["success_ci95"]
    assert low <= summary["base"]["success"] <= high


def test_statistics():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 10)
    assert low < 0.5 < high and low == pytest.approx(1 - high)
    d = paired_difference([True, False, False, True], [True, True, True, False])
    assert (d["gained"], d["lost"], d["difference"]) == (2, 1, 0.25)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(6, 0) == pytest.approx(2 / 64)


def test_bad_settings_name_their_field(tiny_model):
    adapter = spectral_adapter(tiny_model)
    with pytest.raises(ConfigError) as caught:
        evaluate_adapter(tiny_model, adapter, [])
    assert caught.value.field == "prompts"
    with pytest.raises(ConfigError) as caught:
        EvaluationPrompt("a cat", ())
    assert caught.value.field == "prompts"
    with pytest.raises(ConfigError) as caught:
        EvaluationConfig(samples=0)
    assert caught.value.field == "samples"


def test_sepen_evaluate_on_the_toy_model(tmp_path, capsys):
    model = load_model("toy")
    path = tmp_path / "random.safetensors"
    spectral_adapter(model, seed=2, top=20.0).save(path)
    report_file = tmp_path / "report.json"
    code = sepen(
        ["evaluate", str(path), "--prompt", "a cherry and a sofa", "--concepts", "cherry", "sofa",
         "--samples", "2", "--steps", "4", "--json", str(report_file)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "a cherry and a sofa" in out and "all prompts" in out and "success change" in out
    report = json.loads(report_file.read_text())
    assert report["judged"] is True and report["sample"]["num_inference_steps"] == 4
    assert len(report["prompts"][0]["base"]["min_peak_by_step"]) == 4


def test_sepen_evaluate_errors(tmp_path, capsys):
    path = tmp_path / "a.safetensors"
    spectral_adapter(load_model("tiny")).save(path)
    assert sepen(["evaluate", str(path), "--model", "tiny"]) == 2
    assert "--prompt" in capsys.readouterr().err  # no judge: the prompts must be given
    assert sepen(["evaluate", str(path), "--model", "tiny", "--prompt", "a cat", "--prompt", "a dog",
                  "--concepts", "cat"]) == 2  # fmt: skip
    assert "one --concepts list after each --prompt" in capsys.readouterr().err
