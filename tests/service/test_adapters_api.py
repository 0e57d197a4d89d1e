"""Adapters: list, read with versions, download weights (ETag = sha256) as stored or exported for other tools (422
naming the option at fault), delete, and tenant isolation."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager

import numpy as np
import pytest
from safetensors.numpy import load

from sepen_core.adapter_file import FORMAT, FORMAT_VERSION
from sepen_core.export import export_adapter, safetensors_bytes


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
    job = client.post("/generate", json={"prompt": "a cat and a dog", "adapter": "cat-dog@1"}, headers=auth).json()

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


# -- exports: GET /adapters/{name}/{version}/weights?format=&rank=&energy= -----------------------------------------


def sepen_adapter_file(layers: int = 16, seed: int = 0) -> bytes:
    """A real sepen adapter file, written without torch (these tests run without it): fp16 key deltas of the tiny
    model's shape and the header sepen_core.adapters writes, tensors_sha256 computed as it does."""
    rng = np.random.default_rng(seed)
    deltas = {
        f"down_blocks.{i // 2}.attentions.{i % 2}.transformer_blocks.0.attn2.to_k.weight": rng.normal(
            scale=0.05, size=(32, 32)
        ).astype(np.float16)
        for i in range(layers)
    }
    digest = hashlib.sha256()
    for name in sorted(deltas):
        digest.update(f"{name}:torch.float16:{deltas[name].shape}".encode())
        digest.update(deltas[name].tobytes())
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "representation": "delta",
        "base_model_id": "sepen-tiny",
        "base_fingerprint": "f" * 64,
        "tensors_sha256": digest.hexdigest(),
        "metadata": json.dumps({"name": "cat-dog", "concepts": {"groups": [["cat", "dog"]]}, "recipe": {"steps": 3}}),
    }
    return safetensors_bytes(deltas, header)


def test_weights_exported_in_each_format(client, auth, tenant, publish):
    data = sepen_adapter_file()
    publish(tenant, "cat-dog", data=data)
    kohya = client.get("/adapters/cat-dog/1/weights", params={"format": "kohya", "rank": 4}, headers=auth)
    assert kohya.status_code == 200, kohya.text
    assert kohya.content == export_adapter(data, "kohya", rank=4).data
    assert kohya.headers["content-disposition"] == 'attachment; filename="cat-dog@1-kohya-r4.safetensors"'
    etag = kohya.headers["etag"]
    assert etag == f'W/"{hashlib.sha256(data).hexdigest()}.kohya-r4"'
    with safe_open_bytes(kohya.content) as (tensors, header):
        assert len(tensors) == 3 * 16 and all(k.startswith("lora_unet_down_blocks_") for k in tensors)
        assert header["sepen.rank"] == "4" and header["sepen.base_model_id"] == "sepen-tiny"
    cached = client.get(
        "/adapters/cat-dog/1/weights", params={"format": "kohya", "rank": 4}, headers={**auth, "If-None-Match": etag}
    )
    assert cached.status_code == 304

    diffusers = client.get("/adapters/cat-dog/1/weights", params={"format": "diffusers", "energy": 0.9}, headers=auth)
    assert (
        diffusers.status_code == 200
        and "cat-dog@1-diffusers-e0.9.safetensors" in diffusers.headers["content-disposition"]
    )
    with safe_open_bytes(diffusers.content) as (tensors, header):
        assert all(k.startswith("unet.") and ".lora_" in k for k in tensors) and header["sepen.energy"] == "0.9"
        assert float(header["sepen.energy_kept"]) >= 0.9
    full = client.get("/adapters/cat-dog/1/weights", params={"format": "full"}, headers=auth)
    with safe_open_bytes(full.content) as (tensors, _):
        assert all(k.endswith("_attn2_to_k.diff") for k in tensors) and len(tensors) == 16
    own = client.get("/adapters/cat-dog/1/weights", params={"format": "sepen"}, headers=auth)
    assert own.content == data and own.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"format": "onnx"}, "format"),
        ({"format": "kohya", "rank": 0}, "rank"),
        ({"format": "kohya", "rank": "four"}, "rank"),
        ({"format": "kohya", "energy": 0}, "energy"),
        ({"format": "kohya", "energy": 1.5}, "energy"),
        ({"format": "kohya", "rank": 4, "energy": 0.9}, "energy"),
        ({"format": "full", "rank": 4}, "rank"),
        ({"format": "sepen", "energy": 0.5}, "energy"),
        ({"rank": 8}, "rank"),
    ],
)
def test_bad_export_options_are_422_naming_the_query_field(client, auth, tenant, publish, error_of, params, field):
    publish(tenant, "cat-dog", data=sepen_adapter_file())
    response = client.get("/adapters/cat-dog/1/weights", params=params, headers=auth)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "validation_error" and error["field"] == field and field in error["message"]


def test_a_stored_file_that_is_no_sepen_adapter_is_409_not_500(client, auth, tenant, publish, error_of):
    publish(tenant, "cat-dog", data=b"not really safetensors")
    response = client.get("/adapters/cat-dog/1/weights", params={"format": "full"}, headers=auth)
    assert response.status_code == 409
    error = error_of(response)
    assert error["code"] == "adapter_not_exportable" and "cat-dog@1" in error["message"]


@contextmanager
def safe_open_bytes(data: bytes):
    """(tensors, header metadata) of a safetensors file in memory."""
    header_size = int.from_bytes(data[:8], "little")
    yield load(data), json.loads(data[8 : 8 + header_size])["__metadata__"]
