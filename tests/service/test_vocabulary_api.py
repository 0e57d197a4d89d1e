"""A model with a closed vocabulary (the bundled toy model: its world's nouns) refuses the concepts it cannot draw,
in POST /finetune, /generate and /evaluate, with a 422 naming the concept's field and listing its nouns; GET /models
lists each model's vocabulary (null: open, any word goes, as on the tiny model), the default model first."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sepen_core.model_card import model_card
from sepen_core.prompts import ConceptSet
from service.app import create_app
from tests.service.conftest import MODELS

TOY_NOUNS = list(model_card("toy").nouns)


def test_models_list_the_toy_models_vocabulary_and_null_for_open_ones(toy_client, auth):
    models = {m["name"]: m for m in toy_client.get("/models", headers=auth).json()}
    assert models["sepen-toy"]["vocabulary"] == TOY_NOUNS == models["sepen-toy"]["nouns"]
    assert len(TOY_NOUNS) == 24 and "cherry" in TOY_NOUNS and "giraffe" not in TOY_NOUNS
    assert models["sepen-tiny"]["vocabulary"] is None and models["sd15"]["vocabulary"] is None  # sd15: no card here


def test_the_default_model_comes_first_with_what_an_empty_request_gets_and_the_tiny_model_has_a_note(
    service_settings, auth
):
    settings = service_settings.with_(models={**MODELS, "sepen-toy": "toy"}, default_model="sepen-toy")
    with TestClient(create_app(settings)) as client:
        models = client.get("/models", headers=auth).json()
    assert [(m["name"], m["default"]) for m in models] == [("sepen-toy", True), ("sepen-tiny", False), ("sd15", False)]
    toy, tiny, sd15 = models
    assert toy["note"] is None and "its images are noise" in tiny["note"] and sd15["note"] is None
    # The toy model's own recipe over the paper's: the page's placeholders show these (seed 0 is the paper's).
    pairs = toy["resolved"]["finetune"]
    assert (pairs["steps"], pairs["learning_rate"], pairs["batch_size"], pairs["seed"]) == (150, 1e-4, 8, 0)
    assert pairs["maps"]["map_downsample"] == 2 and toy["resolved"]["sample"]["num_inference_steps"] == 20
    assert toy["resolved"]["templates"]["pairs"] == ["a photo of a {A} and a {B}"]
    assert sd15["resolved"] is None  # no card here


def assert_refuses(response, error_of, field: str, noun: str) -> None:
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "validation_error" and error["field"] == field
    message = error["message"]
    assert message.startswith(f"{field}: model 'sepen-toy' cannot draw {noun!r}")
    assert ", ".join(TOY_NOUNS) in message and "GET /models" in message


def finetune(concepts: dict, model: str = "sepen-toy") -> dict:
    return {"adapter": "pair", "model": model, "concepts": concepts, "recipe": {"steps": 2}}


@pytest.mark.parametrize(
    "concepts, field, noun",
    [
        ({"pairs": [["cherry", "giraffe"]]}, "concepts.pairs.0.1", "giraffe"),
        ({"pairs": [["cherry", "sofa"], ["zebra", "moon"]]}, "concepts.pairs.1.0", "zebra"),
        ({"collection": ["cherry", "sofa", "giraffe"]}, "concepts.collection.2", "giraffe"),
        ({"collection": "large-scale"}, "concepts.collection", None),  # the 220 concepts are not the toy world's
    ],
)
def test_a_finetune_on_nouns_the_toy_model_cannot_draw_is_422(toy_client, auth, error_of, concepts, field, noun):
    if noun is None:  # the first of the large-scale concepts that is no noun of the toy world
        noun = next(c for c in ConceptSet.large_scale().collection if c not in TOY_NOUNS)
    response = toy_client.post("/finetune", json=finetune(concepts), headers=auth)
    assert_refuses(response, error_of, field, noun)


def test_the_toy_models_nouns_in_any_case_and_any_word_on_an_open_model_are_accepted(toy_client, auth):
    accepted = toy_client.post("/finetune", json=finetune({"pairs": [["Cherry", "sofa "]]}), headers=auth)
    assert accepted.status_code == 202, accepted.text
    open_model = finetune({"pairs": [["cherry", "giraffe"]]}, model="sepen-tiny")
    assert toy_client.post("/finetune", json=open_model, headers=auth).status_code == 202


def test_a_generate_naming_a_concept_the_toy_model_cannot_draw_is_422(toy_client, auth, error_of):
    body = {"prompt": "a cherry and a giraffe", "model": "sepen-toy", "steps": 2}
    refused = toy_client.post("/generate", json={**body, "concepts": ["cherry", "giraffe"]}, headers=auth)
    assert_refuses(refused, error_of, "concepts.1", "giraffe")
    # The prompt itself is free text: only the concepts it names for maps and scores are the model's to know.
    assert toy_client.post("/generate", json=body, headers=auth).status_code == 202
    tiny = {**body, "model": "sepen-tiny", "concepts": ["cherry", "giraffe"]}
    assert toy_client.post("/generate", json=tiny, headers=auth).status_code == 202


def test_an_evaluation_naming_a_concept_the_toy_model_cannot_draw_is_422(toy_client, auth, tenant, publish, error_of):
    publish(tenant, "toy-pair", base_model="sepen-toy")
    prompts = [
        {"prompt": "a cherry and a sofa", "concepts": ["cherry", "sofa"]},
        {"prompt": "a cherry and a giraffe", "concepts": ["cherry", "giraffe"]},
    ]
    refused = toy_client.post("/evaluate", json={"adapter": "toy-pair", "prompts": prompts}, headers=auth)
    assert_refuses(refused, error_of, "prompts.1.concepts.1", "giraffe")
    accepted = toy_client.post("/evaluate", json={"adapter": "toy-pair", "prompts": prompts[:1]}, headers=auth)
    assert accepted.status_code == 202, accepted.text
