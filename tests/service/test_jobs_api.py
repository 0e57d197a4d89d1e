"""Jobs: read, tenant isolation, cancel in every state, keyset pagination with filters, images and heatmaps."""

from __future__ import annotations

import pytest

from sepen_store.blobs import put_blob
from sepen_store.jobs import claim_job, finish_job, heartbeat
from sepen_store.tables import Job, JobImage

FINETUNE = {"adapter": "cat-dog", "concepts": {"pairs": [["cat", "dog"]]}}
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"pixels"


def _submit(client, auth, adapter="cat-dog") -> str:
    response = client.post("/finetune", json={**FINETUNE, "adapter": adapter}, headers=auth)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_read_a_job(client, auth):
    job_id = _submit(client, auth)
    response = client.get(f"/jobs/{job_id}", headers=auth)
    assert response.status_code == 200
    job = response.json()
    assert job["id"] == job_id and job["status"] == "queued" and job["progress"] is None and job["error"] is None
    assert set(job) == {
        "id",
        "kind",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
        "result",
        "error",
        "request",
        "links",
    }


def test_unknown_and_other_tenants_jobs_are_404(client, auth, other_auth, error_of):
    job_id = _submit(client, auth)
    for url in (f"/jobs/{job_id}", f"/jobs/{job_id}/images/0", f"/jobs/{job_id}/heatmaps/0"):
        response = client.get(url, headers=other_auth)
        assert response.status_code == 404
        assert error_of(response)["code"] == "job_not_found"
    assert client.post(f"/jobs/{job_id}/cancel", headers=other_auth).status_code == 404
    missing = client.get(f"/jobs/{'0' * 32}", headers=auth)
    assert missing.status_code == 404 and "0" * 32 in error_of(missing)["message"]
    malformed = client.get("/jobs/doesnotexist", headers=auth)  # not a job id at all
    assert malformed.status_code == 422 and error_of(malformed)["field"] == "job_id"
    assert "32 hex digits" in error_of(malformed)["message"]


def test_cancel_a_queued_job(client, auth):
    job_id = _submit(client, auth)
    response = client.post(f"/jobs/{job_id}/cancel", headers=auth)
    assert response.status_code == 202
    assert response.json()["status"] == "canceled" and response.json()["finished_at"] is not None
    assert response.json()["links"]["cancel"] is None
    again = client.post(f"/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 202 and again.json()["status"] == "canceled"


def test_a_finetune_loading_before_its_first_step_shows_its_phase_and_elapsed_time(client, auth, db):
    job_id = _submit(client, auth)
    claim = claim_job(db, job_id, "test-worker", lease_s=60)
    heartbeat(db, claim, {"phase": "loading", "step": 0, "total": 150, "elapsed_s": 12.5})
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "running"
    assert job["progress"] == {
        "phase": "loading",
        "step": 0,
        "total": 150,
        "eta_s": None,
        "elapsed_s": 12.5,
        "losses": None,
        "min_peak": None,
        "overlap": None,
        "peaks": {},
    }


def test_cancel_a_running_job_then_a_finished_one(client, auth, db, error_of):
    job_id = _submit(client, auth)
    claim = claim_job(db, job_id, "test-worker", lease_s=60)
    running = client.post(f"/jobs/{job_id}/cancel", headers=auth)
    assert running.status_code == 202 and running.json()["status"] == "canceling"

    other_id = _submit(client, auth)
    other = claim_job(db, other_id, "test-worker", lease_s=60)
    progress = {
        "step": 200,
        "total": 200,
        "eta_s": 0.0,
        "elapsed_s": 31.5,
        "min_peak": 0.7,
        "overlap": 0.1,
        "losses": {"total": 0.2, "separate": 0.1, "enhance": 0.2, "prior": None},
        "peaks": {"cat": 0.7},
    }
    assert finish_job(
        db,
        other,
        "succeeded",
        progress=progress,
        result={"adapter": "cat-dog@1", "name": "cat-dog", "version": 1, "sha256": "0" * 64, "summary": None},
    )
    done = client.post(f"/jobs/{other_id}/cancel", headers=auth)
    assert done.status_code == 409
    assert error_of(done)["code"] == "illegal_transition"
    finished = client.get(f"/jobs/{other_id}", headers=auth).json()
    # A report stored before finetune phases existed reads as a training report.
    assert finished["status"] == "succeeded" and finished["progress"] == {**progress, "phase": "training"}
    assert finished["links"]["adapter"] == "/adapters/cat-dog/1/weights"
    assert claim.attempt == 1


def test_failed_job_shows_its_error(client, auth, db):
    job_id = _submit(client, auth)
    claim = claim_job(db, job_id, "test-worker", lease_s=60)
    finish_job(db, claim, "failed", error_code="model_load_error", error_message="no such directory")
    job = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "model_load_error", "message": "no such directory"}


def test_pagination_filters_and_no_duplicates(client, auth, error_of):
    ids = [_submit(client, auth, adapter=f"a{i}") for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params, headers=auth)
        assert page.status_code == 200, page.text
        pages += 1
        seen += [job["id"] for job in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ids[::-1]  # newest first, each once

    client.post(f"/jobs/{ids[1]}/cancel", headers=auth)
    canceled = client.get("/jobs", params={"status": "canceled"}, headers=auth).json()
    assert [job["id"] for job in canceled["jobs"]] == [ids[1]] and canceled["next_cursor"] is None
    queued = client.get("/jobs", params={"status": "queued", "kind": "finetune"}, headers=auth).json()
    assert len(queued["jobs"]) == 4
    assert client.get("/jobs", params={"kind": "generate"}, headers=auth).json()["jobs"] == []


def test_jobs_list_is_per_tenant(client, auth, other_auth):
    _submit(client, auth)
    assert client.get("/jobs", headers=other_auth).json() == {"jobs": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params, field",
    [
        ({"status": "done"}, "status"),
        ({"kind": "train"}, "kind"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"cursor": "yesterday_abc"}, "cursor"),
    ],
)
def test_invalid_list_parameters_are_422(client, auth, error_of, params, field):
    response = client.get("/jobs", params=params, headers=auth)
    assert response.status_code == 422
    assert error_of(response)["field"] == field


@pytest.fixture
def finished_generate_job(db, tenant) -> str:
    """A generate job as a worker leaves it: succeeded, one image and one heatmap stored as blobs."""
    job = Job(
        tenant=tenant, kind="generate", status="succeeded", request={"prompt": "a cat and a dog"}, request_hash="0" * 64
    )
    db.add(job)
    db.flush()
    job.result = generate_result([{"index": 0, "seed": 7, "heatmap": True, "scores": {}}])
    for kind, data in (("image", PNG_BYTES), ("heatmap", PNG_BYTES + b"-heat")):
        db.add(JobImage(job_id=job.id, kind=kind, index=0, blob_id=put_blob(db, data, "image/png").id))
    db.commit()
    return job.id


def test_images_and_heatmaps(client, auth, finished_generate_job, error_of):
    job_id = finished_generate_job
    links = client.get(f"/jobs/{job_id}", headers=auth).json()["links"]
    assert links["images"] == [f"/jobs/{job_id}/images/0"] and links["heatmaps"] == [f"/jobs/{job_id}/heatmaps/0"]

    image = client.get(links["images"][0], headers=auth)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == PNG_BYTES
    heatmap = client.get(links["heatmaps"][0], headers=auth)
    assert heatmap.status_code == 200 and heatmap.content == PNG_BYTES + b"-heat"
    cached = client.get(links["images"][0], headers={**auth, "If-None-Match": image.headers["etag"]})
    assert cached.status_code == 304

    missing = client.get(f"/jobs/{job_id}/images/1", headers=auth)
    assert missing.status_code == 404 and error_of(missing)["code"] == "image_not_found"
    assert client.get(f"/jobs/{job_id}/heatmaps/3", headers=auth).status_code == 404
    assert client.get(f"/jobs/{job_id}/images/-1", headers=auth).status_code == 422


def generate_result(images: list[dict], adapter: str | None = None) -> dict:
    """A generate job's result as the worker stores it (sepen_store.contract.GenerateResult)."""
    return {"images": images, "adapter": adapter, "model": "sepen-tiny", "concepts": [], "sample": {}}


@pytest.mark.parametrize(
    "images, image_links, heatmap_links",
    [
        ([], [], []),
        ([{"index": 0, "seed": 1, "heatmap": False}, {"index": 1, "seed": 2, "heatmap": False}], [0, 1], []),
        ([{"index": 3, "seed": 1, "heatmap": True}], [3], [3]),
    ],
)
def test_image_links_follow_the_result(client, auth, db, tenant, images, image_links, heatmap_links):
    job = Job(
        tenant=tenant,
        kind="generate",
        status="succeeded",
        request={},
        request_hash="0" * 64,
        result=generate_result(images, adapter="cat-dog@2"),
    )
    db.add(job)
    db.commit()
    body = client.get(f"/jobs/{job.id}", headers=auth).json()
    assert body["links"]["images"] == [f"/jobs/{job.id}/images/{i}" for i in image_links]
    assert body["links"]["heatmaps"] == [f"/jobs/{job.id}/heatmaps/{i}" for i in heatmap_links]
    assert [image["url"] for image in body["result"]["images"]] == body["links"]["images"]
    assert body["links"]["adapter"] == "/adapters/cat-dog/2/weights"


def test_a_stored_result_outside_the_contract_is_refused_not_reshaped(db, tenant):
    from pydantic import ValidationError

    from service.schemas import JobOut

    job = Job(
        tenant=tenant, kind="generate", status="succeeded", request={}, request_hash="0" * 64, result={"images": "oops"}
    )
    db.add(job)
    db.commit()
    with pytest.raises(ValidationError):
        JobOut.of(job)


def test_the_list_leaves_out_a_finetunes_summary_which_the_job_shows(client, auth, db):
    job_id = _submit(client, auth, adapter="long-curve")
    claim = claim_job(db, job_id, "w", lease_s=60)
    final = {
        "step": 200,
        "total": 200,
        "eta_s": 0.0,
        "elapsed_s": 9.0,
        "min_peak": 0.7,
        "overlap": 0.1,
        "losses": {"total": 0.2, "separate": 0.1, "enhance": 0.2},
        "peaks": {"cat": 0.7, "dog": 0.6},
    }
    curve = [
        {"step": s, "loss": 1 / s, "separate": 0.1, "enhance": 0.2, "min_peak": 0.5, "overlap": 0.2}
        for s in range(1, 201)
    ]
    summary = {"loss_curve": curve, "final": final, "resumed_from_step": 0, "diagnostics": []}
    result = {"adapter": "long-curve@1", "name": "long-curve", "version": 1, "sha256": "0" * 64, "summary": summary}
    assert finish_job(db, claim, "succeeded", result=result)
    listed = next(j for j in client.get("/jobs", headers=auth).json()["jobs"] if j["id"] == job_id)
    assert listed["result"]["summary"] is None and listed["result"]["adapter"] == "long-curve@1"
    shown = client.get(f"/jobs/{job_id}", headers=auth).json()
    assert len(shown["result"]["summary"]["loss_curve"]) == 200
