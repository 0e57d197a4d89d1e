"""POST /generate: the adapter version and seed are pinned at submission, and every bad field is a 422 naming it."""

from __future__ import annotations

import pytest

from sepen_core.config import MapConfig, ModelDefaults, SampleConfig
from sepen_store.tables import Job

PROMPT = "a photo of a cat and a dog"


def test_defaults_and_a_stored_random_seed(client, auth, db, redis_client):
    before = redis_client.llen("sepen.generate")
    response = client.post("/generate", json={"prompt": PROMPT}, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()
    request = job["request"]
    seed = request["sample"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    assert request == {
        "prompt": PROMPT,
        "model": "sepen-tiny",
        "adapter": None,
        "concepts": [],
        "sample": {"num_images": 1, "seed": seed, "negative_prompt": "", "maps": {}},
    }
    assert ModelDefaults().sample_config(request["sample"]) == SampleConfig(seed=seed)  # a model without defaults
    assert job["kind"] == "generate" and job["status"] == "queued"
    assert redis_client.llen("sepen.generate") == before + 1
    assert db.get(Job, job["id"]).enqueued_at is not None


def test_every_setting_reaches_the_sample_config(client, auth):
    body = {
        "prompt": PROMPT,
        "model": "sd15",
        "images": 3,
        "steps": 20,
        "guidance": 7.5,
        "height": 256,
        "width": 128,
        "seed": 42,
        "negative_prompt": "blurry",
        "concepts": ["cat", "dog"],
        "normalization": "content",
        "map_downsample": 2,
    }
    response = client.post("/generate", json=body, headers=auth)
    assert response.status_code == 202, response.text
    request = response.json()["request"]
    assert request["model"] == "sd15" and request["concepts"] == ["cat", "dog"]
    resolved = ModelDefaults(sample={"guidance_scale": 1.0}, maps={"map_downsample": 4}).sample_config(
        request["sample"]
    )
    assert resolved == SampleConfig(
        num_inference_steps=20,
        guidance_scale=7.5,
        height=256,
        width=128,
        num_images=3,
        seed=42,
        negative_prompt="blurry",
        maps=MapConfig(normalization="content", map_downsample=2),
    )


def test_adapter_is_pinned_to_a_version(client, auth, tenant, publish, db):
    first = publish(tenant, "cat-dog")
    second = publish(tenant, "cat-dog")
    latest = client.post("/generate", json={"prompt": PROMPT, "adapter": "cat-dog"}, headers=auth)
    pinned = client.post("/generate", json={"prompt": PROMPT, "adapter": "cat-dog@1"}, headers=auth)
    assert latest.status_code == pinned.status_code == 202
    assert latest.json()["request"]["adapter"] == "cat-dog@2"
    assert pinned.json()["request"]["adapter"] == "cat-dog@1"
    assert db.get(Job, latest.json()["id"]).adapter_version_id == second.id
    assert db.get(Job, pinned.json()["id"]).adapter_version_id == first.id


def test_model_follows_the_adapters_base_model(client, auth, tenant, publish, error_of):
    publish(tenant, "sd-style", base_model="sd15")
    response = client.post("/generate", json={"prompt": PROMPT, "adapter": "sd-style"}, headers=auth)
    assert response.status_code == 202 and response.json()["request"]["model"] == "sd15"
    mismatch = client.post(
        "/generate", json={"prompt": PROMPT, "adapter": "sd-style", "model": "sepen-tiny"}, headers=auth
    )
    assert mismatch.status_code == 422 and error_of(mismatch)["field"] == "model"


@pytest.mark.parametrize("ref", ["nope", "nope@1", "cat-dog@9"])
def test_unknown_adapter_is_404_naming_it(client, auth, tenant, publish, error_of, ref):
    publish(tenant, "cat-dog")
    response = client.post("/generate", json={"prompt": PROMPT, "adapter": ref}, headers=auth)
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "adapter_not_found" and error["field"] == "adapter" and ref in error["message"]


def test_another_tenants_adapter_is_not_found(client, other_auth, tenant, publish, error_of):
    publish(tenant, "mine")
    response = client.post("/generate", json={"prompt": PROMPT, "adapter": "mine"}, headers=other_auth)
    assert response.status_code == 404 and error_of(response)["code"] == "adapter_not_found"


def test_unknown_model_is_404_naming_it(client, auth, error_of):
    response = client.post("/generate", json={"prompt": PROMPT, "model": "sd-xxl"}, headers=auth)
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found" and error["field"] == "model" and "sd-xxl" in error["message"]


INVALID = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"images": 0}, "images"),
    ({"images": 9}, "images"),
    ({"steps": 0}, "steps"),
    ({"steps": 201}, "steps"),
    ({"guidance": -0.5}, "guidance"),
    ({"guidance": 30.5}, "guidance"),
    ({"height": 100}, "height"),
    ({"height": 4}, "height"),
    ({"height": 136}, "height"),  # sepen-tiny draws 64 pixels: at most 128
    ({"width": 8}, "width"),  # sepen-tiny's VAE halves: its sizes are multiples of 16
    ({"height": 40}, "height"),
    ({"width": 1032}, "width"),
    ({"width": 2056}, "width"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**31}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"negative_prompt": "x" * 1001}, "negative_prompt"),
    ({"concepts": ["cat"]}, "concepts"),
    ({"concepts": ["cat", "dog", "a", "photo", "of", "and", "cat2", "dog2", "x"]}, "concepts"),
    ({"concepts": ["cat", "horse"]}, "concepts"),
    ({"concepts": ["ca", "dog"]}, "concepts"),  # 'ca' is not a whole word of the prompt
    ({"concepts": ["cat", "cat"]}, "concepts"),
    ({"concepts": ["cat", ""]}, "concepts.1"),
    ({"normalization": "softmax"}, "normalization"),
    ({"map_downsample": 3}, "map_downsample"),
    ({"map_downsample": "2"}, "map_downsample"),
    ({"adapter": "Bad Name"}, "adapter"),
    ({"adapter": "cat-dog@0"}, "adapter"),
    ({"adapter": "cat-dog@x"}, "adapter"),
    ({"sampler": "ddim"}, "sampler"),
    ({"guidance_method": "excite"}, "guidance_method"),
    ({"guidance_method": 1}, "guidance_method"),
    ({"guidance_method": "attend-excite"}, "concepts"),  # A&E lifts the named objects: it needs them
    ({"guidance_method": "attend-excite", "concepts": ["cat", "dog"], "excite_scale": 0}, "excite_scale"),
    ({"guidance_method": "attend-excite", "concepts": ["cat", "dog"], "excite_scale": 100.5}, "excite_scale"),
    ({"guidance_method": "attend-excite", "concepts": ["cat", "dog"], "excite_scale": "20"}, "excite_scale"),
    ({"excite_scale": 20}, "excite_scale"),  # A&E's alone
    ({"guidance_method": "none", "concepts": ["cat", "dog"], "excite_scale": 20}, "excite_scale"),
]


@pytest.mark.parametrize(
    "change, field", INVALID, ids=[",".join(f"{k}={v!r:.20}" for k, v in c.items()) for c, _ in INVALID]
)
def test_invalid_fields_are_422_naming_the_field(client, auth, error_of, change, field):
    response = client.post("/generate", json={"prompt": PROMPT, **change}, headers=auth)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "validation_error" and error["field"] == field and error["message"]


def test_missing_prompt_is_422(client, auth, error_of):
    response = client.post("/generate", json={"images": 2}, headers=auth)
    assert response.status_code == 422 and error_of(response)["field"] == "prompt"


def test_concepts_match_whole_words_case_insensitively(client, auth):
    body = {"prompt": "A Teddy Bear and a hot-dog", "concepts": ["teddy bear", "dog"]}
    assert client.post("/generate", json=body, headers=auth).status_code == 202


def test_idempotent_retry_without_a_seed_is_the_same_job(client, auth, redis_client):
    headers = {**auth, "Idempotency-Key": "generate-once"}
    before = redis_client.llen("sepen.generate")
    first = client.post("/generate", json={"prompt": PROMPT}, headers=headers)
    again = client.post("/generate", json={"prompt": PROMPT}, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json() == again.json()
    assert redis_client.llen("sepen.generate") == before + 1


def test_broker_down_still_accepts_the_job(down_client, api_key, db):
    response = down_client.post("/generate", json={"prompt": PROMPT}, headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 202, response.text
    job = db.get(Job, response.json()["id"])
    assert job.status == "queued" and job.enqueued_at is None


def test_each_models_own_size_limit(client, auth, error_of):
    """Twice the native size is allowed (sepen-tiny: 128); a model whose files the gateway cannot read (sd15 here)
    keeps the service's wide limit, and its jobs are bounded by the worker's time limit."""
    assert (
        client.post("/generate", json={"prompt": PROMPT, "height": 128, "width": 128}, headers=auth).status_code == 202
    )
    refused = client.post("/generate", json={"prompt": PROMPT, "height": 1024, "width": 1024}, headers=auth)
    assert refused.status_code == 422
    assert (
        error_of(refused)["field"] == "height"
        and "at most 128 pixels for model 'sepen-tiny'" in (error_of(refused)["message"])
    )
    wide = {"prompt": PROMPT, "model": "sd15", "height": 1024, "width": 1024}
    assert client.post("/generate", json=wide, headers=auth).status_code == 202


def test_image_steps_are_bounded_so_the_largest_request_fits_the_time_limit(client, auth, error_of):
    """limits.max_image_steps (1600 at the native size, bench/generate_limits.py): 8 images of 200 steps pass at
    sepen-tiny's native 64 pixels; at 128 pixels an image-step weighs 16 (four times the area, squared), so 1 image
    of 100 steps passes and 2 of 200 do not: the error names the steps the request gave."""
    most = {"prompt": PROMPT, "images": 8, "steps": 200}
    assert client.post("/generate", json=most, headers=auth).status_code == 202
    double = {"prompt": PROMPT, "height": 128, "width": 128}
    assert client.post("/generate", json={**double, "images": 1, "steps": 100}, headers=auth).status_code == 202
    refused = client.post("/generate", json={**double, "images": 2, "steps": 200}, headers=auth)
    assert refused.status_code == 422 and error_of(refused)["field"] == "steps"
    assert "6400 image-steps" in error_of(refused)["message"] and "max_image_steps" in error_of(refused)["message"]
    # Without steps, the model's own (50) count, and the images are named.
    refused = client.post("/generate", json={**double, "images": 3}, headers=auth)
    assert refused.status_code == 422 and error_of(refused)["field"] == "images"


def harm_check(verdict: str, pair_verdict: str) -> dict:
    """A do-no-harm check as a finetune records it in its version's metadata (its summary)."""
    paired = {"difference": -0.4, "ci95": [-0.6, -0.2], "gained": 1, "lost": 14, "p_mcnemar": 0.001}
    row = {"base": {"success": 0.7}, "adapter": {"success": 0.3}, "paired": paired, "verdict": pair_verdict}
    return {
        "verdict": verdict,
        "pairs": [{"concepts": ["cat", "dog"], **row}],
        "nouns": [],
        "images": 128,
        "samples_per_prompt": 16,
        "seed": 900_000_000,
    }


def test_sampling_with_an_adapter_its_check_found_hurting_warns_without_refusing(client, auth, tenant, publish):
    publish(tenant, "hurts", metadata={"summary": {"check": harm_check("hurts", "hurts")}})
    publish(tenant, "fine", metadata={"summary": {"check": harm_check("no clear effect", "no clear effect")}})
    warned = client.post("/generate", json={"prompt": PROMPT, "adapter": "hurts"}, headers=auth)
    assert warned.status_code == 202
    (warning,) = warned.json()["warnings"]
    assert "hurts@1" in warning and "cat and dog" in warning and "versions[].check" in warning
    quiet = client.post("/generate", json={"prompt": PROMPT, "adapter": "fine"}, headers=auth)
    assert quiet.status_code == 202 and quiet.json()["warnings"] == []
    assert client.post("/generate", json={"prompt": PROMPT}, headers=auth).json()["warnings"] == []
    (version,) = client.get("/adapters/hurts", headers=auth).json()["versions"]
    assert version["check"]["verdict"] == "hurts" and version["check"]["pairs"][0]["paired"]["lost"] == 14
    listed = {a["name"]: a["verdict"] for a in client.get("/adapters", headers=auth).json()}
    assert listed == {"hurts": "hurts", "fine": "no clear effect"}  # the newest version's verdict, in the list


def test_attend_and_excite_is_stored_and_weighs_its_cost(client, auth, error_of):
    """guidance_method and excite_scale reach the stored sample settings; an A&E image-step weighs A&E's cost bound at
    its steps (sepen_core.config.guidance_cost): 50 steps cost 7.8 plain images, so 4 images pass 1600 image-steps
    (1560) and 5 do not (1950), naming the images; the plain request of 5 images passes."""
    body = {"prompt": PROMPT, "concepts": ["cat", "dog"], "guidance_method": "attend-excite", "excite_scale": 30}
    response = client.post("/generate", json={**body, "images": 4}, headers=auth)
    assert response.status_code == 202, response.text
    sample = response.json()["request"]["sample"]
    assert sample["guidance_method"] == "attend-excite" and sample["excite_scale"] == 30
    config = ModelDefaults().sample_config(sample)
    assert config.guidance_method == "attend-excite" and config.excite_scale == 30
    refused = client.post("/generate", json={**body, "images": 5}, headers=auth)
    assert refused.status_code == 422 and error_of(refused)["field"] == "images"
    assert "attend-excite" in error_of(refused)["message"] and "1950 image-steps" in error_of(refused)["message"]
    plain = {"prompt": PROMPT, "concepts": ["cat", "dog"], "images": 5}
    assert client.post("/generate", json=plain, headers=auth).status_code == 202
    published = {"prompt": PROMPT, "concepts": ["cat", "dog"], "guidance_method": "attend-excite"}
    response = client.post("/generate", json=published, headers=auth)
    assert response.status_code == 202 and "excite_scale" not in response.json()["request"]["sample"]
