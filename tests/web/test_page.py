"""The web page end to end in Chromium on the embedded service with the toy model: sign in, finetune a pair and watch
it train, generate base and adapter on the same seeds, the gallery with heatmaps, downloads, the lists; the API's
errors beside the fields they name; the job stream read from Server-Sent Events where the API has them."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from tests.web.conftest import PHONE

JOB_ID = "0123456789abcdef0123456789abcdef"  # a job the API stand-in below answers for


def save_screenshot(page: Page, path: Path) -> None:
    """A full-page PNG in at most 128 colours (the README's pictures stay small)."""
    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    assert 5_000 < path.stat().st_size < 400_000, (path, path.stat().st_size)


def sign_in(page: Page, key: str) -> None:
    """With the keyboard alone: Tab to the key field, type, Enter."""
    page.goto("/")
    for _ in range(6):
        if page.evaluate("document.activeElement && document.activeElement.id") == "api-key":
            break
        page.keyboard.press("Tab")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(key)
    page.keyboard.press("Enter")


def no_horizontal_scroll(page: Page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_page_is_open_like_the_docs_and_loads_only_its_own_files(service):
    page = httpx.get(f"{service.base_url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert re.findall(r'<(?:script|link)[^>]* (?:src|href)="([^"]*)"', page.text) == [
        "/web/icon.svg",
        "/web/style.css",
        "/web/app.js",
    ]
    assert not re.search(r'(?:src|href)="(?:[a-z]+:)?//', page.text), "the page names another origin"
    for name, media in (("app.js", "text/javascript"), ("api.js", "text/javascript"), ("style.css", "text/css")):
        served = httpx.get(f"{service.base_url}/web/{name}", timeout=10)
        assert served.status_code == 200 and served.headers["content-type"].startswith(media), name
    missing = httpx.get(f"{service.base_url}/web/app.py", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "/" not in httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()["paths"]


def test_a_bad_key_shows_the_401_message_at_the_key_field(page: Page):
    sign_in(page, "sk_sepen_not-a-key")
    key_field = page.locator("#signin-form [data-field=key]")
    expect(key_field.locator(".error")).to_have_text("invalid or revoked API key (401 unauthorized)")
    expect(page.get_by_label("API key")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("API key")).to_be_focused()
    expect(page.get_by_role("navigation", name="Sections")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0


def test_a_bad_field_shows_the_api_message_beside_that_field(page: Page, service):
    api_key = service.admin("create-key", "--tenant", "errors").split()[-1]
    sign_in(page, api_key)
    page.get_by_role("link", name="Finetune").click()
    form = page.locator("#finetune-form")
    form.get_by_label("Adapter name").fill("bad-steps")
    form.get_by_label("Steps", exact=True).fill("0")
    form.get_by_role("button", name="Start finetune").click()
    steps = form.locator("[data-field='recipe.steps']")
    expect(steps.locator(".error")).to_contain_text("recipe.steps:")
    expect(steps.locator(".error")).to_contain_text("greater than or equal to 1 (422 validation_error)")
    expect(form.get_by_label("Steps", exact=True)).to_have_attribute("aria-invalid", "true")
    expect(form.get_by_label("Steps", exact=True)).to_be_focused()
    expect(form.locator(".error:visible")).to_have_count(1)  # only beside the field at fault
    expect(page.locator("#ft-job")).to_be_hidden()

    # In the generate form, a concept missing from the prompt: beside 'Concepts', not beside the prompt.
    page.get_by_role("link", name="Generate").click()
    generate = page.locator("#generate-form")
    generate.get_by_label("Prompt", exact=True).fill("a cherry and a moon")
    generate.get_by_label("Concepts for heatmaps").fill("cherry, sofa")
    generate.get_by_role("button", name="Generate").click()
    expect(generate.locator("[data-field=concepts] .error")).to_contain_text("'sofa' must appear in the prompt")
    expect(generate.locator("[data-field=prompt] .error")).to_be_hidden()
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {api_key}"}) as client:
        assert client.get("/jobs").json()["jobs"] == []  # nothing was queued


def test_sign_in_finetune_watch_generate_base_and_adapter_and_the_lists(page: Page, service, api_key, screenshots):
    started = time.monotonic()
    origin = service.base_url
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    streams: list[int] = []  # GET /jobs/{id}/events: 200 where the gateway streams, else 404 and the page polls
    page.on("response", lambda response: streams.append(response.status) if response.url.endswith("/events") else None)
    sign_in(page, api_key)

    # Models: the toy model, its defaults and its nouns (world.json's).
    toy = page.get_by_role("article", name=re.compile("sepen-toy"))
    expect(toy).to_contain_text("default")
    expect(toy.locator(".chips li")).to_have_count(24)
    expect(toy.locator(".chips")).to_contain_text("cherry")
    expect(toy).to_contain_text("steps 150")
    expect(toy).to_contain_text("Stable Diffusion 1.x / 2.x")  # its layout (GET /models architecture)

    # Finetune a pair with a short recipe; the model's defaults are the recipe fields' placeholders.
    page.get_by_role("link", name="Finetune").click()
    form = page.locator("#finetune-form")
    expect(form.get_by_label("Steps", exact=True)).to_have_attribute("placeholder", "150")
    expect(form.get_by_label("Learning rate")).to_have_attribute("placeholder", "0.0001")
    form.get_by_label("Adapter name").fill("cherry-moon")
    form.get_by_label("Pairs, one per line").fill("cherry, moon")
    form.get_by_label("Templates, one per line").fill("a {A} and a {B}")
    form.get_by_label("Steps", exact=True).fill("20")
    form.get_by_role("button", name="Start finetune").click()

    # Watch it: record what the panel shows until it says succeeded.
    panel = page.locator("#ft-job")
    seen: set[str] = set()
    deadline = time.monotonic() + 240  # 20 steps, then the do-no-harm check (128 images of the toy model)
    while panel.get_attribute("data-status") != "succeeded":
        assert time.monotonic() < deadline, f"the finetune did not finish; the page showed {sorted(seen)}"
        assert panel.get_attribute("data-status") not in ("failed", "canceled"), page.locator("#ft-status").inner_text()
        seen.add(page.locator("#ft-status").inner_text())
        time.sleep(0.1)
    live = [text for text in seen if re.fullmatch(r"running · step (\d+) of 20 · about \d+ (s|min) left", text)]
    assert live, f"no live progress shown: {sorted(seen)}"
    expect(page.locator("#ft-status")).to_have_text("succeeded · published cherry-moon@1")
    expect(page.locator("#ft-progress")).to_have_attribute("max", "20")
    expect(page.locator("#ft-progress")).to_have_js_property("value", 20)
    expect(page.locator("#ft-loss-plot polyline")).to_have_count(3)  # loss, separate, enhance
    expect(page.locator("#ft-loss-plot .legend")).to_contain_text("separate")
    maps = page.locator("#ft-maps-plot")
    expect(maps.locator("polyline")).to_have_count(3)  # each object's peak and the pair's overlap
    expect(maps.locator(".legend")).to_contain_text("peak cherry")
    expect(maps.locator(".legend")).to_contain_text("peak moon")
    expect(maps.locator(".legend")).to_contain_text("overlap")
    expect(page.locator("#ft-cancel")).to_have_count(0)  # a finished job cannot be canceled
    save_screenshot(page, screenshots / "finetune.png")

    with page.expect_download() as weights:
        page.get_by_role("button", name="Download weights").click()
    assert weights.value.suggested_filename == "cherry-moon@1.safetensors"
    client = httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    version = client.get("/adapters/cherry-moon").json()["versions"][0]
    assert Path(weights.value.path()).stat().st_size == version["size"]

    # Generate with it, and the base model on the same seeds.
    page.get_by_role("button", name="Generate with cherry-moon@1").click()
    generate = page.locator("#generate-form")
    expect(generate.get_by_label("Adapter")).to_have_value("cherry-moon@1")
    expect(generate.get_by_label("Prompt", exact=True)).to_have_value("a cherry and a moon")
    expect(generate.get_by_label("Concepts for heatmaps")).to_have_value("cherry, moon")
    expect(generate.get_by_label("Also the base model on the same seeds")).to_be_checked()
    generate.get_by_label("Seed", exact=True).fill("7")
    generate.get_by_label("Images").fill("2")
    generate.get_by_role("button", name="Generate").click()

    gallery = page.locator("#gallery")
    expect(gallery.locator("img.heatmap")).to_have_count(4, timeout=120_000)
    for seed in (7, 8):
        row = gallery.get_by_role("region", name=f"seed {seed}")
        shots = row.locator("figure.shot")
        expect(shots).to_have_count(2)
        expect(shots.nth(0).locator("figcaption")).to_have_text(f"base sepen-toy · seed {seed}")
        expect(shots.nth(1).locator("figcaption")).to_have_text(f"cherry-moon@1 · seed {seed}")
        for shot in (shots.nth(0), shots.nth(1)):
            expect(shot.locator("img.image")).to_have_js_property("naturalWidth", 32)  # the toy model's 32x32
            expect(shot.locator("img.heatmap")).not_to_have_js_property("naturalWidth", 0)
            assert shot.locator("img.image").get_attribute("src").startswith("blob:")
            expect(shot.locator(".scores")).to_contain_text("peak cherry")
            expect(shot.locator(".scores")).to_contain_text("overlap cherry & moon")
    jobs = client.get("/jobs", params={"kind": "generate"}).json()["jobs"]
    assert sorted((job["request"]["adapter"] or "", job["request"]["sample"]["seed"]) for job in jobs) == [
        ("", 7),
        ("cherry-moon@1", 7),
    ]
    with page.expect_download() as image:
        gallery.get_by_role("button", name="Download the image (cherry-moon@1, seed 8)").click()
    assert image.value.suggested_filename == "cherry-moon@1-seed8.png"
    assert Path(image.value.path()).read_bytes().startswith(b"\x89PNG")
    save_screenshot(page, screenshots / "generate.png")

    # The lists: three jobs, all finished; the adapter's one version.
    page.get_by_role("link", name="Jobs").click()
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#jobs-table tbody tr[data-status=succeeded]")).to_have_count(3)
    expect(page.locator("#jobs-table").get_by_role("button", name=re.compile("^Cancel"))).to_have_count(0)
    page.get_by_role("link", name="Adapters").click()
    expect(page.locator("#adapters-table tbody tr")).to_have_count(1)
    expect(page.locator("#adapters-table tbody tr")).to_contain_text("cherry + moon")
    verdict = client.get("/adapters/cherry-moon").json()["versions"][0]["check"]["verdict"]
    check_cell = page.locator("#adapters-table tbody tr td[data-label='Do-no-harm check']")
    expect(check_cell).to_contain_text(verdict)

    # At a phone's width: one column, nothing wider than the screen.
    page.set_viewport_size(PHONE)
    assert no_horizontal_scroll(page)
    page.get_by_role("link", name="Generate").click()
    expect(gallery.locator("img.heatmap")).to_have_count(4)
    assert no_horizontal_scroll(page)
    save_screenshot(page, screenshots / "phone.png")

    # Cancel a long finetune while it runs; delete the adapter version (after the browser's confirm).
    page.get_by_role("link", name="Finetune").click()
    form.get_by_label("Adapter name").fill("long-run")
    form.get_by_label("Steps", exact=True).fill("500")
    form.get_by_role("button", name="Start finetune").click()
    expect(page.locator("#ft-status")).to_contain_text(re.compile(r"running · step \d+ of 500"), timeout=60_000)
    page.get_by_role("button", name="Cancel").click()
    expect(panel).to_have_attribute("data-status", "canceled", timeout=30_000)
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    page.get_by_role("link", name="Adapters").click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete cherry-moon@1").click()
    expect(page.locator("#adapters-status")).to_have_text("deleted cherry-moon@1")
    expect(page.locator("#adapters-table tbody tr")).to_have_count(0)
    assert client.get("/adapters/cherry-moon/1/weights").status_code == 404

    # Everything came from this gateway; the key never travelled in a URL and is kept for this tab only.
    assert requested and all(url.startswith((origin, "blob:", "data:")) for url in requested), requested
    assert not any(api_key in url for url in requested)
    assert page.evaluate("sessionStorage.getItem('sepen.apiKey')") == api_key
    assert page.evaluate("localStorage.length") == 0
    client.close()
    updates = "Server-Sent Events" if 200 in streams else "polling"
    print(f"\nbrowser end to end: {time.monotonic() - started:.0f}s, job updates by {updates} ({streams})")


def test_the_page_follows_server_sent_events_and_polls_without_them(page: Page, api_key):
    """GET /jobs/{id}/events stands in here (the API may not have it): where it answers text/event-stream the page
    reads its events and asks GET /jobs/{id} only for the job at the start and the end; where it answers 404 the page
    polls GET /jobs/{id}."""
    sign_in(page, api_key)
    expect(page.get_by_role("navigation", name="Sections")).to_be_visible()
    job = {"id": JOB_ID, "kind": "finetune", "status": "queued", "progress": None, "result": None, "links": {}}
    reads: list[str] = []

    def read_job(route):
        reads.append(route.request.url)
        status = "succeeded" if len(reads) > 1 else "queued"
        route.fulfill(json={**job, "status": status})

    def event(seq: int, kind: str, status: str, progress: dict | None = None) -> str:
        data = {"seq": seq, "type": kind, "job_id": JOB_ID, "kind": "finetune", "status": status, "progress": progress}
        return f"id: {seq}\r\nevent: {kind}\r\ndata: {json.dumps(data)}\r\n\r\n"

    stream = "".join(
        [
            event(1, "status", "running"),
            event(2, "progress", "running", {"step": 1, "total": 2, "losses": {"total": 0.5}}),
            event(3, "progress", "running", {"step": 2, "total": 2, "losses": {"total": 0.4}}),
            event(4, "status", "succeeded", {"step": 2, "total": 2, "losses": {"total": 0.4}}),
        ]
    )
    page.route(f"**/jobs/{JOB_ID}", read_job)
    page.route(
        f"**/jobs/{JOB_ID}/events",
        lambda route: route.fulfill(body=": hello\n\n" + stream, content_type="text/event-stream"),
    )
    watch = """async (id) => {
        const { watchJob } = await import("/web/api.js");
        const seen = [];
        const record = (job) => seen.push([job.status, job.progress && job.progress.step]);
        const watch = watchJob(id, record, { interval: 50 });
        await watch.done;
        return seen;
    }"""
    seen = page.evaluate(watch, JOB_ID)
    assert seen == [["queued", None], ["running", None], ["running", 1], ["running", 2], ["succeeded", None]]
    assert len(reads) == 2  # the job before the stream and after its last event: no polling

    reads.clear()
    page.unroute(f"**/jobs/{JOB_ID}/events")
    page.route(
        f"**/jobs/{JOB_ID}/events", lambda route: route.fulfill(status=404, json={"error": {"code": "not_found"}})
    )
    seen = page.evaluate(watch, JOB_ID)
    assert seen == [["queued", None], ["succeeded", None]]
    assert len(reads) == 2  # polled: the first read said queued, the next succeeded
