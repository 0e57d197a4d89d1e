// The page's API client: the key in sessionStorage, JSON calls that throw the API's error shape, images and files as
// blob: URLs (fetched with the Authorization header), and a job's updates: Server-Sent Events read through fetch where
// the API serves GET /jobs/{id}/events, else GET /jobs/{id} once a second.

const STORAGE_KEY = "sepen.apiKey";
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export const apiKey = {
  get: () => sessionStorage.getItem(STORAGE_KEY),
  set: (value) => sessionStorage.setItem(STORAGE_KEY, value),
  clear: () => sessionStorage.removeItem(STORAGE_KEY),
};

/** An error answer of the API, `{"error": {"code", "message", "field"}}`, or a request that got none (status 0). */
export class ApiError extends Error {
  constructor(status, code, message, field = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

function authHeaders(key = apiKey.get(), extra = {}) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "network_error", `the service did not answer (${exc.message}); is it running?`);
  }
}

async function errorOf(response) {
  let detail = {};
  try {
    detail = (await response.json()).error ?? {};
  } catch {
    // not the API's JSON (a proxy's page, say): the status line is all there is
  }
  const message = detail.message || `${response.status} ${response.statusText || "error"}`;
  return new ApiError(response.status, detail.code || "http_error", message, detail.field ?? null);
}

/** A JSON call; `key` tries a key that is not stored yet (sign-in). Resolves to the body, null for 204. */
export async function api(path, { method = "GET", body, key, signal } = {}) {
  const headers = authHeaders(key ?? apiKey.get(), body === undefined ? {} : { "Content-Type": "application/json" });
  const response = await send(path, {
    method,
    headers,
    signal,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : response.json();
}

const blobs = new Map(); // path -> blob: URL; what these paths serve never changes (images, name@N's weights)

/** A blob: URL of what `path` serves, fetched once with the key (an <img src> cannot send it). */
export async function blobUrl(path) {
  if (!blobs.has(path)) {
    const response = await send(path, { headers: authHeaders() });
    if (!response.ok) throw await errorOf(response);
    blobs.set(path, URL.createObjectURL(await response.blob()));
  }
  return blobs.get(path);
}

/** Save what `path` serves as `filename`, through the browser's own download. */
export async function download(path, filename) {
  const link = document.createElement("a");
  link.href = await blobUrl(path);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
}

export function forgetBlobs() {
  for (const url of blobs.values()) URL.revokeObjectURL(url);
  blobs.clear();
}

// ---- a job's updates -------------------------------------------------------------------------------

/** Server-Sent Events from a byte stream: yields {type, data, id} per event (the WHATWG parsing rules, less retry). */
export async function* readEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "", data: [], id: null };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // A '\r' at the end may be the first half of '\r\n': keep it until the next chunk says.
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(cut);
      for (const line of lines) {
        if (line === "") {
          if (event.data.length) yield { type: event.type || "message", data: event.data.join("\n"), id: event.id };
          event = { type: "", data: [], id: event.id };
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: keep-alive
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "event") event.type = value;
        else if (name === "data") event.data.push(value);
        else if (name === "id") event.id = value;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * The job after one event: a whole job replaces it; an event's status, progress and error update it. A result waits
 * for the GET /jobs/{id} after the last event: an event carries it as stored, without the links the page follows.
 */
export function mergeEvent(job, event) {
  let data;
  try {
    data = JSON.parse(event.data);
  } catch {
    return job;
  }
  if (!data || typeof data !== "object") return job;
  if (data.id === job.id && "status" in data && "kind" in data) return data;
  const next = { ...job };
  if (data.progress && typeof data.progress === "object") next.progress = data.progress;
  else if (event.type === "progress" || ("step" in data && "total" in data)) next.progress = data;
  if (typeof data.status === "string") next.status = data.status;
  if (data.error !== undefined) next.error = data.error;
  return next;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

let noEvents = false; // this gateway answered 404 or 405 for the stream once: it has none, do not ask again

/** Follow the events stream while it lasts; the job as last seen, or null when the API has no stream to offer. */
async function streamJob(id, onJob, signal) {
  if (noEvents) return null;
  let response;
  try {
    response = await fetch(`/jobs/${id}/events`, {
      headers: authHeaders(apiKey.get(), { Accept: "text/event-stream" }),
      signal,
    });
  } catch {
    return null;
  }
  const type = response.headers.get("content-type") || "";
  if (response.status !== 200 || !type.startsWith("text/event-stream") || !response.body) {
    noEvents = response.status === 404 || response.status === 405;
    response.body?.cancel().catch(() => {});
    return null;
  }
  let job = await api(`/jobs/${id}`, { signal }); // the whole job first: an event may carry only what changed
  onJob(job);
  if (TERMINAL.has(job.status)) {
    response.body.cancel().catch(() => {});
    return job;
  }
  try {
    for await (const event of readEvents(response.body)) {
      job = mergeEvent(job, event);
      if (TERMINAL.has(job.status)) break;
      onJob(job);
    }
  } catch (exc) {
    if (signal.aborted) throw exc;
    // the stream broke off: polling takes over from here
  }
  if (TERMINAL.has(job.status)) {
    job = await api(`/jobs/${id}`, { signal }); // the final job in full (result, summary, links)
    onJob(job);
  }
  return job;
}

/**
 * Watch a job until it ends: onJob(job) at each change, onError(error) when a poll fails (it is retried, except a 401
 * or 404, which end the watch). Returns {stop(), done}; done resolves to the last job seen.
 */
export function watchJob(id, onJob, { onError = () => {}, interval = 1000 } = {}) {
  const controller = new AbortController();
  const { signal } = controller;
  const done = (async () => {
    let job = null;
    try {
      job = await streamJob(id, onJob, signal);
      let wait = interval;
      while (!signal.aborted && !(job && TERMINAL.has(job.status))) {
        try {
          job = await api(`/jobs/${id}`, { signal });
          onJob(job);
          wait = interval;
        } catch (exc) {
          if (signal.aborted) break;
          onError(exc);
          if (exc.status === 401 || exc.status === 404) break;
          wait = Math.min(wait * 2, 10000); // the service is busy or away: back off
        }
        if (!(job && TERMINAL.has(job.status))) await sleep(wait, signal);
      }
    } catch (exc) {
      if (!signal.aborted) onError(exc);
    }
    return job;
  })();
  return { stop: () => controller.abort(), done };
}
