"""The OpenAPI document tells the truth: named operation ids, every error status the service answers documented
with the one error model (no FastAPI HTTPValidationError), the headers that come with them, and answers the
tests provoke all listed for their operation."""

from __future__ import annotations

import re

import pytest

OPERATION_IDS = {
    ("post", "/finetune"): "submitFinetune",
    ("post", "/generate"): "submitGenerate",
    ("post", "/evaluate"): "submitEvaluate",
    ("get", "/jobs"): "listJobs",
    ("get", "/jobs/{job_id}"): "getJob",
    ("post", "/jobs/{job_id}/cancel"): "cancelJob",
    ("get", "/jobs/{job_id}/events"): "streamJobEvents",
    ("get", "/jobs/{job_id}/deliveries"): "listJobDeliveries",
    ("get", "/jobs/{job_id}/images/{index}"): "getJobImage",
    ("get", "/jobs/{job_id}/heatmaps/{index}"): "getJobHeatmap",
    ("get", "/adapters"): "listAdapters",
    ("get", "/adapters/{name}"): "getAdapter",
    ("get", "/adapters/{name}/{version}/weights"): "downloadAdapterWeights",
    ("delete", "/adapters/{name}/{version}"): "deleteAdapterVersion",
    ("get", "/models"): "listModels",
    ("get", "/healthz"): "getHealth",
    ("get", "/readyz"): "getReadiness",
}
OPEN = {("get", "/healthz"), ("get", "/readyz")}
WITH_BODY = {("post", "/finetune"), ("post", "/generate")}
ERROR_REF = "#/components/schemas/ErrorOut"


@pytest.fixture(scope="module")
def spec(client):
    return client.get("/openapi.json").json()


def _operations(spec):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield (method, path), operation


def test_every_operation_has_its_named_id(spec):
    assert {key: op.get("operationId") for key, op in _operations(spec)} == OPERATION_IDS
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z]+)*", name) for name in OPERATION_IDS.values())


def test_no_fastapi_validation_schema_is_left(spec):
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas


def test_every_error_answer_uses_the_error_model(spec):
    for key, operation in _operations(spec):
        for status, response in operation["responses"].items():
            if int(status) < 400 or key == ("get", "/readyz"):
                continue
            ref = response["content"]["application/json"]["schema"]["$ref"]
            assert ref == ERROR_REF, f"{key} {status}: {ref}"


def test_each_operation_lists_the_statuses_it_can_answer(spec):
    for key, operation in _operations(spec):
        statuses = {int(status) for status in operation["responses"]}
        if key not in OPEN:
            assert statuses >= {401, 429, 503}, key
        if key in WITH_BODY:
            assert statuses >= {200, 202, 400, 404, 409, 413, 415, 422}, key
        if operation.get("parameters") or key in WITH_BODY:
            assert 422 in statuses, key


def test_headers_are_documented(spec):
    for key, operation in _operations(spec):
        responses = operation["responses"]
        if key in OPEN:
            assert key == ("get", "/healthz") or "Retry-After" in responses["503"]["headers"]
            continue
        assert set(responses["429"]["headers"]) == {
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
        }
        assert "Retry-After" in responses["503"]["headers"]
        assert "WWW-Authenticate" in responses["401"]["headers"]
        success = next(s for s in responses if 200 <= int(s) < 300)
        assert "RateLimit-Remaining" in responses[success]["headers"], key
    for path in ("/finetune", "/generate"):
        assert "Location" in spec["paths"][path]["post"]["responses"]["202"]["headers"]
        assert "Idempotent-Replayed" in spec["paths"][path]["post"]["responses"]["200"]["headers"]


def test_integer_fields_are_integers_and_numbers_are_bounded_as_enforced(spec):
    generate = spec["components"]["schemas"]["GenerateIn"]["properties"]
    assert generate["images"] == {"type": "integer", "maximum": 8, "minimum": 1, "default": 1, "title": "Images"}
    recipe = spec["components"]["schemas"]["RecipeIn"]["properties"]
    seed = next(option for option in recipe["seed"]["anyOf"] if option.get("type") == "integer")
    assert seed["minimum"] == 0 and seed["exclusiveMaximum"] == 2**31


PROVOKED = [
    ("post", "/finetune", {"json": {"adapter": "a", "concepts": {}}}, 422),
    ("post", "/finetune", {"content": b"\xff\xfe{", "headers": {"Content-Type": "application/json"}}, 400),
    ("post", "/finetune", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415),
    ("post", "/generate", {"json": {"prompt": "a cat", "model": "nope"}}, 404),
    ("get", "/jobs", {"params": {"cursor": "x"}}, 422),
    ("get", f"/jobs/{'0' * 32}", {}, 404),
    ("get", "/jobs/xyz", {}, 422),
    ("post", f"/jobs/{'0' * 32}/cancel", {}, 404),
    ("get", "/adapters/nope", {}, 404),
    ("get", "/adapters/nope/0/weights", {}, 422),
    ("get", "/adapters/nope/1/weights", {"params": {"format": "kohya", "rank": 4, "energy": 0.5}}, 422),
    ("delete", "/adapters/nope/1", {}, 404),
]


@pytest.mark.parametrize("method, url, request_args, status", PROVOKED)
def test_answers_the_tests_provoke_are_documented(client, spec, auth, error_of, method, url, request_args, status):
    request_args = dict(request_args)
    headers = {**auth, **request_args.pop("headers", {})}
    response = client.request(method.upper(), url, headers=headers, **request_args)
    assert response.status_code == status, response.text
    error_of(response)
    template = next(
        path for path in spec["paths"] if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", path), url.split("?")[0])
    )
    assert str(status) in spec["paths"][template][method]["responses"]
