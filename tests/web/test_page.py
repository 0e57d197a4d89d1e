"""The web page end to end in Chromium on the embedded service with the toy model: sign in, finetune a pair and watch
it load, train and check, generate base and adapter on the same seeds, the gallery with heatmaps, downloads, the
lists with the do-no-harm verdict; the API's errors beside the fields they name; the job stream read from Server-Sent
Events where the API has them; every text's contrast (WCAG AA, 4.5:1) and selects that fit a phone's width."""

from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from tests.web.conftest import PHONE

JOB_ID = "0123456789abcdef0123456789abcdef"  # a job the API stand-in below answers for
GENERATE_ID = "fedcba9876543210fedcba9876543210"

# WCAG 2's contrast ratio of every visible text against what lies behind it (the backgrounds of its ancestors, blended
# with their opacity), and of every shown placeholder: axe-core's colour-contrast rule, small enough to write here (no
# test fetches anything). Disabled controls are exempt (WCAG 1.4.3), as is text of no size or clipped away.
LOW_CONTRAST = """(minimum) => {
  const parse = (value) => {
    const m = /rgba?\\(([^)]*)\\)/.exec(value || "");
    if (!m) return null;
    const [r, g, b, a = 1] = m[1].split(/[\\s,/]+/).filter(Boolean).map(Number);
    return { r, g, b, a };
  };
  const over = (top, under) => ({
    r: top.r * top.a + under.r * (1 - top.a),
    g: top.g * top.a + under.g * (1 - top.a),
    b: top.b * top.a + under.b * (1 - top.a),
    a: 1,
  });
  const luminance = ({ r, g, b }) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const ratio = (a, b) => {
    const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
    return (hi + 0.05) / (lo + 0.05);
  };
  const chain = (node) => {
    const nodes = [];
    for (let n = node; n && n.nodeType === 1; n = n.parentElement) nodes.unshift(n);
    return nodes;
  };
  const behind = (node) => {
    let colour = { r: 255, g: 255, b: 255, a: 1 };
    for (const n of chain(node)) {
      const bg = parse(getComputedStyle(n).backgroundColor);
      if (bg && bg.a > 0) colour = over({ ...bg, a: bg.a * Number(getComputedStyle(n).opacity) }, colour);
    }
    return colour;
  };
  const opacity = (node) => chain(node).reduce((product, n) => product * Number(getComputedStyle(n).opacity), 1);
  const visible = (node) => {
    const box = node.getBoundingClientRect();
    const shown = getComputedStyle(node).visibility !== "hidden" && !node.closest("[hidden]");
    return shown && box.width > 1 && box.height > 1;
  };
  const failures = [];
  const check = (node, colour, what) => {
    if (!colour) return;
    const background = behind(node);
    const value = ratio(over({ ...colour, a: colour.a * opacity(node) }, background), background);
    if (value < minimum) failures.push(`${what} ${value.toFixed(2)}:1`);
  };
  const name = (node) => `${node.tagName.toLowerCase()}${node.id ? "#" + node.id : ""}.${node.classList}`;
  for (const node of document.querySelectorAll("body *")) {
    if (!visible(node) || node.closest(":disabled, [aria-hidden=true], .visually-hidden, .skip")) continue;
    const text = [...node.childNodes].filter((c) => c.nodeType === 3).map((c) => c.textContent.trim()).join("");
    const style = getComputedStyle(node);
    if (text) {
      const colour = node instanceof SVGElement ? parse(style.fill) : parse(style.color);
      check(node, colour, `${name(node)} "${text.slice(0, 30)}"`);
    }
    if ((node.matches("input, textarea")) && node.placeholder && !node.value) {
      check(node, parse(getComputedStyle(node, "::placeholder").color), `placeholder of ${name(node)}`);
    }
  }
  return failures;
}"""

# Each visible select's chosen text against the room its box leaves it (padding and the arrow's ~20 px taken off).
CUT_SELECTS = """() => {
  const canvas = document.createElement("canvas").getContext("2d");
  return [...document.querySelectorAll("select")]
    .filter((select) => select.getBoundingClientRect().width > 0 && !select.closest("[hidden]"))
    .map((select) => {
      const style = getComputedStyle(select);
      canvas.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
      const text = select.selectedOptions[0]?.textContent ?? "";
      const room = select.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight) - 20;
      return [select.id, text, Math.ceil(canvas.measureText(text).width), Math.floor(room)];
    })
    .filter(([, , width, room]) => width > room);
}"""

# Every text a node takes, as it takes it (the tests read this log: a poll could miss a short state).
RECORD_TEXTS = """(selector) => {
  const node = document.querySelector(selector);
  const log = (window.sepenTexts ??= {})[selector] = [];
  const note = () => {
    const bar = document.querySelector("#ft-progress");
    log.push([node.textContent, bar.hasAttribute("value"), document.querySelector("#ft-plots-note").hidden]);
  };
  new MutationObserver(note).observe(node, { childList: true, characterData: true, subtree: true });
}"""


def low_contrast(page: Page) -> list[str]:
    return page.evaluate(LOW_CONTRAST, 4.5)


def round_steps(page: Page, chart: str) -> list[float]:
    """The y axis's tick values of a chart; asserts they are evenly spaced by 1, 2 or 5 times a power of ten."""
    values = [float(t) for t in page.locator(f"{chart} text.y-tick").all_text_contents()]
    steps = {round(b - a, 12) for a, b in zip(values, values[1:], strict=False)}
    assert len(values) >= 2 and len(steps) == 1, values
    (step,) = steps
    mantissa = abs(step) / 10 ** math.floor(math.log10(abs(step)))
    assert round(mantissa, 6) in (1, 2, 5), values
    return values


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

    # Models: the default (the toy model) first, its defaults and its nouns (world.json's); the tiny model's note.
    toy = page.get_by_role("article", name=re.compile("sepen-toy"))
    expect(page.locator("#model-list article").first).to_have_attribute("aria-labelledby", "model-sepen-toy")
    expect(toy).to_contain_text("default")
    expect(toy.locator(".chips li")).to_have_count(24)
    expect(toy.locator(".chips")).to_contain_text("cherry")
    expect(toy).to_contain_text("steps 150")
    expect(toy).to_contain_text("Stable Diffusion 1.x / 2.x")  # its layout (GET /models architecture)
    expect(page.get_by_role("article", name=re.compile("sepen-tiny")).locator(".note")).to_contain_text(
        "its images are noise"
    )
    assert low_contrast(page) == []

    # Finetune a pair with a short recipe; what an empty field gets from the chosen model is its placeholder.
    page.get_by_role("link", name="Finetune").click()
    form = page.locator("#finetune-form")
    expect(form.get_by_label("Base model")).to_have_value("sepen-toy")
    placeholders = {"Steps": "150", "Learning rate": "0.0001", "Batch size": "8", "Seed": "0"}
    for label, value in placeholders.items():
        expect(form.get_by_label(label, exact=True)).to_have_attribute("placeholder", value)
    # The service's own template, which the probe prompts use too (the paper's seed 0 is the toy model's too).
    expect(form.get_by_label("Templates, one per line")).to_have_attribute("placeholder", "a photo of a {A} and a {B}")
    form.get_by_label("Base model").select_option("sepen-tiny")
    expect(form.get_by_label("Steps", exact=True)).to_have_attribute("placeholder", "200")  # the paper's recipe
    expect(form.get_by_label("Learning rate")).to_have_attribute("placeholder", "0.000008")
    expect(page.locator("#ft-model-note")).to_contain_text("its images are noise")
    form.get_by_label("Base model").select_option("sepen-toy")
    expect(page.locator("#ft-model-note")).to_be_hidden()
    form.get_by_label("Adapter name").fill("cherry-moon")
    form.get_by_label("Pairs, one per line").fill("cherry, moon")
    form.get_by_label("Templates, one per line").fill("a {A} and a {B}")
    form.get_by_label("Steps", exact=True).fill("20")
    # Training latents sampled first from the base model (a few seconds): a loading phase long enough to see.
    page.locator("#ft-more summary").click()
    form.get_by_label("Training latents").select_option("generated")
    form.get_by_label("Latent pool").fill("32")
    assert low_contrast(page) == []
    page.evaluate(RECORD_TEXTS, "#ft-status")
    form.get_by_role("button", name="Start finetune").click()

    # Watch it: every text the status line takes, until it says succeeded.
    panel = page.locator("#ft-job")
    expect(panel).to_have_attribute("data-status", "succeeded", timeout=240_000)  # 20 steps, then the check
    shown = page.evaluate("window.sepenTexts['#ft-status']")
    texts = [text for text, _, _ in shown]
    loading = [
        (text, bar, note)
        for text, bar, note in shown
        if re.fullmatch(r"running · loading the model and the probe prompts · \d+ s", text)
    ]
    assert loading, f"no loading phase shown: {texts}"
    assert all(not bar and not note for _, bar, note in loading)  # an indeterminate bar; the plots' note shown
    live = [text for text in texts if re.fullmatch(r"running · step (\d+) of 20 · about \d+ (s|min) left", text)]
    assert live, f"no live progress shown: {texts}"
    checking = r"running · checking the adapter against the base model · \d+ s"
    assert any(re.fullmatch(checking, text) for text in texts), texts
    first = {
        kind: next(i for i, t in enumerate(texts) if t.startswith(prefix))
        for kind, prefix in (
            ("loading", "running · loading"),
            ("training", "running · step"),
            ("checking", "running · checking"),
        )
    }
    assert first["loading"] < first["training"] < first["checking"], texts
    client = httpx.Client(base_url=origin, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    verdict = client.get("/adapters/cherry-moon").json()["versions"][0]["check"]["verdict"]
    expect(page.locator("#ft-status")).to_have_text(
        re.compile(rf"succeeded in \d+ (s|min) · published cherry-moon@1 · do-no-harm check: {verdict}")
    )
    expect(page.locator("#ft-progress")).to_have_attribute("max", "20")
    expect(page.locator("#ft-progress")).to_have_js_property("value", 20)
    expect(page.locator("#ft-loss-plot polyline")).to_have_count(3)  # loss, separate, enhance
    expect(page.locator("#ft-loss-plot .legend")).to_contain_text("separate")
    maps = page.locator("#ft-maps-plot")
    expect(maps.locator("polyline")).to_have_count(3)  # each object's peak and the pair's overlap
    expect(maps.locator(".legend")).to_contain_text("peak cherry")
    expect(maps.locator(".legend")).to_contain_text("peak moon")
    expect(maps.locator(".legend")).to_contain_text("overlap")
    assert round_steps(page, "#ft-maps-plot") == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    round_steps(page, "#ft-loss-plot")  # round ticks (0.1, 0.2 ...), never the data's own 0.0981 / 0.414
    expect(page.locator("#ft-cancel")).to_have_count(0)  # a finished job cannot be canceled
    assert low_contrast(page) == []
    save_screenshot(page, screenshots / "finetune.png")

    with page.expect_download() as weights:
        page.get_by_role("button", name="Download weights").click()
    assert weights.value.suggested_filename == "cherry-moon@1.safetensors"
    version = client.get("/adapters/cherry-moon").json()["versions"][0]
    assert Path(weights.value.path()).stat().st_size == version["size"]

    # Generate with it, and the base model on the same seeds.
    page.get_by_role("button", name="Generate with cherry-moon@1").click()
    generate = page.locator("#generate-form")
    expect(generate.get_by_label("Adapter")).to_have_value("cherry-moon@1")
    expect(generate.get_by_label("Prompt", exact=True)).to_have_value("a cherry and a moon")
    expect(generate.get_by_label("Concepts for heatmaps")).to_have_value("cherry, moon")
    expect(generate.get_by_label("Also the base model on the same seeds")).to_be_checked()
    # The adapter's newest version shows its do-no-harm verdict in the picker (GET /adapters `verdict`).
    assert client.get("/adapters").json()[0]["verdict"] == verdict
    expect(page.locator("#gen-adapter-verdict")).to_have_text(f"Its do-no-harm check: {verdict}.")
    assert page.evaluate(CUT_SELECTS) == []
    generate.get_by_label("Seed", exact=True).fill("7")
    generate.get_by_label("Images").fill("2")
    page.evaluate(RECORD_TEXTS, "#gen-status")
    generate.get_by_role("button", name="Generate").click()

    gallery = page.locator("#gallery")
    done = r"“a cherry and a moon”: done in \d+ s \(base sepen-toy job [0-9a-f]{8}, cherry-moon@1 job [0-9a-f]{8}\)"
    expect(page.locator("#gen-status")).to_have_text(re.compile(done), timeout=120_000)
    expect(page.locator("#gen-status")).to_have_attribute("data-kind", "succeeded")
    statuses = [text for text, _, _ in page.evaluate("window.sepenTexts['#gen-status']")]
    assert statuses[0] == "“a cherry and a moon”: base sepen-toy queued · cherry-moon@1 queued", statuses
    assert re.fullmatch(done, statuses[-1]) and len(statuses) >= 2, statuses
    expect(gallery.locator("canvas.heatmap")).to_have_count(8)  # 4 images x 2 objects
    expect(gallery.locator("img")).to_have_count(4)  # each image once: the heatmaps are cut from its strip
    for seed in (7, 8):
        row = gallery.get_by_role("region", name=f"seed {seed}")
        shots = row.locator("figure.shot")
        expect(shots).to_have_count(2)
        expect(shots.nth(0).locator(":scope > figcaption")).to_have_text(f"base sepen-toy · seed {seed}")
        expect(shots.nth(1).locator(":scope > figcaption")).to_have_text(f"cherry-moon@1 · seed {seed}")
        for shot in (shots.nth(0), shots.nth(1)):
            expect(shot.locator("img.image")).to_have_js_property("naturalWidth", 32)  # the toy model's 32x32
            assert shot.locator("img.image").get_attribute("src").startswith("blob:")
            labels = shot.locator(".map figcaption")
            expect(labels).to_have_count(2)
            expect(labels.nth(0)).to_have_text(re.compile(r"cherry peak (0\.\d+|1)"))
            expect(labels.nth(1)).to_have_text(re.compile(r"moon peak (0\.\d+|1)"))
            assert float(labels.nth(0).evaluate("node => parseFloat(getComputedStyle(node).fontSize)")) >= 13
            expect(shot.locator("canvas.heatmap").first).to_have_js_property("width", 128)  # the strip's panel
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
    assert low_contrast(page) == []
    save_screenshot(page, screenshots / "generate.png")

    # The lists: three jobs, all finished; the adapter's one version.
    page.get_by_role("link", name="Jobs").click()
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#jobs-table tbody tr[data-status=succeeded]")).to_have_count(3)
    expect(page.locator("#jobs-table").get_by_role("button", name=re.compile("^Cancel"))).to_have_count(0)
    assert low_contrast(page) == []
    page.get_by_role("link", name="Adapters").click()
    expect(page.locator("#adapters-table tbody tr")).to_have_count(1)
    expect(page.locator("#adapters-table tbody tr")).to_contain_text("cherry + moon")
    check_cell = page.locator("#adapters-table tbody tr td[data-label='Do-no-harm check']")
    expect(check_cell).to_contain_text(verdict)
    assert low_contrast(page) == []

    # At a phone's width: one column, nothing wider than the screen, every select's choice whole, text readable.
    page.set_viewport_size(PHONE)
    assert no_horizontal_scroll(page)
    assert low_contrast(page) == []
    page.get_by_role("link", name="Finetune").click()
    assert page.evaluate(CUT_SELECTS) == []
    page.get_by_role("link", name="Generate").click()
    expect(gallery.locator("canvas.heatmap")).to_have_count(8)
    assert no_horizontal_scroll(page)
    assert page.evaluate(CUT_SELECTS) == []  # "sepen-toy (default)", "cherry-moon@1"
    assert low_contrast(page) == []
    save_screenshot(page, screenshots / "phone.png")

    # Cancel a long finetune while it runs; delete the adapter version (after the browser's confirm).
    page.get_by_role("link", name="Finetune").click()
    form.get_by_label("Adapter name").fill("long-run")
    form.get_by_label("Latent pool").fill("")  # training latents from the pool is slow; 500 plain steps
    form.get_by_label("Training latents").select_option("")
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


def stand_in_job(job_id: str, kind: str, status: str, **fields) -> dict:
    created = "2026-12-08T10:00:00Z"
    job = {"id": job_id, "kind": kind, "status": status, "created_at": created, "started_at": created}
    job |= {"finished_at": None, "progress": None, "result": None, "error": None, "request": {}}
    job["links"] = {"self": f"/jobs/{job_id}", "cancel": None, "events": f"/jobs/{job_id}/events", "images": []}
    return job | fields


def test_a_finetune_shows_its_phases_and_a_comparison_ends_in_its_outcome_and_time(page: Page, api_key):
    """GET /jobs/{id} stands in (Playwright's routing) for a finetune that loads, trains, checks and succeeds, and for a
    generate that failed: the panel names each phase (an indeterminate bar while loading), the status lines end in
    the outcome and the time taken."""
    sign_in(page, api_key)
    expect(page.get_by_role("navigation", name="Sections")).to_be_visible()
    request = {"adapter": "stand-in", "concepts": {"pairs": [["cherry", "moon"]]}, "recipe": {"steps": 20}}
    losses = {"total": 0.5, "separate": 0.2, "enhance": 0.6, "prior": None}
    step = {"step": 5, "total": 20, "eta_s": 10.0, "elapsed_s": 2.0, "losses": losses, "min_peak": 0.3}
    step |= {"overlap": 0.4, "peaks": {"cherry": 0.3, "moon": 0.5}}
    loading = {"phase": "loading", "step": 0, "total": 20, "eta_s": None, "losses": None, "peaks": {}}
    result = {"adapter": "stand-in@1", "name": "stand-in", "version": 1, "sha256": "0" * 64}
    result["summary"] = {"loss_curve": [], "final": step, "resumed_from_step": 0, "diagnostics": []}
    result["summary"]["check"] = {"verdict": "helps", "pairs": [], "nouns": [], "images": 0}
    running = stand_in_job(JOB_ID, "finetune", "running", request=request)
    states = [
        running | {"progress": None},
        running | {"progress": loading | {"elapsed_s": 3.0}},
        running | {"progress": loading | {"elapsed_s": 7.0}},
        running | {"progress": {"phase": "training", **step}},
        running | {"progress": {**step, "phase": "checking", "eta_s": None, "elapsed_s": 4.0}},
        running | {"status": "succeeded", "finished_at": "2026-12-08T10:01:15Z", "result": result},
    ]
    reads: list[str] = []

    def read_finetune(route):
        reads.append(route.request.url)
        route.fulfill(json=states[min(len(reads) - 1, len(states) - 1)])

    failed = stand_in_job(
        GENERATE_ID,
        "generate",
        "failed",
        request={"prompt": "a cherry and a moon", "model": "sepen-toy", "adapter": None, "sample": {"seed": 7}},
        finished_at="2026-12-08T10:00:03Z",
        error={"code": "invalid_request", "message": "the stand-in refused"},
    )
    listed = {"jobs": [failed, states[0]], "next_cursor": None}
    page.route(re.compile(r".*/jobs\?.*"), lambda route: route.fulfill(json=listed))
    page.route(f"**/jobs/{JOB_ID}", read_finetune)
    page.route(f"**/jobs/{GENERATE_ID}", lambda route: route.fulfill(json=failed))
    page.route("**/events", lambda route: route.fulfill(status=404, json={"error": {"code": "not_found"}}))
    page.evaluate(RECORD_TEXTS, "#ft-status")

    page.get_by_role("link", name="Jobs").click()
    page.get_by_role("button", name=f"Open job {JOB_ID[:8]}").click()
    status = page.locator("#ft-status")
    expect(status).to_have_text(re.compile("^succeeded"), timeout=30_000)
    assert low_contrast(page) == []
    shown = page.evaluate("window.sepenTexts['#ft-status']")
    texts = list(dict.fromkeys(text for text, _, _ in shown))
    assert texts == [
        "running · starting",
        "running · loading the model and the probe prompts · 3 s",
        "running · loading the model and the probe prompts · 7 s",
        "running · step 5 of 20 · about 10 s left",
        "running · checking the adapter against the base model · 4 s",
        "succeeded in 75 s · published stand-in@1 · do-no-harm check: helps",
    ], texts
    bars = {text: (bar, note) for text, bar, note in shown}
    assert bars["running · loading the model and the probe prompts · 3 s"] == (False, False)  # indeterminate, note
    assert bars["running · step 5 of 20 · about 10 s left"] == (True, True)  # a step: the bar moves, the plots
    expect(page.locator("#ft-progress")).to_have_js_property("value", 20)

    page.get_by_role("link", name="Jobs").click()
    page.get_by_role("button", name=f"Open job {GENERATE_ID[:8]}").click()
    expect(page.locator("#gen-status")).to_have_text(
        f"“a cherry and a moon”: failed in 3 s: base sepen-toy failed (invalid_request: the stand-in refused) "
        f"(base sepen-toy job {GENERATE_ID[:8]})"
    )
    expect(page.locator("#gen-status")).to_have_attribute("data-kind", "failed")
    assert low_contrast(page) == []
