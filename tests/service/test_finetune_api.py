"""POST /finetune: the request's overrides stored for the worker to lay over the model's recipe, 422s naming
the request field, idempotency, a broker that is down."""

from __future__ import annotations

import copy

import pytest

from sepen_core.config import FinetuneConfig, MapConfig, ModelDefaults
from sepen_core.prompts import ConceptSet
from sepen_store.tables import Job

PAIRS = {"adapter": "cat-dog", "concepts": {"pairs": [["cat", "dog"]]}}


def _json(value):
    """What a dict looks like after a JSON round trip (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))


def test_pairs_get_the_papers_pair_recipe_and_are_enqueued(client, auth, db, redis_client):
    before = redis_client.llen("sepen.finetune")
    response = client.post("/finetune", json=PAIRS, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()
    url = f"/jobs/{job['id']}"
    assert job["links"]["self"] == url == response.headers["location"]
    assert job["kind"] == "finetune" and job["status"] == "queued"
    assert job["links"]["cancel"] == f"{url}/cancel" and job["warnings"] == []
    # One job shape: the answer to the POST is the job as GET /jobs/{id} answers it, plus the POST's warnings.
    read = client.get(url, headers=auth).json()
    assert {k: v for k, v in job.items() if k != "warnings"} == read and "warnings" not in read
    assert job["request"] == {
        "adapter": "cat-dog",
        "model": "sepen-tiny",
        "concepts": _json(ConceptSet.pairs(("cat", "dog")).to_dict()),
        "recipe": {"maps": {}},
    }
    assert (
        ModelDefaults().finetune_config("groups", job["request"]["recipe"]) == FinetuneConfig()
    )  # a model without defaults
    assert redis_client.llen("sepen.finetune") == before + 1
    assert db.get(Job, job["id"]).enqueued_at is not None


def test_collection_gets_the_large_scale_recipe_with_overrides(client, auth):
    body = {
        "adapter": "animals",
        "model": "sd15",
        "templates": ["a {A} next to a {B}"],
        "concepts": {"collection": ["cat", "dog", "cow", "owl"], "held_out": ["owl"]},
        "recipe": {
            "steps": 50,
            "normalization": "content",
            "map_downsample": 2,
            "grad_mode": "local",
            "latents": "generated",
            "latent_pool": 128,
        },
    }
    response = client.post("/finetune", json=body, headers=auth)
    assert response.status_code == 202, response.text
    request = response.json()["request"]
    assert request["recipe"] == {
        "steps": 50,
        "grad_mode": "local",
        "latents": "generated",
        "latent_pool": 128,
        "maps": {"map_downsample": 2, "normalization": "content"},
    }
    expected = FinetuneConfig.large_scale(
        steps=50,
        grad_mode="local",
        latents="generated",
        latent_pool=128,
        maps=MapConfig(map_downsample=2, normalization="content"),
    )
    resolved = ModelDefaults().finetune_config("collection", request["recipe"])
    assert resolved == expected and resolved.learning_rate == 4e-6 and resolved.prior_weight == 0.5
    assert request["model"] == "sd15"
    assert request["concepts"]["held_out"] == ["owl"] and request["concepts"]["templates"] == ["a {A} next to a {B}"]


def test_trajectory_and_teacher_recipes_are_stored_as_given(client, auth):
    body = {"adapter": "cat-dog", "model": "sd15", "concepts": {"pairs": [["cat", "dog"]]}}
    recipe = {"latents": "attend-excite", "teacher_weight": 1, "trajectory_window": [0, 0.7]}
    response = client.post("/finetune", json={**body, "recipe": recipe}, headers=auth)
    assert response.status_code == 202, response.text
    stored = response.json()["request"]["recipe"]
    assert stored == {"latents": "attend-excite", "teacher_weight": 1, "trajectory_window": [0, 0.7], "maps": {}}
    resolved = ModelDefaults().finetune_config("groups", stored)
    assert resolved.teacher_weight == 1 and resolved.trajectory_window == (0, 0.7)


def test_large_scale_collection(client, auth):
    response = client.post(
        "/finetune", json={"adapter": "big", "concepts": {"collection": "large-scale"}}, headers=auth
    )
    assert response.status_code == 202, response.text
    request = response.json()["request"]
    assert request["concepts"] == _json(ConceptSet.large_scale().to_dict())
    assert ModelDefaults().finetune_config("collection", request["recipe"]).steps == 10_000


def _with(path: str, value):
    """PAIRS with the dotted `path` set to `value` (or removed when value is ...)."""
    body = copy.deepcopy(PAIRS)
    *parents, last = path.split(".")
    node = body
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return body


INVALID = [
    ("recipe.steps", 100_001, "recipe.steps"),
    ("recipe.steps", 0, "recipe.steps"),
    ("recipe.steps", "ten", "recipe.steps"),
    ("recipe.steps", True, "recipe.steps"),
    ("recipe.steps", 2.5, "recipe.steps"),
    ("recipe.batch_size", 65, "recipe.batch_size"),
    ("recipe.learning_rate", 2.0, "recipe.learning_rate"),
    ("recipe.learning_rate", 0, "recipe.learning_rate"),
    ("recipe.lambda_en", -1, "recipe.lambda_en"),
    ("recipe.prior_weight", 101, "recipe.prior_weight"),
    ("recipe.seed", -1, "recipe.seed"),
    ("recipe.grad_mode", "fast", "recipe.grad_mode"),
    ("recipe.normalization", "softmax", "recipe.normalization"),
    ("recipe.map_downsample", 3, "recipe.map_downsample"),
    ("recipe.latents", "images", "recipe.latents"),
    ("recipe.latent_pool", 5000, "recipe.latent_pool"),
    ("recipe.teacher_weight", 1.0, "recipe.teacher_weight"),  # a teacher needs latents "attend-excite"
    ("recipe.teacher_weight", -1, "recipe.teacher_weight"),
    ("recipe.trajectory_window", [0.7, 0.3], "recipe.trajectory_window"),
    ("recipe.trajectory_window", [0.1], "recipe.trajectory_window.1"),
    ("recipe.trajectory_window", [0, 1.5], "recipe.trajectory_window"),
    ("recipe.rank", 0, "recipe.rank"),
    ("recipe.rank", 2.5, "recipe.rank"),
    ("recipe.rank", 70_000, "recipe.rank"),
    ("recipe.energy", 0, "recipe.energy"),
    ("recipe.energy", 1.5, "recipe.energy"),
    ("recipe.energy", "most", "recipe.energy"),
    ("recipe.stepz", 10, "recipe.stepz"),
    ("recipe", [1], "recipe"),
    ("unknown", 1, "unknown"),
    ("adapter", ..., "adapter"),
    ("adapter", "Cat Dog", "adapter"),
    ("adapter", "cat-dog@2", "adapter"),
    ("adapter", "", "adapter"),
    ("model", 7, "model"),
    ("concepts", ..., "concepts"),
    ("concepts", {}, "concepts"),
    ("concepts.collection", ["cow", "owl"], "concepts"),
    ("concepts.pairs", [["cat"]], "concepts.pairs.0"),
    ("concepts.pairs", [["cat", ""]], "concepts.pairs.0.1"),
    ("concepts.pairs", [["cat", "cat"]], "concepts.pairs"),
    ("concepts.pairs", [["cat", "dog"]] * 501, "concepts.pairs"),
    ("concepts.pairs", [["cat", "{dog}"]], "concepts.pairs"),
    ("concepts.held_out", ["cat"], "concepts.held_out"),
    ("concepts.oops", 1, "concepts.oops"),
    ("templates", ["a photo of a {A}"], "templates"),
    ("templates", ["a {A} and a {C}"], "templates.0"),
    ("templates", "a {A} and a {B}", "templates"),
]


@pytest.mark.parametrize("path, value, field", INVALID, ids=[f"{p}={v!r:.20}" for p, v, _ in INVALID])
def test_invalid_fields_are_422_naming_the_field(client, auth, error_of, path, value, field):
    response = client.post("/finetune", json=_with(path, value), headers=auth)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "validation_error"
    assert error["field"] == field
    assert error["message"]


COLLECTION_INVALID = [
    ({"collection": ["cat"] * 2}, "concepts.collection"),
    ({"collection": ["cat", "dog"], "held_out": ["dog"]}, "concepts.collection"),  # fewer than 2 left to train on
    ({"collection": ["cat", "dog"], "held_out": ["cow"]}, "concepts.held_out"),
    ({"collection": [f"c{i}" for i in range(5001)]}, "concepts.collection"),
    ({"collection": "small-scale"}, "concepts.collection"),
    ({"collection": [1, 2]}, "concepts.collection"),
    ({"collection": "large-scale", "held_out": ["cat"]}, "concepts.held_out"),
    ({"collection": ["cat", "dog", "cow"], "held_out": "cow"}, "concepts.held_out"),
]


@pytest.mark.parametrize("concepts, field", COLLECTION_INVALID)
def test_invalid_collections_are_422_naming_the_field(client, auth, error_of, concepts, field):
    response = client.post("/finetune", json={"adapter": "a", "concepts": concepts}, headers=auth)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field


def test_a_collection_needs_two_slot_templates(client, auth, error_of):
    body = {"adapter": "a", "concepts": {"collection": ["cat", "dog", "cow"]}, "templates": ["a {A}, a {B} and a {C}"]}
    response = client.post("/finetune", json=body, headers=auth)
    assert response.status_code == 422 and error_of(response)["field"] == "templates"


def test_unknown_model_is_404_naming_it(client, auth, error_of):
    response = client.post("/finetune", json={**PAIRS, "model": "sd-xxl"}, headers=auth)
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found" and error["field"] == "model" and "sd-xxl" in error["message"]


@pytest.mark.parametrize("raw", [b'{"adapter": "a", ', b"[1, 2]", b'"text"', b"null"])
def test_malformed_or_non_object_json_is_422(client, auth, error_of, raw):
    response = client.post("/finetune", content=raw, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "validation_error"


def test_body_over_the_limit_is_413(client, auth, service_settings, error_of):
    huge = {**PAIRS, "templates": ["a {A} and a {B}" + " " * 250] * (service_settings.max_body_bytes // 250 + 10)}
    response = client.post("/finetune", json=huge, headers=auth)
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"


def test_streamed_body_over_the_limit_is_413(client, auth, service_settings, error_of):
    def chunks():  # no Content-Length: the bytes are counted as they arrive
        yield b'{"adapter": "a", "templates": ["'
        for _ in range(service_settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"], "concepts": {"pairs": [["cat", "dog"]]}}'

    response = client.post("/finetune", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert error_of(response)["code"] == "body_too_large"


def test_idempotency_key_returns_the_same_job_and_enqueues_once(client, auth, redis_client, error_of):
    headers = {**auth, "Idempotency-Key": "finetune-once"}
    before = redis_client.llen("sepen.finetune")
    first = client.post("/finetune", json=PAIRS, headers=headers)
    again = client.post("/finetune", json=PAIRS, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == again.json()["id"]
    assert first.json() == again.json()
    assert redis_client.llen("sepen.finetune") == before + 1

    different = client.post("/finetune", json={**PAIRS, "adapter": "other"}, headers=headers)
    assert different.status_code == 409
    assert error_of(different)["code"] == "idempotency_key_reused"
    assert redis_client.llen("sepen.finetune") == before + 1


def test_idempotency_keys_are_per_tenant(client, auth, other_auth):
    first = client.post("/finetune", json=PAIRS, headers={**auth, "Idempotency-Key": "shared"})
    second = client.post("/finetune", json=PAIRS, headers={**other_auth, "Idempotency-Key": "shared"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]


def test_idempotency_key_over_128_characters_is_422(client, auth, error_of):
    response = client.post("/finetune", json=PAIRS, headers={**auth, "Idempotency-Key": "k" * 129})
    assert response.status_code == 422
    assert error_of(response)["field"] == "Idempotency-Key"


def test_broker_down_still_accepts_the_job(down_client, api_key, db):
    response = down_client.post("/finetune", json=PAIRS, headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 202, response.text
    job = db.get(Job, response.json()["id"])
    assert job.status == "queued" and job.enqueued_at is None  # the reconciler will send it


def test_rank_and_energy_together_are_422_naming_energy_and_either_alone_is_stored(client, auth, error_of):
    both = client.post("/finetune", json=_with("recipe", {"rank": 8, "energy": 0.9}), headers=auth)
    assert both.status_code == 422 and error_of(both)["field"] == "recipe.energy", both.text
    assert "not both" in error_of(both)["message"]
    for recipe in ({"rank": 8}, {"energy": 0.99}):
        response = client.post("/finetune", json=_with("recipe", recipe), headers=auth)
        assert response.status_code == 202, response.text
        assert response.json()["request"]["recipe"] == {**recipe, "maps": {}}


@pytest.mark.parametrize("recipe", [{"steps": 100_000, "batch_size": 64}, {"batch_size": 64, "steps": 1251}])
def test_a_finetune_is_bounded_by_twice_its_models_largest_recipe(client, auth, error_of, recipe):
    """sepen-tiny keeps the paper's recipes: 10,000 steps x 4 at most in the large-scale one, so a finetune may take
    80,000 samples (limits.max_finetune_work in GET /models); 64 x 1250 passes, one step more does not."""
    refused = client.post("/finetune", json={**PAIRS, "recipe": recipe}, headers=auth)
    assert refused.status_code == 422 and error_of(refused)["field"] == "recipe.steps"
    assert "max_finetune_work" in error_of(refused)["message"]
    allowed = client.post("/finetune", json={**PAIRS, "recipe": {**recipe, "steps": 1250}}, headers=auth)
    assert allowed.status_code == 202, allowed.text
