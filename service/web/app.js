// The web page's behaviour: sign-in, the sections behind the hash (#models, #finetune, ...), the forms with the API's
// errors beside the fields they name and the chosen model's defaults as placeholders, a finetune's phases, live
// progress and plots, the base-vs-adapter gallery with its status line, the lists.

import { api, ApiError, apiKey, blobUrl, download, forgetBlobs, TERMINAL, watchJob } from "./api.js";
import { formatNumber, lineChart } from "./plots.js";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const VIEWS = ["models", "finetune", "generate", "adapters", "jobs"];
const state = {
  models: [],
  adapters: [],
  adaptersRefresh: 0, // how many adapter refreshes have started: only the latest one's answer is shown
  finetuneWatch: null,
  generateWatches: [],
  jobsCursor: null,
};

/** An element: el("a", {href: "#x", class: "c", onclick: f, text: "t"}, ...children). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined && child !== false));
  return node;
}

const shortId = (id) => id.slice(0, 8);
const when = (iso) => (iso ? new Date(iso).toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" }) : "–");
const seconds = (s) => (s >= 90 ? `${Math.round(s / 60)} min` : `${Math.round(s)} s`);
/** Seconds from a job's submission to its end, on the service's clock; null while it runs. */
const took = (job) =>
  job?.finished_at && job?.created_at ? (Date.parse(job.finished_at) - Date.parse(job.created_at)) / 1000 : null;
const bytes = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(1)} kB`);
const splitList = (text) =>
  text
    .split(/\s*[,\n]\s*|\s+and\s+/)
    .map((s) => s.trim())
    .filter(Boolean);
const lines = (text) =>
  text
    .split("\n")
    .map((s) => s.trim())
    .filter(Boolean);
// A stored request is the job contract's form: a finetune's pairs are concepts.groups, a generate's seed sample.seed.
const groupsOf = (request) => request?.concepts?.groups ?? request?.concepts?.pairs ?? [];
const sampleOf = (request) => ({
  seed: request?.sample?.seed ?? request?.seed,
  images: request?.sample?.num_images ?? request?.images ?? 1,
});

/** Each cell names its column (data-label), which a phone-width layout shows beside the value. */
function labelCells(table) {
  const names = $$("thead th", table).map((th) => th.textContent);
  for (const row of $$("tbody tr", table)) [...row.children].forEach((cell, i) => (cell.dataset.label = names[i]));
}

function setStatus(node, text, kind = "") {
  node.textContent = text;
  node.dataset.kind = kind;
}

// ---- errors beside their fields ------------------------------------------------------------------

const controlOf = (field) => $("input, select, textarea", field); // a fieldset's: its first

/** Each [data-field] gets an error line (described-by its control); each form an error line of its own. */
function prepareForms() {
  for (const form of $$("form")) {
    for (const field of $$("[data-field]", form)) {
      const id = `${form.id}-${field.dataset.field.replace(/[^\w-]/g, "-")}-error`;
      const error = el("p", { class: "error", id, hidden: true });
      if (field.tagName === "FIELDSET") {
        $(":scope > legend", field).after(error);
        field.setAttribute("aria-describedby", id);
      } else {
        field.append(error);
        const control = controlOf(field);
        const described = [control.getAttribute("aria-describedby"), id].filter(Boolean).join(" ");
        control.setAttribute("aria-describedby", described);
      }
    }
    const actions = $(":scope > .actions", form) ?? form;
    actions.before(el("p", { class: "error form-error", role: "alert", hidden: true }));
  }
}

function clearErrors(form) {
  for (const error of $$(".error", form)) {
    error.hidden = true;
    error.textContent = "";
  }
  for (const field of $$(".invalid", form)) field.classList.remove("invalid");
  for (const control of $$("[aria-invalid]", form)) control.removeAttribute("aria-invalid");
}

/** Show an API error ({code, message, field}) beside the field it names (the longest data-field that is a prefix of
 * its dotted path), or at the form's foot; focus the field. A 401 outside the sign-in ends the session. */
function showError(form, error) {
  if (error.status === 401 && form.id !== "signin-form") {
    signOut(error.message);
    return;
  }
  const path = error.field || form.dataset.defaultField || "";
  let target = null;
  for (const field of $$("[data-field]", form)) {
    const name = field.dataset.field;
    if ((path === name || path.startsWith(`${name}.`)) && (!target || name.length > target.dataset.field.length)) {
      target = field;
    }
  }
  const message = error.status ? `${error.message} (${error.status} ${error.code})` : error.message;
  if (target && !target.closest("[hidden]")) {
    const line = $(":scope > .error", target);
    line.textContent = message;
    line.hidden = false;
    target.classList.add("invalid");
    const control = controlOf(target);
    control.setAttribute("aria-invalid", "true");
    const details = target.closest("details");
    if (details) details.open = true;
    control.focus();
  } else {
    const line = $(".form-error", form);
    line.textContent = message;
    line.hidden = false;
    line.setAttribute("tabindex", "-1");
    line.focus();
  }
}

/** A number input's value: undefined when empty; a browser that could not read it is the user's error to fix. */
function numberOf(input, field) {
  if (input.validity.badInput) throw new ApiError(0, "validation_error", `${field}: enter a number`, field);
  const raw = input.value.trim();
  return raw === "" ? undefined : Number(raw);
}

// ---- signing in and out, and the sections --------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const key = $("#api-key").value.trim();
  if (!key) {
    showError(form, { field: "key", message: "enter an API key" });
    return;
  }
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    state.models = await api("/models", { key });
  } catch (exc) {
    showError(form, exc);
    return;
  } finally {
    button.disabled = false;
  }
  apiKey.set(key);
  $("#api-key").value = "";
  enter();
}

function signOut(message) {
  apiKey.clear();
  state.finetuneWatch?.stop();
  for (const watch of state.generateWatches) watch.stop();
  state.generateWatches = [];
  forgetBlobs();
  state.adapters = []; // nothing of this tenant's stays on the page
  renderAdapters();
  fillAdapterPicker();
  $("#jobs-table tbody").replaceChildren();
  $("#ft-job").hidden = true;
  $("#gallery").hidden = true;
  route();
  if (message) showError($("#signin-form"), { field: "key", message });
}

async function enter() {
  const key = apiKey.get();
  $("#key-prefix").textContent = `key ${key.slice(0, 15)}…`;
  if (!state.models.length) {
    const list = $("#model-list");
    list.setAttribute("aria-busy", "true");
    list.replaceChildren(el("p", { class: "loading", text: "Loading the models…" }));
    try {
      state.models = await api("/models");
    } catch (exc) {
      signOut(exc.status === 401 ? exc.message : `could not list the models: ${exc.message}`);
      return;
    } finally {
      list.removeAttribute("aria-busy");
    }
  }
  renderModels();
  fillModelSelects();
  refreshAdapters();
  route(true);
}

function route(entering = false) {
  const signedIn = Boolean(apiKey.get());
  const wanted = location.hash.slice(1);
  const current = $$(".view").find((view) => !view.hidden)?.id;
  let view = "signin";
  if (signedIn) view = VIEWS.includes(wanted) ? wanted : VIEWS.includes(current) && !entering ? current : "models";
  for (const section of $$(".view")) section.hidden = section.id !== view;
  $("#nav").hidden = !signedIn;
  $("#account").hidden = !signedIn;
  for (const link of $$("#nav a")) {
    if (link.getAttribute("href") === `#${view}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (view === "adapters") refreshAdapters();
  if (view === "jobs") refreshJobs();
  return view;
}

function go(view) {
  if (location.hash === `#${view}`) route();
  else location.hash = `#${view}`; // hashchange routes and moves focus
}

// ---- models --------------------------------------------------------------------------------------

function defaultsText(section) {
  const entries = Object.entries(section ?? {});
  return entries.length ? entries.map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`).join(", ") : null;
}

function renderModels() {
  const cards = modelsInOrder().map((model) => {
    const d = model.defaults ?? {};
    const layouts = { sd: "Stable Diffusion 1.x / 2.x", sdxl: "SDXL" };
    const rows = [
      ["Layout", layouts[model.architecture] ?? "unknown here"],
      ["Native size", model.native_width ? `${model.native_width} × ${model.native_height} px` : "unknown here"],
      ["Sampling", defaultsText(d.sample) ?? "the paper's (50 steps, guidance 6)"],
      ["Maps", defaultsText(d.maps) ?? "the paper's"],
      ["Finetune, pairs", defaultsText(d.finetune) ?? "the paper's (200 steps, lr 8e-6, batch 4)"],
      ["Finetune, collection", defaultsText(d.large_scale) ?? "the paper's large-scale recipe"],
      [
        "Limits",
        `up to ${model.limits.max_width} × ${model.limits.max_height} px, ${model.limits.max_images} images, ` +
          `${model.limits.max_steps} steps a request`,
      ],
    ];
    const nouns = model.nouns ?? [];
    return el(
      "article",
      { class: "card", "aria-labelledby": `model-${model.name}` },
      el(
        "h2",
        { id: `model-${model.name}` },
        model.name,
        model.default ? el("span", { class: "badge", text: "default" }) : null,
      ),
      model.note ? el("p", { class: "note", text: `Note: ${model.note}.` }) : null,
      el("dl", {}, ...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])),
      nouns.length
        ? el(
            "div",
            { class: "nouns" },
            el("h3", { text: `Its ${nouns.length} nouns` }),
            el("ul", { class: "chips" }, ...nouns.map((noun) => el("li", { text: noun }))),
            el("p", { class: "help" }, `e.g. “a ${nouns[0]} and a ${nouns[1] ?? nouns[0]}”`),
          )
        : null,
      el(
        "div",
        { class: "actions" },
        el("button", {
          type: "button",
          class: "quiet",
          onclick: () => useModel("finetune", model.name),
          text: "Finetune",
          "aria-label": `Finetune ${model.name}`,
        }),
        el("button", {
          type: "button",
          class: "quiet",
          onclick: () => useModel("generate", model.name),
          text: "Generate",
          "aria-label": `Generate with ${model.name}`,
        }),
      ),
    );
  });
  $("#model-list").replaceChildren(...cards);
}

function useModel(view, name) {
  const select = view === "finetune" ? $("#ft-model") : $("#gen-model");
  select.value = name;
  select.dispatchEvent(new Event("change"));
  if (view === "generate") $("#gen-adapter").value = "";
  go(view);
}

function modelNamed(name) {
  return state.models.find((m) => m.name === name) ?? state.models.find((m) => m.default) ?? state.models[0];
}

/** The default first (GET /models lists it so too), then the others as the service lists them. */
const modelsInOrder = () => [...state.models].sort((a, b) => Number(b.default) - Number(a.default));

function fillModelSelects() {
  for (const select of $$(".model-select")) {
    const chosen = select.value;
    const label = (m) => (m.default ? `${m.name} (default)` : m.note ? `${m.name} (noise)` : m.name);
    select.replaceChildren(...modelsInOrder().map((m) => el("option", { value: m.name, text: label(m) })));
    select.value = state.models.some((m) => m.name === chosen) ? chosen : modelNamed().name;
  }
  showFinetuneDefaults();
  showSampleDefaults();
}

/** The chosen model's note (a tiny random model's images are noise) under its select. */
function showModelNote(select) {
  const note = $(`#${select.id}-note`);
  const model = modelNamed(select.value);
  note.textContent = model?.note ? `Note: ${model.note}.` : "";
  note.hidden = !model?.note;
}

/** What an empty field will get from the chosen model (GET /models `resolved`), as the recipe fields' placeholders,
 * and the templates the service uses where none are given. */
function showFinetuneDefaults() {
  const model = modelNamed($("#ft-model").value);
  if (!model) return;
  showModelNote($("#ft-model"));
  const mode = $("#finetune-form").elements.mode.value;
  const resolved = model.resolved;
  const recipe = resolved ? resolved[mode === "collection" ? "large_scale" : "finetune"] : {};
  for (const input of $$("[data-recipe]", $("#finetune-form"))) {
    const name = input.dataset.recipe;
    const value = "maps" in input.dataset ? recipe.maps?.[name] : recipe[name];
    const shown = value === undefined || value === null ? undefined : String(value);
    if (input.tagName === "SELECT") input.options[0].textContent = shown ? `${shown} (default)` : "model's default";
    else input.placeholder = shown ?? "model's default";
  }
  const templates = resolved?.templates?.[mode === "collection" ? "collection" : "pairs"];
  $("#ft-templates").placeholder = templates?.length ? templates.join("\n") : "";
}

function showSampleDefaults() {
  const model = modelNamed($("#gen-model").value);
  if (!model) return;
  showModelNote($("#gen-model"));
  const sample = model.resolved?.sample ?? {};
  for (const input of $$("[data-sample]", $("#generate-form"))) {
    const value = sample[input.dataset.sample];
    input.placeholder = value === undefined || value === null ? "model's default" : String(value);
  }
  $("#gen-height").placeholder = model.native_height ?? "";
  $("#gen-width").placeholder = model.native_width ?? "";
}

// ---- finetune ------------------------------------------------------------------------------------

function finetuneBody(form) {
  const data = new FormData(form);
  const body = { adapter: data.get("adapter").trim(), model: data.get("model") || undefined, concepts: {} };
  if (data.get("mode") === "pairs") {
    body.concepts.pairs = lines(data.get("pairs")).map(splitList);
  } else {
    const collection = data.get("collection").trim();
    body.concepts.collection = collection === "large-scale" ? collection : splitList(collection);
    const heldOut = splitList(data.get("held_out"));
    if (heldOut.length) body.concepts.held_out = heldOut;
  }
  const templates = lines(data.get("templates"));
  if (templates.length) body.templates = templates;
  body.recipe = {};
  for (const input of $$("[data-recipe]", form)) {
    const name = input.dataset.recipe;
    const value = input.type === "number" ? numberOf(input, `recipe.${name}`) : input.value.trim() || undefined;
    if (value !== undefined) body.recipe[name] = value;
  }
  return body;
}

async function submitFinetune(event) {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    const submitted = await api("/finetune", { method: "POST", body: finetuneBody(form) });
    watchFinetune(submitted); // the job, as GET /jobs/{id} answers it
    $("#ft-job-title").focus();
  } catch (exc) {
    showError(form, exc);
  } finally {
    button.disabled = false;
  }
}

/** Follow a finetune job: status, progress bar, numbers, the loss curves and the maps' peaks and overlap. */
function watchFinetune(job) {
  state.finetuneWatch?.stop();
  const panel = $("#ft-job");
  panel.hidden = false;
  $("#ft-job-title").setAttribute("tabindex", "-1");
  const history = new Map(); // step -> the progress reported at that step
  const render = (current) => renderFinetune(current, history);
  render(job);
  state.finetuneWatch = watchJob(job.id, render, {
    onError: (exc) => {
      if (exc.status === 401) signOut(exc.message);
      else setStatus($("#ft-status"), `${job.status}; the service did not answer (${exc.message}), retrying`, "warn");
    },
  });
}

// What a finetune does in each phase of its progress (GET /jobs/{id}: progress.phase), as its status line says it.
const PHASES = {
  loading: "loading the model and the probe prompts",
  checking: "checking the adapter against the base model",
};

/** The phase a job is in: "queued", "starting" (running, nothing reported yet), a finetune's phase, or "done". */
function phaseOf(job) {
  if (TERMINAL.has(job.status)) return "done";
  if (job.status === "queued") return "queued";
  if (!job.progress) return "starting";
  return job.progress.phase ?? "training";
}

/** A finetune's status line: its phase while it runs, its end with the time it took. */
function finetuneText(job) {
  const progress = job.progress;
  const phase = phaseOf(job);
  if (phase === "done") {
    const spent = took(job);
    let text = spent === null ? job.status : `${job.status} in ${seconds(spent)}`;
    if (job.status === "succeeded") {
      text += ` · published ${job.result.adapter}`;
      const verdict = job.result.summary?.check?.verdict;
      if (verdict) text += ` · do-no-harm check: ${verdict}`;
    }
    if (job.error) text += ` · ${job.error.code}: ${job.error.message}`;
    return text;
  }
  if (phase === "queued") return "queued · waiting for a worker";
  if (phase === "starting") return `${job.status} · starting`;
  if (phase === "training") {
    let text = `${job.status} · step ${progress.step} of ${progress.total}`;
    if (typeof progress.eta_s === "number") text += ` · about ${seconds(progress.eta_s)} left`;
    return text;
  }
  return `${job.status} · ${PHASES[phase] ?? phase} · ${seconds(progress.elapsed_s ?? 0)}`;
}

function renderFinetune(job, history) {
  const progress = job.progress;
  const phase = phaseOf(job);
  if (phase === "training" && typeof progress.step === "number") history.set(progress.step, progress);
  const request = job.request ?? {};
  $("#ft-job-title").textContent = `Finetune ${request.adapter ?? ""} · job ${shortId(job.id)}`;
  setStatus($("#ft-status"), finetuneText(job), job.status);
  $("#ft-job").dataset.status = job.status;
  $("#ft-job").dataset.phase = phase;
  $("#ft-job").setAttribute("aria-busy", String(phase === "starting" || phase === "loading"));
  const bar = $("#ft-progress");
  bar.max = progress?.total || request.recipe?.steps || 1;
  if (phase === "starting" || phase === "loading") bar.removeAttribute("value"); // indeterminate: no step yet
  else bar.value = job.status === "succeeded" || phase === "checking" ? bar.max : (progress?.step ?? 0);

  let numbers = [];
  if (progress?.losses) {
    numbers = [
      ["step", `${progress.step} / ${progress.total}`],
      ["loss", formatNumber(progress.losses.total)],
      ["separate", formatNumber(progress.losses.separate)],
      ["enhance", formatNumber(progress.losses.enhance)],
      ...Object.entries(progress.peaks ?? {}).map(([name, peak]) => [`peak ${name}`, formatNumber(peak)]),
      ["overlap", formatNumber(progress.overlap)],
      [progress.phase === "checking" ? "checking" : "elapsed", seconds(progress.elapsed_s)],
    ];
  } else if (progress) {
    numbers = [[phase, seconds(progress.elapsed_s ?? 0)]];
  }
  $("#ft-numbers").replaceChildren(
    ...numbers.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }))),
  );

  const seen = [...history.values()].sort((a, b) => a.step - b.step);
  const curve = job.result?.summary?.loss_curve ?? [];
  const losses = curve.length
    ? [
        { name: "loss", points: curve.map((p) => [p.step, p.loss]) },
        { name: "separate", points: curve.map((p) => [p.step, p.separate]) },
        { name: "enhance", points: curve.map((p) => [p.step, p.enhance]) },
      ]
    : [
        { name: "loss", points: seen.map((p) => [p.step, p.losses.total]) },
        { name: "separate", points: seen.map((p) => [p.step, p.losses.separate]) },
        { name: "enhance", points: seen.map((p) => [p.step, p.losses.enhance]) },
      ];
  const names = [...new Set(seen.flatMap((p) => Object.keys(p.peaks ?? {})))];
  const maps = names.length
    ? names.map((name) => ({
        name: `peak ${name}`,
        points: seen.filter((p) => name in p.peaks).map((p) => [p.step, p.peaks[name]]),
      }))
    : [{ name: "weakest peak", points: curve.map((p) => [p.step, p.min_peak]) }];
  maps.push({
    name: "overlap",
    points: curve.length ? curve.map((p) => [p.step, p.overlap]) : seen.map((p) => [p.step, p.overlap]),
  });
  $("#ft-plots-note").hidden = Boolean(seen.length || curve.length);
  $("#ft-loss-plot").replaceChildren(lineChart({ title: "Losses", series: losses }));
  $("#ft-maps-plot").replaceChildren(lineChart({ title: "Attention peaks and overlap", series: maps, yRange: [0, 1] }));

  // The buttons are rebuilt only when they change: a rebuilt button would take the keyboard's focus away each second.
  const shape = `${job.id} ${job.status} ${Boolean(job.links?.cancel)}`;
  if ($("#ft-actions").dataset.shape === shape) return;
  $("#ft-actions").dataset.shape = shape;
  const actions = [];
  if (job.links?.cancel) {
    actions.push(
      el("button", {
        type: "button",
        class: "danger",
        id: "ft-cancel",
        onclick: () => cancelJob(job.id, $("#ft-status")),
        text: "Cancel",
      }),
    );
  }
  if (job.status === "succeeded") {
    const ref = job.result.adapter;
    actions.push(
      el("button", {
        type: "button",
        onclick: () => generateWith(ref, groupsOf(request)[0]),
        text: `Generate with ${ref}`,
      }),
      el("button", {
        type: "button",
        class: "quiet",
        onclick: () => saveWeights(ref, job.result.weights_url, $("#ft-status")),
        text: "Download weights",
      }),
    );
    const diagnostics = job.result.summary?.diagnostics ?? [];
    if (diagnostics.length) actions.push(diagnosticsTable(diagnostics));
  }
  $("#ft-actions").replaceChildren(...actions);
}

/** Each probe prompt's weakest peak and overlap, before and after the adapter. */
function diagnosticsTable(diagnostics) {
  const mean = (values) => (values.length ? values.reduce((a, b) => a + b, 0) / values.length : undefined);
  const value = (d, name) => (name === "overlap" ? mean(Object.values(d?.overlaps ?? {})) : d?.[name]);
  const rows = diagnostics.map((d) =>
    el(
      "tr",
      {},
      el("th", { scope: "row", text: d.prompt }),
      el("td", { text: `${formatNumber(value(d.before, "min_peak"))} → ${formatNumber(value(d.after, "min_peak"))}` }),
      el("td", { text: `${formatNumber(value(d.before, "overlap"))} → ${formatNumber(value(d.after, "overlap"))}` }),
    ),
  );
  return el(
    "div",
    { class: "table-wrap diagnostics" },
    el(
      "table",
      {},
      el("caption", { text: "Probe prompts, base → adapter" }),
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          el("th", { scope: "col", text: "prompt" }),
          el("th", { scope: "col", text: "weakest peak" }),
          el("th", { scope: "col", text: "overlap" }),
        ),
      ),
      el("tbody", {}, ...rows),
    ),
  );
}

async function cancelJob(id, statusNode) {
  try {
    await api(`/jobs/${id}/cancel`, { method: "POST" });
    setStatus(statusNode, `cancel requested for job ${shortId(id)}`);
  } catch (exc) {
    if (exc.status === 401) signOut(exc.message);
    else setStatus(statusNode, `could not cancel job ${shortId(id)}: ${exc.message}`, "failed");
  }
}

async function saveWeights(ref, url, statusNode) {
  try {
    await download(url, `${ref}.safetensors`);
  } catch (exc) {
    setStatus(statusNode, `could not download ${ref}: ${exc.message}`, "failed");
  }
}

// ---- generate ------------------------------------------------------------------------------------

function generateWith(ref, concepts) {
  refreshAdapters().then(() => {
    $("#gen-adapter").value = ref;
    $("#gen-adapter").dispatchEvent(new Event("change"));
  });
  if (concepts?.length >= 2) {
    $("#gen-concepts").value = concepts.join(", ");
    $("#gen-prompt").value = concepts.map((c) => `a ${c}`).join(" and ");
  }
  go("generate");
}

function generateBody(form) {
  const data = new FormData(form);
  const body = { prompt: data.get("prompt"), model: data.get("model") || undefined };
  const concepts = splitList(data.get("concepts"));
  if (concepts.length) body.concepts = concepts;
  if (data.get("adapter")) body.adapter = data.get("adapter");
  for (const [name, id] of [
    ["seed", "gen-seed"],
    ["images", "gen-images"],
    ["steps", "gen-steps"],
    ["guidance", "gen-guidance"],
    ["height", "gen-height"],
    ["width", "gen-width"],
  ]) {
    const value = numberOf($(`#${id}`), name);
    if (value !== undefined) body[name] = value;
  }
  if (data.get("negative_prompt")) body.negative_prompt = data.get("negative_prompt");
  return body;
}

async function submitGenerate(event) {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const button = $("button[type=submit]", form);
  button.disabled = true;
  try {
    const body = generateBody(form);
    if (body.seed === undefined) {
      body.seed = Math.floor(Math.random() * 1e6); // chosen here, so that base and adapter share it
      $("#gen-seed").value = body.seed;
    }
    const runs = [];
    if (body.adapter) {
      runs.push({ label: body.adapter, body }); // first: a refused adapter leaves no base job behind
      if ($("#gen-compare").checked)
        runs.unshift({ label: `base ${body.model ?? ""}`.trim(), body: { ...body, adapter: undefined } });
    } else {
      runs.push({ label: `base ${body.model ?? ""}`.trim(), body });
    }
    const warnings = [];
    for (const run of [...runs].reverse()) {
      const submitted = await api("/generate", { method: "POST", body: run.body });
      run.job = submitted; // the job, as GET /jobs/{id} answers it, with the submission's warnings
      warnings.push(...(submitted.warnings ?? []));
    }
    showGallery(runs, warnings);
  } catch (exc) {
    showError(form, exc);
  } finally {
    button.disabled = false;
  }
}

/** Base and adapter side by side, one row per seed; each image with its heatmaps and scores, filled in as jobs end.
 * The status line follows the comparison (each job's phase) and ends in done or failed with the time taken; the
 * service's warnings (an adapter whose check says it hurts) have a line of their own. */
function showGallery(runs, warnings = []) {
  for (const watch of state.generateWatches) watch.stop();
  const gallery = $("#gallery");
  gallery.hidden = false;
  const { images, seed } = sampleOf(runs[0].job.request);
  const rows = [];
  for (let i = 0; i < images; i++) {
    const cells = runs.map((run) =>
      el(
        "figure",
        { class: "shot", "data-run": run.label, "aria-busy": "true" },
        el("figcaption", { text: run.label }),
        el("p", { class: "pending", text: "queued" }),
      ),
    );
    rows.push(
      el(
        "section",
        { class: "seed-row", "aria-label": `seed ${seed + i}` },
        el("h3", { text: `seed ${seed + i}` }),
        el("div", { class: "side-by-side" }, ...cells),
      ),
    );
    runs.forEach((run, r) => ((run.cells ??= [])[i] = cells[r]));
  }
  $("#gallery-rows").replaceChildren(...rows);
  const comparison = { runs, prompt: runs[0].job.request.prompt };
  for (const run of runs) run.latest = run.job;
  renderComparison(comparison);
  $("#gen-warnings").textContent = warnings.join(" ");
  $("#gen-warnings").hidden = !warnings.length;
  state.generateWatches = runs.map((run) =>
    watchJob(
      run.job.id,
      (job) => {
        run.latest = job;
        renderRun(run, job);
        renderComparison(comparison);
      },
      {
        onError: (exc) =>
          exc.status === 401
            ? signOut(exc.message)
            : setStatus($("#gen-status"), `${run.label}: ${exc.message}; retrying`, "warn"),
      },
    ),
  );
}

/** Where a generate job is, in a few words: queued, loading the model (running, no step yet), step k of n, or how it
 * ended. */
function runState(job) {
  const phase = phaseOf(job);
  if (phase === "starting") return "loading the model";
  if (phase === "done" || phase === "queued") return job.status;
  return `step ${job.progress.step} of ${job.progress.total}`;
}

/** The comparison's status line: each job's state while any runs; then done, or failed (or canceled), with the time
 * from the first submission to the last end (the service's clock) and the jobs' ids. */
function renderComparison({ runs, prompt }) {
  const jobs = runs.map((run) => run.latest);
  const line = $("#gen-status");
  if (!jobs.every((job) => TERMINAL.has(job.status))) {
    setStatus(line, `“${prompt}”: ${runs.map((run, i) => `${run.label} ${runState(jobs[i])}`).join(" · ")}`);
    $("#gallery").setAttribute("aria-busy", "true");
    return;
  }
  $("#gallery").setAttribute("aria-busy", "false");
  const began = Math.min(...jobs.map((job) => Date.parse(job.created_at)));
  const ended = Math.max(...jobs.map((job) => Date.parse(job.finished_at ?? job.created_at)));
  const time = Number.isFinite(began) && Number.isFinite(ended) ? ` in ${seconds((ended - began) / 1000)}` : "";
  const ids = runs.map((run) => `${run.label} job ${shortId(run.job.id)}`).join(", ");
  const unfinished = runs.filter((_, i) => jobs[i].status !== "succeeded");
  if (!unfinished.length) {
    setStatus(line, `“${prompt}”: done${time} (${ids})`, "succeeded");
    return;
  }
  const outcome = jobs.some((job) => job.status === "failed") ? "failed" : "canceled";
  const why = unfinished
    .map((run) => {
      const { status, error } = run.latest;
      return `${run.label} ${status}${error ? ` (${error.code}: ${error.message})` : ""}`;
    })
    .join("; ");
  setStatus(line, `“${prompt}”: ${outcome}${time}: ${why} (${ids})`, outcome);
}

function renderRun(run, job) {
  if (run.shown) return;
  if (job.status !== "succeeded") {
    let text = runState(job);
    if (job.error) text = `${job.status} · ${job.error.code}: ${job.error.message}`;
    for (const cell of run.cells) {
      const pending = $(".pending", cell) ?? cell.appendChild(el("p", { class: "pending" }));
      pending.textContent = text;
      cell.dataset.status = job.status;
      cell.setAttribute("aria-busy", String(!TERMINAL.has(job.status)));
      if (job.links?.cancel && !$("button", cell)) {
        cell.append(
          el("button", {
            type: "button",
            class: "danger quiet",
            onclick: () => cancelJob(job.id, $("#gen-status")),
            text: "Cancel",
          }),
        );
      } else if (!job.links?.cancel) $("button", cell)?.remove();
    }
    return;
  }
  run.shown = true;
  job.result.images.forEach((image, i) => fillShot(run.cells[i], run, job, image));
}

/** An image element once its blob: URL has been read (its natural size known). */
function loaded(src) {
  const image = new Image();
  image.src = src;
  return image.decode().then(() => image);
}

/** Each object's heatmap, cut from the service's heatmap strip (the image, then one panel per object, under a label
 * row), on a canvas under a caption the page writes itself: the image is shown once, and the labels stay readable at
 * any width. */
async function heatmapPanels(image, job, photo) {
  const concepts = job.result.concepts ?? [];
  const strip = await loaded(await blobUrl(image.heatmap_url));
  const width = Math.floor(strip.naturalWidth / (concepts.length + 1));
  const height = Math.round(photo.naturalHeight * (width / photo.naturalWidth));
  const top = strip.naturalHeight - height; // below the strip's own label row
  return concepts.map((concept, k) => {
    const peak = image.scores?.peaks?.[concept];
    const score = peak === undefined ? null : `peak ${formatNumber(peak)}`;
    const label = [concept, score].filter(Boolean).join(", ");
    const canvas = el("canvas", { class: "heatmap", width, height, role: "img", "aria-label": `heatmap of ${label}` });
    canvas.getContext("2d").drawImage(strip, (k + 1) * width, top, width, height, 0, 0, width, height);
    const caption = el("figcaption", {}, el("span", { class: "concept", text: concept }));
    if (score) caption.append(" ", el("span", { text: score }));
    return el("figure", { class: "map" }, canvas, caption);
  });
}

async function fillShot(cell, run, job, image) {
  cell.dataset.status = "succeeded";
  cell.setAttribute("aria-busy", "false");
  const name = `${run.label.replace(/[^\w@.-]+/g, "-")}-seed${image.seed}`;
  const parts = [el("figcaption", { text: `${run.label} · seed ${image.seed}` })];
  try {
    const src = await blobUrl(image.url);
    parts.push(el("img", { class: "image", src, alt: `${job.request.prompt}, ${run.label}, seed ${image.seed}` }));
    if (image.heatmap_url) {
      const panels = await heatmapPanels(image, job, await loaded(src));
      parts.push(el("div", { class: "maps", role: "group", "aria-label": "attention heatmaps" }, ...panels));
    }
  } catch (exc) {
    parts.push(el("p", { class: "error", text: `could not load the image: ${exc.message}` }));
  }
  const overlaps = Object.entries(image.scores?.overlaps ?? {});
  if (overlaps.length) {
    parts.push(
      el(
        "dl",
        { class: "scores" },
        ...overlaps.flatMap(([k, v]) => [el("dt", { text: `overlap ${k}` }), el("dd", { text: formatNumber(v) })]),
      ),
    );
  }
  const what = `${run.label}, seed ${image.seed}`;
  const links = el("div", { class: "actions downloads" }, el("span", { class: "help", text: "Download" }));
  links.append(
    el("button", {
      type: "button",
      class: "quiet",
      onclick: () => download(image.url, `${name}.png`),
      text: "image",
      "aria-label": `Download the image (${what})`,
    }),
  );
  if (image.heatmap_url) {
    links.append(
      el("button", {
        type: "button",
        class: "quiet",
        onclick: () => download(image.heatmap_url, `${name}-heatmap.png`),
        text: "heatmaps",
        "aria-label": `Download the heatmaps (${what})`,
      }),
    );
  }
  if (job.links?.adapter) {
    links.append(
      el("button", {
        type: "button",
        class: "quiet",
        onclick: () => saveWeights(job.result.adapter, job.links.adapter, $("#gen-status")),
        text: "adapter",
        "aria-label": `Download ${job.result.adapter}`,
      }),
    );
  }
  parts.push(links);
  cell.replaceChildren(...parts);
}

// ---- adapters ------------------------------------------------------------------------------------

// A version's latest evaluation (POST /evaluate) in one line: success base -> adapter where the model has a judge,
// else the weakest object's attention peak.
function describeEvaluation(evaluation) {
  if (!evaluation) return "–";
  const { base, adapter, paired } = evaluation.summary;
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  if (evaluation.judged && paired) {
    const change = `${paired.difference >= 0 ? "+" : ""}${(100 * paired.difference).toFixed(1)}`;
    return `${pct(base.success)} → ${pct(adapter.success)} (${change} points, p=${paired.p_mcnemar.toPrecision(2)})`;
  }
  return `weakest peak ${base.min_peak.toFixed(3)} → ${adapter.min_peak.toFixed(3)}`;
}

// A version's do-no-harm check (run when its finetune ended) in one line: the verdict, then each pair or noun it hurt.
function describeCheck(check) {
  if (!check) return "–";
  const hurt = [...check.pairs, ...check.nouns].filter((row) => row.verdict === "hurts");
  const points = (row) => `${(100 * row.paired.difference).toFixed(0)} points`;
  const detail = hurt.map((row) => `${row.concepts.join(" + ")} ${points(row)}`).join("; ");
  return detail ? `${check.verdict}: ${detail}` : check.verdict;
}

// Queue an evaluation: on a model with a judge, its own prompts; else one prompt per concept group of the adapter.
async function evaluateVersion(version, groups) {
  const status = $("#adapters-status");
  const model = state.models.find((m) => m.name === version.base_model);
  const body = { adapter: version.ref, samples: 4 };
  if (!model?.judged) {
    if (!groups?.length) {
      setStatus(status, `${version.ref}: its model has no judge; evaluate it with prompts (POST /evaluate)`, "failed");
      return;
    }
    body.prompts = groups.slice(0, 16).map((g) => ({ prompt: `a ${g.join(" and a ")}`, concepts: g }));
  }
  try {
    const job = await api("/evaluate", { method: "POST", body });
    setStatus(status, `evaluating ${version.ref}: job ${shortId(job.id)} (Refresh when it has finished)`);
  } catch (exc) {
    if (exc.status === 401) return signOut(exc.message);
    setStatus(status, `could not evaluate ${version.ref}: ${exc.message}`, "failed");
  }
}

// Reload the adapters; `message` is what the status line then says (what the caller just did). A refresh that a
// later one overtook (opening the view, then deleting at once) drops its answer: it would show the list from before.
async function refreshAdapters(message = "") {
  const status = $("#adapters-status");
  const mine = ++state.adaptersRefresh;
  const table = $("#adapters-table");
  table.setAttribute("aria-busy", "true");
  if (!state.adapters.length) setStatus(status, "Loading the adapters…");
  let adapters;
  try {
    const summaries = await api("/adapters");
    adapters = await Promise.all(
      summaries.map(async (summary) => ({
        ...(await api(`/adapters/${encodeURIComponent(summary.name)}`)),
        verdict: summary.verdict, // the newest version's do-no-harm verdict (GET /adapters)
      })),
    );
  } catch (exc) {
    if (mine !== state.adaptersRefresh) return;
    table.removeAttribute("aria-busy");
    if (exc.status === 401) return signOut(exc.message);
    setStatus(status, `could not list the adapters: ${exc.message}`, "failed");
    return;
  }
  if (mine !== state.adaptersRefresh) return;
  table.removeAttribute("aria-busy");
  state.adapters = adapters;
  setStatus(status, message || (adapters.length ? "" : "No adapters yet: finetune one."));
  renderAdapters();
  fillAdapterPicker();
}

function renderAdapters() {
  const rows = state.adapters.flatMap((adapter) =>
    [...adapter.versions].reverse().map((v) => {
      const concepts = v.metadata?.concepts;
      const groups = concepts?.groups ?? concepts?.pairs;
      const described = groups
        ? groups.map((g) => g.join(" + ")).join("; ")
        : concepts?.collection
          ? `collection of ${concepts.collection.length}`
          : "–";
      return el(
        "tr",
        {},
        el("th", { scope: "row", text: v.ref }),
        el("td", { text: described }),
        el("td", { text: v.base_model }),
        el("td", { text: when(v.created_at) }),
        el("td", { text: bytes(v.size) }),
        el("td", { text: describeCheck(v.check), "data-kind": v.check?.verdict === "hurts" ? "warn" : "" }),
        el("td", { text: describeEvaluation(v.evaluation) }),
        el(
          "td",
          { class: "row-actions" },
          el("button", {
            type: "button",
            class: "quiet",
            onclick: () => generateWith(v.ref, groups?.[0]),
            text: "Generate",
            "aria-label": `Generate with ${v.ref}`,
          }),
          el("button", {
            type: "button",
            class: "quiet",
            onclick: () => evaluateVersion(v, groups),
            text: "Evaluate",
            "aria-label": `Evaluate ${v.ref} against its base model`,
          }),
          el("button", {
            type: "button",
            class: "quiet",
            onclick: () => saveWeights(v.ref, v.weights, $("#adapters-status")),
            text: "Download",
            "aria-label": `Download ${v.ref}`,
          }),
          el("button", {
            type: "button",
            class: "quiet",
            onclick: () => openJob(v.job_id),
            text: "Job",
            "aria-label": `The job that made ${v.ref}`,
          }),
          el("button", {
            type: "button",
            class: "danger quiet",
            onclick: () => deleteVersion(adapter.name, v.version),
            text: "Delete",
            "aria-label": `Delete ${v.ref}`,
          }),
        ),
      );
    }),
  );
  $("#adapters-table tbody").replaceChildren(...rows);
  labelCells($("#adapters-table"));
}

/** The versions, newest first, each with its do-no-harm verdict (the newest's from GET /adapters `verdict`), which
 * the line under the picker shows for the chosen one. */
function fillAdapterPicker() {
  const select = $("#gen-adapter");
  const chosen = select.value;
  const options = [el("option", { value: "", text: "none: the base model only" })];
  for (const adapter of state.adapters) {
    [...adapter.versions].reverse().forEach((v, i) => {
      const verdict = i === 0 ? adapter.verdict : v.check?.verdict;
      options.push(
        el("option", { value: v.ref, text: v.ref, "data-base": v.base_model, "data-verdict": verdict ?? undefined }),
      );
    });
  }
  select.replaceChildren(...options);
  select.value = options.some((o) => o.value === chosen) ? chosen : "";
  showAdapterVerdict();
}

function showAdapterVerdict() {
  const option = $("#gen-adapter").selectedOptions[0];
  const verdict = option?.dataset.verdict;
  const line = $("#gen-adapter-verdict");
  line.textContent = verdict ? `Its do-no-harm check: ${verdict}.` : option?.value ? "It ran no do-no-harm check." : "";
  line.dataset.kind = verdict === "hurts" ? "warn" : "";
}

async function deleteVersion(name, version) {
  const status = $("#adapters-status");
  if (!window.confirm(`Delete ${name}@${version} for good? Its number is never reused.`)) return;
  try {
    await api(`/adapters/${encodeURIComponent(name)}/${version}`, { method: "DELETE" });
  } catch (exc) {
    if (exc.status === 401) return signOut(exc.message);
    setStatus(status, `could not delete ${name}@${version}: ${exc.message}`, "failed");
    return;
  }
  await refreshAdapters(`deleted ${name}@${version}`);
}

// ---- jobs ----------------------------------------------------------------------------------------

async function refreshJobs(more = false) {
  const status = $("#jobs-status");
  const query = new URLSearchParams({ limit: "20" });
  if ($("#jobs-status-filter").value) query.set("status", $("#jobs-status-filter").value);
  if (more && state.jobsCursor) query.set("cursor", state.jobsCursor);
  const table = $("#jobs-table");
  table.setAttribute("aria-busy", "true");
  if (!$("#jobs-table tbody").children.length) setStatus(status, "Loading the jobs…");
  let page;
  try {
    page = await api(`/jobs?${query}`);
  } catch (exc) {
    if (exc.status === 401) return signOut(exc.message);
    setStatus(status, `could not list the jobs: ${exc.message}`, "failed");
    return;
  } finally {
    table.removeAttribute("aria-busy");
  }
  state.jobsCursor = page.next_cursor;
  $("#jobs-more").hidden = !page.next_cursor;
  const rows = page.jobs.map((job) => {
    const r = job.request ?? {};
    const what =
      job.kind === "finetune"
        ? `${r.adapter}: ${
            groupsOf(r)
              .map((p) => p.join(" + "))
              .join("; ") || "a collection"
          }${job.result ? ` → ${job.result.adapter}` : ""}`
        : job.kind === "evaluate"
          ? `${r.adapter} against ${r.model}, ${r.prompts?.length || "its own"} prompts × ${r.samples}${
              job.result ? `: ${describeEvaluation({ judged: job.result.judged, summary: job.result.summary })}` : ""
            }`
          : `“${r.prompt}”${r.adapter ? ` with ${r.adapter}` : ""}, seed ${sampleOf(r).seed ?? "random"}`;
    let shown = job.status;
    const phase = phaseOf(job);
    if (phase === "training") shown += ` ${job.progress.step}/${job.progress.total}`;
    else if (phase === "loading" || phase === "checking") shown += ` (${phase})`;
    if (job.error) shown += ` (${job.error.code})`;
    return el(
      "tr",
      { "data-status": job.status },
      el("th", { scope: "row" }, el("code", { text: shortId(job.id) })),
      el("td", { text: job.kind }),
      el("td", { class: "state", text: shown }),
      el("td", { text: when(job.created_at) }),
      el("td", { text: what }),
      el(
        "td",
        { class: "row-actions" },
        el("button", {
          type: "button",
          class: "quiet",
          onclick: () => openJob(job.id),
          text: "Open",
          "aria-label": `Open job ${shortId(job.id)}`,
        }),
        job.links.cancel
          ? el("button", {
              type: "button",
              class: "danger quiet",
              onclick: async () => {
                await cancelJob(job.id, status);
                refreshJobs();
              },
              text: "Cancel",
              "aria-label": `Cancel job ${shortId(job.id)}`,
            })
          : null,
      ),
    );
  });
  const body = $("#jobs-table tbody");
  if (more) body.append(...rows);
  else body.replaceChildren(...rows);
  labelCells($("#jobs-table"));
  setStatus(status, body.children.length ? "" : "No jobs yet.");
}

async function openJob(id) {
  let job;
  try {
    job = await api(`/jobs/${id}`);
  } catch (exc) {
    if (exc.status === 401) return signOut(exc.message);
    setStatus($("#jobs-status"), `could not open job ${shortId(id)}: ${exc.message}`, "failed");
    return;
  }
  if (job.kind === "finetune") {
    go("finetune");
    watchFinetune(job);
  } else if (job.kind === "evaluate") {
    go("adapters"); // the version shows its latest evaluation
    refreshAdapters();
  } else {
    go("generate");
    showGallery([{ label: job.request.adapter ?? `base ${job.request.model ?? ""}`.trim(), job }]);
  }
}

// ---- wiring --------------------------------------------------------------------------------------

function start() {
  prepareForms();
  $("#signin-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", () => signOut());
  $("#finetune-form").addEventListener("submit", submitFinetune);
  $("#generate-form").addEventListener("submit", submitGenerate);
  $("#ft-model").addEventListener("change", showFinetuneDefaults);
  $("#gen-model").addEventListener("change", showSampleDefaults);
  $("#gen-adapter").addEventListener("change", () => {
    showAdapterVerdict();
    const base = $("#gen-adapter").selectedOptions[0]?.dataset.base;
    if (base && state.models.some((m) => m.name === base)) {
      $("#gen-model").value = base; // an adapter runs on the model it was made for
      showSampleDefaults();
    }
  });
  for (const radio of $$("input[name=mode]")) {
    radio.addEventListener("change", () => {
      for (const field of $$("[data-mode]")) field.hidden = field.dataset.mode !== radio.form.elements.mode.value;
      showFinetuneDefaults();
    });
  }
  $("#adapters-refresh").addEventListener("click", () => refreshAdapters());
  $("#jobs-refresh").addEventListener("click", () => refreshJobs());
  $("#jobs-status-filter").addEventListener("change", () => refreshJobs());
  $("#jobs-more").addEventListener("click", () => refreshJobs(true));
  window.addEventListener("hashchange", () => {
    const view = route();
    $(`#${view} h1`)?.setAttribute("tabindex", "-1");
    $(`#${view} h1`)?.focus();
  });
  if (apiKey.get()) enter();
  else route();
  document.body.dataset.ready = "true";
}

start();
