"""Settings and concept sets reject bad values with an error that names the field."""

import random

import pytest

from sepen_core.config import FinetuneConfig, MapConfig, ModelDefaults, SampleConfig
from sepen_core.errors import ConfigError
from sepen_core.prompts import ConceptSet, default_group_template


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (FinetuneConfig, "steps", 0),
        (FinetuneConfig, "learning_rate", -1.0),
        (FinetuneConfig, "batch_size", 1000),
        (FinetuneConfig, "grad_mode", "fast"),
        (FinetuneConfig, "prior_weight", -0.1),
        (FinetuneConfig, "latent_size", 30),
        (SampleConfig, "num_inference_steps", 0),
        (SampleConfig, "height", 100),
        (SampleConfig, "num_images", 65),
        (SampleConfig, "guidance_scale", 99.0),
        (SampleConfig, "guidance_method", "excite"),
        (SampleConfig, "excite_scale", 0.0),
        (SampleConfig, "excite_scale", 20_000.0),
        (SampleConfig, "excite_scale", True),
        (MapConfig, "normalization", "softmax"),
        (MapConfig, "map_downsample", 3),
    ],
)
def test_out_of_range_values_name_their_field(cls, field, value):
    with pytest.raises(ConfigError) as info:
        cls(**{field: value})
    assert info.value.field == field and field in str(info.value)


def test_round_trip_and_unknown_keys():
    config = FinetuneConfig.large_scale(seed=3, maps=MapConfig(normalization="content"))
    assert config.steps == 10_000 and config.learning_rate == 4e-6 and config.prior_weight == 0.5
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="learning_rat"):
        FinetuneConfig.from_dict({"learning_rat": 1e-5})


def test_group_templates():
    assert default_group_template(2) == "a photo of a {A} and a {B}"
    assert default_group_template(3) == "a photo of a {A}, a {B} and a {C}"
    triple = ConceptSet.pairs(("cat", "dog", "bird")).sample(random.Random(0))
    assert triple.prompt == "a photo of a cat, a dog and a bird" and triple.concepts == ("cat", "dog", "bird")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(groups=(("cat",),)), "groups"),
        (dict(groups=(("cat", "cat"),)), "groups"),
        (dict(groups=(("cat", "dog"),), collection=("a", "b")), "concepts"),
        (dict(), "concepts"),
        (dict(collection=("cat", "dog"), held_out=("cow",)), "held_out"),
        (dict(collection=("cat", "dog"), held_out=("dog",)), "collection"),
        (dict(groups=(("cat", "dog"),), templates=("a {A} and a {C}",)), "templates"),
        (dict(groups=(("cat", "dog"),), templates=("a {A} alone",)), "templates"),
        (dict(groups=(("cat", "{dog}"),)), "groups"),
    ],
)
def test_bad_concept_sets(kwargs, field):
    with pytest.raises(ConfigError) as info:
        ConceptSet(**kwargs)
    assert info.value.field == field


def test_large_scale_set_holds_out_twenty():
    concepts = ConceptSet.large_scale()
    assert len(concepts.collection) == 220 and len(concepts.held_out) == 20
    assert len(concepts.training_concepts) == 200 and not set(concepts.held_out) & set(concepts.training_concepts)
    assert ConceptSet.from_dict(concepts.to_dict()) == concepts


def test_model_defaults_sit_between_the_papers_recipe_and_the_request():
    defaults = ModelDefaults(
        sample={"guidance_scale": 1.0, "num_inference_steps": 20},
        maps={"map_downsample": 2},
        finetune={"learning_rate": 1e-3},
        large_scale={"steps": 300},
    )
    sample = defaults.sample_config({"num_inference_steps": 5, "seed": 3, "maps": {"normalization": "content"}})
    assert (sample.num_inference_steps, sample.guidance_scale, sample.seed) == (5, 1.0, 3)
    assert sample.maps == MapConfig(map_downsample=2, normalization="content")
    pairs = defaults.finetune_config("groups", {"steps": 7, "maps": {"map_downsample": 4}})
    assert (pairs.steps, pairs.learning_rate, pairs.maps.map_downsample) == (7, 1e-3, 4)
    collection = defaults.finetune_config("collection")
    assert (collection.steps, collection.learning_rate, collection.prior_weight) == (
        300,
        4e-6,
        0.5,
    )  # the paper's, but steps
    assert collection.maps.map_downsample == 2
    assert (
        ModelDefaults().finetune_config("groups") == FinetuneConfig()
        and ModelDefaults().sample_config() == SampleConfig()
    )
    assert ModelDefaults.from_dict(defaults.to_dict()) == defaults


@pytest.mark.parametrize(
    "section, value, field",
    [
        ("sample", {"guidance_scale": -1}, "sepen_defaults.guidance_scale"),
        ("maps", {"map_downsample": 3}, "sepen_defaults.map_downsample"),
        ("finetune", {"sceps": 3}, "sepen_defaults.sceps"),
        ("large_scale", {"maps": {}}, "large_scale"),
    ],
)
def test_model_defaults_are_checked_when_made(section, value, field):
    with pytest.raises(ConfigError) as caught:
        ModelDefaults(**{section: value})
    assert caught.value.field == field


def test_attend_and_excite_cost_bound_follows_its_schedule():
    from sepen_core.config import AE_UPDATE_COST, attend_excite_evaluations, guidance_cost

    # 50 steps: 25 updated steps, refinement at steps 0, 10 and 20 (up to 20 evaluations each); 20 steps: 10; 0, 4, 8
    assert attend_excite_evaluations(50) == 25 + 3 * 20 and attend_excite_evaluations(20) == 10 + 3 * 20
    assert attend_excite_evaluations(3) == 2 + 2 * 20  # steps 0 and 1 updated (round half to even), both refined
    assert attend_excite_evaluations(1) == 0  # round(0.5) is 0, as AttendExcite rounds: no update
    assert guidance_cost("none", 20) == 1.0
    assert guidance_cost("attend-excite", 50) == pytest.approx(1 + AE_UPDATE_COST * 85 / 50)
    with pytest.raises(ConfigError) as info:
        guidance_cost("excite", 20)
    assert info.value.field == "guidance_method"
