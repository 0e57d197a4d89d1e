"""No input reaches a 500: values the database cannot hold are 4xx naming the field, templates are parsed at the
gateway, bodies are read whatever their Content-Type says, and an error keeps the client's connection open."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from sepen_store.auth import create_api_key
from sepen_store.jobs import list_jobs
from sepen_store.tables import Job
from service.app import create_app

FINETUNE = {"adapter": "cat-dog", "concepts": {"pairs": [["cat", "dog"]]}}
GENERATE = {"prompt": "a photo of a cat and a dog"}
JOB_ID = "0" * 32


def _nothing_stored(db, tenant: str) -> bool:
    return list_jobs(db, tenant)[0] == []


# ---- path and query values -----------------------------------------------------------------------

BAD_PATHS = [
    ("GET", "/jobs/a%00b", "job_id"),
    ("GET", "/jobs/a%01b", "job_id"),
    ("GET", f"/jobs/{JOB_ID}%00", "job_id"),
    ("GET", f"/jobs/{'A' * 32}", "job_id"),
    ("POST", "/jobs/a%00b/cancel", "job_id"),
    ("GET", "/jobs/a%00b/images/0", "job_id"),
    ("GET", f"/jobs/{JOB_ID}/images/99999999999", "index"),
    ("GET", f"/jobs/{JOB_ID}/heatmaps/-1", "index"),
    ("GET", "/adapters/a%00b", "name"),
    ("GET", "/adapters/a%0A", "name"),  # a trailing newline: `$` in a regex would have let it through
    ("GET", "/adapters/cat-dog/%D9%A1/weights", "version"),  # an Arabic-Indic digit one
    ("GET", "/adapters/cat-dog/%C2%B2/weights", "version"),  # a superscript two
    ("GET", "/adapters/cat-dog/2147483648/weights", "version"),  # past the 32-bit column
    ("DELETE", "/adapters/a%00b/1", "name"),
    ("DELETE", "/adapters/cat-dog/99999999999999999999", "version"),
]


@pytest.mark.parametrize("method, url, field", BAD_PATHS, ids=[f"{m} {u}" for m, u, _ in BAD_PATHS])
def test_path_values_the_database_cannot_hold_are_422(client, auth, error_of, method, url, field):
    response = client.request(method, url, headers=auth)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "validation_error" and error["field"] == field


BAD_QUERIES = [
    {"cursor": f"2026-01-01T00:00:00+00:00_{JOB_ID[:-1]}\x00"},
    {"cursor": f"0001-01-01T00:00:00+14:00_{JOB_ID}"},  # valid ISO, but before year 1 in UTC
    {"cursor": f"9999-12-31T23:59:59-14:00_{JOB_ID}"},  # after year 9999 in UTC
    {"cursor": f"2026-13-01T00:00:00+00:00_{JOB_ID}"},
    {"cursor": f"٢٠٢٦-01-01T00:00:00+00:00_{JOB_ID}"},  # non-ASCII digits
    {"limit": str(10**30)},
    {"limit": "٥"},
    {"status": "queued\x00"},
]


@pytest.mark.parametrize("params", BAD_QUERIES, ids=[repr(p)[:40] for p in BAD_QUERIES])
def test_query_values_out_of_range_are_422(client, auth, error_of, params):
    response = client.get("/jobs", params=params, headers=auth)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == next(iter(params))


def test_a_cursor_this_api_returned_still_pages(client, auth):
    for _ in range(3):
        assert client.post("/generate", json=GENERATE, headers=auth).status_code == 202
    first = client.get("/jobs", params={"limit": 2}, headers=auth).json()
    assert len(first["jobs"]) == 2 and first["next_cursor"]
    rest = client.get("/jobs", params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth).json()
    assert len(rest["jobs"]) == 1 and rest["next_cursor"] is None


@pytest.mark.parametrize("key", ["a b", "tab\there", "\u00e9t\u00e9"])
def test_idempotency_keys_are_visible_ascii(client, auth, error_of, key):
    response = client.post("/finetune", json=FINETUNE, headers={**auth, "Idempotency-Key": key.encode()})
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == "Idempotency-Key"


# ---- bodies --------------------------------------------------------------------------------------

BAD_GENERATE = [
    ({"prompt": "a cat\x00 and a dog"}, "prompt"),
    ({"prompt": "a cat \x1b[31m"}, "prompt"),
    ({"negative_prompt": "blur\x00"}, "negative_prompt"),
    ({"model": "sepen-tiny\x00"}, "model"),
    ({"adapter": "cat-dog@\u0661"}, "adapter"),  # non-ASCII digits are not version numbers
    ({"adapter": "cat-dog@\u00b2"}, "adapter"),
    ({"adapter": "cat-dog@99999999999"}, "adapter"),
    ({"adapter": "cat-dog\n"}, "adapter"),
    ({"images": 2.5}, "images"),
    ({"images": "2"}, "images"),
    ({"images": True}, "images"),
    ({"seed": 2**31}, "seed"),
    ({"seed": 10**30}, "seed"),
    ({"map_downsample": 10**30}, "map_downsample"),
]


@pytest.mark.parametrize("change, field", BAD_GENERATE, ids=[repr(c)[:40] for c, _ in BAD_GENERATE])
def test_generate_values_the_service_cannot_use_are_422(client, auth, tenant, db, error_of, change, field):
    response = client.post("/generate", json={**GENERATE, **change}, headers=auth)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field
    assert _nothing_stored(db, tenant)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_numbers_json_cannot_store_are_422(client, auth, tenant, db, error_of, literal):
    """Python's JSON reader takes NaN and Infinity; the stored request could not be written back as JSON."""
    raw = f'{{"prompt": "a cat", "guidance": {literal}}}'
    response = client.post("/generate", content=raw, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == "guidance"
    recipe = f'{{"adapter": "a", "concepts": {{"pairs": [["cat", "dog"]]}}, "recipe": {{"lambda_sep": {literal}}}}}'
    response = client.post("/finetune", content=recipe, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 422 and error_of(response)["field"] == "recipe.lambda_sep"
    assert _nothing_stored(db, tenant)


def test_integral_floats_are_integers_as_the_schema_says(client, auth, db):
    """JSON Schema's "integer" includes 5.0: the schema allows it, so the service takes it, as 5."""
    response = client.post("/generate", json={**GENERATE, "images": 5.0, "steps": 4.0, "seed": 7.0}, headers=auth)
    assert response.status_code == 202, response.text
    sample = db.get(Job, response.json()["id"]).request["sample"]
    assert sample["num_images"] == 5 and sample["num_inference_steps"] == 4 and sample["seed"] == 7
    assert all(type(sample[k]) is int for k in ("num_images", "num_inference_steps", "seed"))
    finetune = client.post("/finetune", json={**FINETUNE, "recipe": {"steps": 30.0}}, headers=auth)
    assert finetune.status_code == 202 and finetune.json()["request"]["recipe"]["steps"] == 30


BAD_TEMPLATES = [
    ["a {A} and a {B} }"],  # stray closing brace: str.format fails on it in the worker
    ["a {A} and a {B} {"],
    ["a {A} and a {B}", "a {A} with {B"],
    ["a {{A}} and a {B}"],  # escaped: no slot A at all
    ["a {A!r} and a {B}"],
    ["a {A:>9} and a {B}"],
    ["a {A} and a {B} and a {0}"],
    ["a {A} and a {B}\x00"],
]


@pytest.mark.parametrize("templates", BAD_TEMPLATES, ids=[repr(t)[:40] for t in BAD_TEMPLATES])
def test_templates_are_parsed_at_the_gateway(client, auth, tenant, db, error_of, templates):
    response = client.post("/finetune", json={**FINETUNE, "templates": templates}, headers=auth)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == f"templates.{len(templates) - 1}"
    assert _nothing_stored(db, tenant)


def test_good_templates_still_pass(client, auth):
    body = {**FINETUNE, "templates": ["a {B} beside a {A}", "{A} and {B} on a {{table}}"]}
    assert client.post("/finetune", json=body, headers=auth).status_code == 202


@pytest.mark.parametrize("concept", ["ca\x00t", "c\x7fat", "cat\n"])
def test_concept_names_have_no_control_characters(client, auth, error_of, concept):
    response = client.post("/finetune", json={**FINETUNE, "concepts": {"pairs": [[concept, "dog"]]}}, headers=auth)
    assert response.status_code == 422 and error_of(response)["field"] == "concepts.pairs.0.0"


def test_a_json_body_without_content_type_is_read_as_json(client, auth):
    response = client.post("/finetune", content=json.dumps(FINETUNE), headers=auth)
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_a_body_sent_as_another_media_type_is_415_naming_it(client, auth, error_of, content_type):
    response = client.post("/finetune", content=json.dumps(FINETUNE), headers={**auth, "Content-Type": content_type})
    assert response.status_code == 415, response.text
    error = error_of(response)
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"] and content_type in error["message"]


def test_a_body_that_is_not_utf8_is_400(client, auth, error_of):
    body = b'{"adapter": "caf\xe9", "concepts": {"pairs": [["cat", "dog"]]}}'
    response = client.post("/finetune", content=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_body" and "UTF-8" in error["message"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"[" * 100_000 + b"]" * 100_000, "nests"), (b'{"images": ' + b"1" * 5000 + b"}", "4300 digits")],
)
def test_a_body_python_cannot_read_is_400_saying_why(client, auth, error_of, body, reason):
    response = client.post("/generate", content=body, headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid_body" and reason in error["message"] and "UTF-8" not in error["message"]


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
def test_a_content_encoding_the_gateway_does_not_decode_is_415(client, auth, error_of, encoding):
    headers = {**auth, "Content-Type": "application/json", "Content-Encoding": encoding}
    response = client.post("/finetune", content=json.dumps(FINETUNE), headers=headers)
    assert response.status_code == 415, response.text
    assert error_of(response)["code"] == "unsupported_content_encoding" and encoding in error_of(response)["message"]
    plain = {**headers, "Content-Encoding": "identity"}
    assert client.post("/finetune", content=json.dumps(FINETUNE), headers=plain).status_code == 202


# ---- tenants -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["", "a\x00b", "tab\tbed", " padded", "x" * 65])
def test_tenant_names_the_database_cannot_hold_are_refused(db, tenant):
    with pytest.raises(ValueError, match="tenant"):
        create_api_key(db, tenant)


# ---- the connection survives an error ------------------------------------------------------------


@pytest.fixture(scope="module")
def served(service_settings):
    """The gateway under uvicorn on a loopback port, with one extra route that fails like a bug would."""
    app = create_app(service_settings)

    @app.get("/test-only/bug", include_in_schema=False)
    def bug() -> None:
        raise RuntimeError("a bug")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield server.config.port
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/test-only/bug", 500),
        ("GET", "/jobs/a%00b", 422),
        ("GET", f"/jobs/{JOB_ID}", 404),
        ("GET", "/jobs", 401),
        ("POST", "/finetune", 422),
    ],
)
def test_an_error_keeps_the_connection_open(served, api_key, error_of, method, path, status):
    connection = http.client.HTTPConnection("127.0.0.1", served, timeout=10)
    headers = {"Authorization": f"Bearer {api_key}"} if status != 401 else {}
    connection.request(method, path, body=b"{}" if method == "POST" else None, headers=headers)
    failed = connection.getresponse()
    body = failed.read()
    assert failed.status == status and failed.getheader("connection") != "close"
    assert set(json.loads(body)) == {"error"}
    socket_used = connection.sock
    connection.request("GET", "/healthz")
    after = connection.getresponse()
    assert after.status == 200 and after.read() == b'{"status":"ok"}'
    assert connection.sock is socket_used, "the server closed the connection after the error"
    connection.close()
