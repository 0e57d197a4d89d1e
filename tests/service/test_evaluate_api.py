"""POST /evaluate: the adapter version and the seed are pinned at submission; a model without a judge needs prompts;
bad fields are 422s naming them; GET /adapters/{name} shows a version's latest evaluation."""

from __future__ import annotations

import pytest

from sepen_store.contract import EvaluateResult
from sepen_store.jobs import claim_job, finish_job
from sepen_store.tables import Job

PROMPTS = [{"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}]


def test_prompts_are_stored_with_the_pinned_version_and_a_seed(client, auth, tenant, publish, db, redis_client):
    publish(tenant, "cat-dog")
    version = publish(tenant, "cat-dog")
    before = redis_client.llen("sepen.evaluate")
    response = client.post("/evaluate", json={"adapter": "cat-dog", "prompts": PROMPTS, "steps": 4}, headers=auth)
    assert response.status_code == 202, response.text
    job = response.json()
    request = job["request"]
    assert job["kind"] == "evaluate" and job["status"] == "queued"
    assert request["adapter"] == "cat-dog@2" and request["model"] == "sepen-tiny"
    assert request["prompts"] == PROMPTS and request["samples"] == 8 and request["sample"] == {"num_inference_steps": 4}
    assert 0 <= request["seed"] < 2**30
    assert db.get(Job, job["id"]).adapter_version_id == version.id
    assert redis_client.llen("sepen.evaluate") == before + 1
    listed = client.get("/jobs", params={"kind": "evaluate"}, headers=auth).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]


def test_a_model_without_a_judge_needs_prompts_and_one_with_a_judge_has_its_own(
    client, toy_client, auth, tenant, publish, error_of
):
    publish(tenant, "tiny-one")
    response = client.post("/evaluate", json={"adapter": "tiny-one"}, headers=auth)
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "prompts" and "judge" in error["message"]
    publish(tenant, "toy-one", base_model="sepen-toy")
    response = toy_client.post("/evaluate", json={"adapter": "toy-one", "samples": 2, "seed": 5}, headers=auth)
    assert response.status_code == 202, response.text
    request = response.json()["request"]
    assert request["prompts"] == [] and request["model"] == "sepen-toy" and request["seed"] == 5


@pytest.mark.parametrize(
    "change, field",
    [
        ({"samples": 0}, "samples"),
        ({"samples": 33}, "samples"),
        ({"seed": -1}, "seed"),
        ({"steps": 0}, "steps"),
        ({"guidance": 31.0}, "guidance"),
        ({"prompts": [{"prompt": "a cat", "concepts": ["dog"]}]}, "prompts.0.concepts"),
        ({"prompts": [{"prompt": "   ", "concepts": ["cat"]}]}, "prompts.0.prompt"),
        ({"prompts": [{"prompt": "a cat", "concepts": []}]}, "prompts.0.concepts"),
        ({"prompts": PROMPTS * 65}, "prompts"),
        ({"adapter": "Bad Name"}, "adapter"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, auth, tenant, publish, error_of, change, field):
    publish(tenant, "cat-dog")
    response = client.post("/evaluate", json={"adapter": "cat-dog", "prompts": PROMPTS, **change}, headers=auth)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field


def test_unknown_adapters_and_unserved_base_models(client, auth, tenant, publish, error_of):
    response = client.post("/evaluate", json={"adapter": "nope", "prompts": PROMPTS}, headers=auth)
    assert response.status_code == 404 and error_of(response)["code"] == "adapter_not_found"
    publish(tenant, "elsewhere", base_model="gone-model")
    response = client.post("/evaluate", json={"adapter": "elsewhere", "prompts": PROMPTS}, headers=auth)
    assert response.status_code == 422
    error = error_of(response)
    assert error["field"] == "adapter" and "gone-model" in error["message"]


def evaluation_result(ref: str) -> dict:
    side = {"success": 0.5, "success_ci95": [0.2, 0.8], "min_peak": 0.1, "overlap": 0.3, "min_peak_by_step": None}
    better = {**side, "success": 0.75, "min_peak": 0.2}
    paired = {"difference": 0.25, "ci95": [-0.1, 0.6], "gained": 3, "lost": 1, "p_mcnemar": 0.625}
    row = {
        "prompt": PROMPTS[0]["prompt"],
        "concepts": ["cat", "dog"],
        "base": side,
        "adapter": better,
        "paired": paired,
    }
    return EvaluateResult.model_validate(
        {
            "adapter": ref,
            "model": "sepen-tiny",
            "judged": True,
            "samples_per_prompt": 8,
            "seed": 1,
            "sample": {"num_inference_steps": 4},
            "prompts": [row],
            "summary": {"base": side, "adapter": better, "paired": paired},
        }
    ).model_dump()


def test_the_adapter_shows_its_latest_evaluation(client, auth, tenant, publish, db):
    publish(tenant, "shown")
    assert client.get("/adapters/shown", headers=auth).json()["versions"][0]["evaluation"] is None
    job_id = client.post("/evaluate", json={"adapter": "shown", "prompts": PROMPTS}, headers=auth).json()["id"]
    claim = claim_job(db, job_id, "test-worker", 60)
    assert finish_job(db, claim, "succeeded", result=evaluation_result("shown@1"))
    version = client.get("/adapters/shown", headers=auth).json()["versions"][0]
    evaluation = version["evaluation"]
    assert evaluation["job"] == f"/jobs/{job_id}" and evaluation["judged"] is True and evaluation["prompts"] == 1
    assert evaluation["summary"]["paired"]["difference"] == 0.25
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["result"]["prompts"][0]["prompt"] == PROMPTS[0]["prompt"]
    assert job["links"]["adapter"] == "/adapters/shown/1/weights"
    listed = client.get("/jobs", params={"kind": "evaluate"}, headers=auth).json()["jobs"][0]
    assert listed["result"]["prompts"] == [] and listed["result"]["summary"]["paired"]["gained"] == 3
