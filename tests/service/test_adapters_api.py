"""Adapters: list, read with versions, download weights (ETag = sha256), delete, and tenant isolation."""

from __future__ import annotations

import hashlib


def test_list_and_read(client, auth, tenant, publish):
    assert client.get("/adapters", headers=auth).json() == []
    publish(tenant, "cat-dog", data=b"v1")
    publish(tenant, "cat-dog", data=b"v2")
    publish(tenant, "bird", data=b"b1")

    listing = client.get("/adapters", headers=auth).json()
    assert [(a["name"], a["versions"], a["latest"]) for a in listing] == [("bird", 1, 1), ("cat-dog", 2, 2)]

    adapter = client.get("/adapters/cat-dog", headers=auth).json()
    assert adapter["name"] == "cat-dog"
    versions = adapter["versions"]
    assert [v["ref"] for v in versions] == ["cat-dog@1", "cat-dog@2"]
    assert versions[1]["sha256"] == hashlib.sha256(b"v2").hexdigest() and versions[1]["size"] == 2
    assert versions[1]["base_model"] == "sepen-tiny" and versions[1]["metadata"]["steps"] == 3
    assert versions[1]["job_id"] and versions[1]["weights"] == "/adapters/cat-dog/2/weights"


def test_download_weights(client, auth, tenant, publish):
    publish(tenant, "cat-dog", data=b"safetensors bytes")
    response = client.get("/adapters/cat-dog/1/weights", headers=auth)
    assert response.status_code == 200 and response.content == b"safetensors bytes"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == 'attachment; filename="cat-dog@1.safetensors"'
    assert response.headers["etag"].strip('"') == hashlib.sha256(b"safetensors bytes").hexdigest()
    cached = client.get("/adapters/cat-dog/1/weights", headers={**auth, "If-None-Match": response.headers["etag"]})
    assert cached.status_code == 304 and cached.content == b""


def test_unknown_adapter_or_version_is_404_naming_it(client, auth, tenant, publish, error_of):
    publish(tenant, "cat-dog")
    response = client.get("/adapters/nope", headers=auth)
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "adapter_not_found" and "nope" in error["message"]
    assert client.get("/adapters/nope/1/weights", headers=auth).status_code == 404
    version = client.get("/adapters/cat-dog/5/weights", headers=auth)
    assert version.status_code == 404 and "cat-dog@5" in error_of(version)["message"]
    malformed = client.get("/adapters/Bad%20Name/1/weights", headers=auth)  # no adapter can have this name
    assert malformed.status_code == 422 and error_of(malformed)["field"] == "name"
    assert client.get("/adapters/cat-dog/0/weights", headers=auth).status_code == 422


def test_other_tenants_adapters_are_invisible(client, other_auth, tenant, publish):
    publish(tenant, "secret")
    assert client.get("/adapters", headers=other_auth).json() == []
    assert client.get("/adapters/secret", headers=other_auth).status_code == 404
    assert client.get("/adapters/secret/1/weights", headers=other_auth).status_code == 404
    assert client.delete("/adapters/secret/1", headers=other_auth).status_code == 404


def test_delete_refuses_while_a_queued_job_uses_the_version(client, auth, tenant, publish, error_of):
    publish(tenant, "cat-dog", data=b"v1")
    publish(tenant, "cat-dog", data=b"v2")
    job = client.post("/generate", json={"prompt": "a cat and a dog", "adapter": "cat-dog@1"}, headers=auth).json()[
        "job"
    ]

    busy = client.delete("/adapters/cat-dog/1", headers=auth)
    assert busy.status_code == 409
    error = error_of(busy)
    assert error["code"] == "adapter_in_use" and job["id"] in error["message"]

    client.post(f"/jobs/{job['id']}/cancel", headers=auth)
    deleted = client.delete("/adapters/cat-dog/1", headers=auth)
    assert deleted.status_code == 204 and deleted.content == b""
    assert client.get("/adapters/cat-dog/1/weights", headers=auth).status_code == 404
    assert [v["ref"] for v in client.get("/adapters/cat-dog", headers=auth).json()["versions"]] == ["cat-dog@2"]
    assert client.delete("/adapters/cat-dog/1", headers=auth).status_code == 404
    # The job that used it keeps its pinned reference for the record.
    assert client.get(f"/jobs/{job['id']}", headers=auth).json()["request"]["adapter"] == "cat-dog@1"
