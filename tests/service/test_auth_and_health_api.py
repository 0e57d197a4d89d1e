"""API keys on every resource, the open health and docs endpoints, /models, /readyz with a dependency down, OpenAPI."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from sepen_core.config import FinetuneConfig, SampleConfig
from sepen_store.auth import revoke_api_key
from service.app import create_app

PROTECTED = [
    ("POST", "/finetune"),
    ("POST", "/generate"),
    ("GET", "/jobs"),
    ("GET", "/jobs/abc"),
    ("POST", "/jobs/abc/cancel"),
    ("GET", "/jobs/abc/images/0"),
    ("GET", "/jobs/abc/heatmaps/0"),
    ("GET", "/adapters"),
    ("GET", "/adapters/x"),
    ("GET", "/adapters/x/1/weights"),
    ("DELETE", "/adapters/x/1"),
    ("GET", "/models"),
]


@pytest.mark.parametrize("method, url", PROTECTED)
@pytest.mark.parametrize("authorization", [None, "Bearer sk_sepen_wrong", "Basic dXNlcjpwYXNz", "Bearer "])
def test_every_resource_needs_a_valid_key(client, error_of, method, url, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.request(method, url, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert error_of(response)["code"] == "unauthorized"


def test_a_revoked_key_is_refused(client, db, api_key, auth):
    assert client.get("/jobs", headers=auth).status_code == 200
    assert revoke_api_key(db, api_key[:15]) == 1
    assert client.get("/jobs", headers=auth).status_code == 401


@pytest.mark.parametrize("url", ["/healthz", "/readyz", "/docs", "/openapi.json", "/", "/web/app.js"])
def test_open_endpoints_need_no_key(client, url):
    assert client.get(url).status_code == 200


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_when_all_is_up(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_readyz_names_a_broker_that_is_down(down_client):
    response = down_client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] == "ok" and body["checks"]["broker"].startswith("unavailable")
    assert body["error"]["code"] == "not_ready" and "broker" in body["error"]["message"]


def test_readyz_names_a_database_that_is_down(service_settings):
    settings = service_settings.with_(database_url="postgresql+psycopg://postgres@127.0.0.1:5499/none")
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200  # liveness does no I/O
    assert response.status_code == 503
    assert (
        response.json()["checks"]["database"].startswith("unavailable") and response.json()["checks"]["broker"] == "ok"
    )


def test_models(client, auth):
    # Image-steps: 8 images of 200 steps at the native size; finetunes: twice the paper's large-scale recipe's samples.
    wide = {"max_height": 2048, "max_width": 2048, "size_multiple": 8, "max_images": 8, "max_steps": 200}
    wide |= {"max_image_steps": 1600, "max_finetune_work": 2 * 10_000 * 4}
    models = client.get("/models", headers=auth).json()
    tiny = models[0]
    # What an empty request gets from the tiny model: the paper's settings, and the service's own templates.
    resolved = {
        "sample": SampleConfig().to_dict(),
        "finetune": {k: v for k, v in FinetuneConfig().to_dict().items() if k != "compile"},
        "large_scale": {k: v for k, v in FinetuneConfig.large_scale().to_dict().items() if k != "compile"},
        "templates": {
            "pairs": ["a photo of a {A} and a {B}"],
            "collection": ["a photo of a {A} and a {B}", "a photo of a {A} with a {B}"],
        },
    }
    assert tiny.pop("resolved") == json.loads(json.dumps(resolved))  # tuples as JSON's lists
    assert tiny.pop("note").startswith("a tiny random model: its images are noise")
    # What an image costs with each guidance method at the model's default steps (50): Attend-and-Excite's bound, from
    # its schedule (25 updated steps and 3 refinements of up to 20 evaluations, each counted as 4 plain steps).
    costs = [{"name": "none", "relative_cost": 1.0}, {"name": "attend-excite", "relative_cost": 7.8}]
    assert [m.pop("guidance_methods") for m in models] == [costs, costs]
    assert models == [
        {
            "name": "sepen-tiny",
            "default": True,
            "native_height": 64,
            "native_width": 64,
            "defaults": {"sample": {}, "maps": {}, "finetune": {}, "large_scale": {}},
            "limits": {**wide, "max_height": 128, "max_width": 128, "size_multiple": 16},
            "architecture": "sd",
            "nouns": [],
            "vocabulary": None,  # open: any word
            "judged": False,
        },
        # the gateway cannot read this model's files: no card, the service's wide limits
        {
            "name": "sd15",
            "default": False,
            "native_height": None,
            "native_width": None,
            "defaults": {},
            "limits": wide,
            "architecture": None,
            "nouns": [],
            "vocabulary": None,  # open: any word
            "judged": False,
            "note": None,
            "resolved": None,
        },
    ]


def test_unknown_path_and_method_use_the_error_shape(client, auth, error_of):
    missing = client.get("/nothing-here", headers=auth)
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong = client.put("/jobs", headers=auth)
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"


def test_openapi_lists_every_path_and_the_bearer_scheme(client):
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/finetune",
        "/generate",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/cancel",
        "/jobs/{job_id}/images/{index}",
        "/jobs/{job_id}/heatmaps/{index}",
        "/adapters",
        "/adapters/{name}",
        "/adapters/{name}/{version}/weights",
        "/adapters/{name}/{version}",
        "/models",
        "/healthz",
        "/readyz",
    }
    assert any(scheme.get("scheme") == "bearer" for scheme in spec["components"]["securitySchemes"].values())
    assert "delete" in spec["paths"]["/adapters/{name}/{version}"]
