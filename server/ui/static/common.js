// Shared by every dashboard page: the bearer token, API calls, the SSE follower, safe DOM building.
// Everything user-supplied reaches the page through textContent or attribute setters, never as HTML.

const TOKEN_KEY = "shears-token";
let askingForToken = null; // one dialog for every request that got a 401

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders(headers = {}) {
  const value = token();
  return value ? { ...headers, Authorization: `Bearer ${value}` } : { ...headers };
}

// el("a", {href: url, class: "x"}, "text", child) -> an element; strings become text nodes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { detail: `${response.status} ${response.statusText}`, code: "http_error" };
  }
}

// fetch with the token; a 401 asks for a token (once for all callers) and retries.
export async function authFetch(path, init = {}) {
  for (;;) {
    const response = await fetch(path, { ...init, headers: authHeaders(init.headers), credentials: "omit" });
    if (response.status !== 401) return response;
    await askToken();
  }
}

// The API's JSON, or an ApiError carrying the problem+json body.
export async function api(path, { method = "GET", json, body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await authFetch(path, init);
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  if (response.status === 204) return null;
  return response.json();
}

function askToken() {
  if (askingForToken) return askingForToken;
  const dialog = document.getElementById("token-dialog");
  const form = document.getElementById("token-form");
  const input = document.getElementById("token-input");
  const error = document.getElementById("token-error");
  document.body.classList.add("needs-token");
  askingForToken = new Promise((resolve) => {
    error.textContent = token() ? "That token was refused; enter another." : "";
    sessionStorage.removeItem(TOKEN_KEY);
    const submit = async (event) => {
      event.preventDefault();
      const candidate = input.value.trim();
      if (!candidate) return;
      const probe = await fetch("/v1/jobs?limit=1", {
        headers: { Authorization: `Bearer ${candidate}` },
        credentials: "omit",
      });
      if (probe.status === 401) {
        error.textContent = "That token was refused; check it and try again.";
        input.select();
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, candidate);
      form.removeEventListener("submit", submit);
      input.value = "";
      dialog.close();
      document.body.classList.remove("needs-token");
      askingForToken = null;
      showSignOut();
      resolve();
    };
    form.addEventListener("submit", submit);
    // Without a token nothing on the page works: Escape does not dismiss the dialog.
    dialog.addEventListener("cancel", (event) => event.preventDefault());
    dialog.showModal();
    input.focus();
  });
  return askingForToken;
}

function showSignOut() {
  const button = document.getElementById("signout");
  if (button) button.hidden = !token();
}

// Follow a job's events over SSE (fetch, so the bearer header goes along), resuming with
// Last-Event-ID after a dropped connection. Returns a function that stops following.
export function followEvents(jobId, { after = 0, onEvent, onEnd, onConnect }) {
  const controller = new AbortController();
  let last = after;
  let stopped = false;
  let retry = 1000;
  const stop = () => {
    stopped = true;
    controller.abort();
  };
  const dispatch = (block) => {
    let name = "message";
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
      else if (field === "retry" && /^\d+$/.test(value)) retry = Number(value);
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (name === "end") {
      stop();
      onEnd?.(payload);
      return;
    }
    if (id !== null && /^\d+$/.test(id)) last = Number(id);
    onEvent?.(payload);
  };
  (async () => {
    let failures = 0;
    while (!stopped) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (last) headers["Last-Event-ID"] = String(last);
        const response = await authFetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
          headers,
          signal: controller.signal,
        });
        if (response.status === 404) {
          stop();
          onEnd?.({ status: "deleted" });
          return;
        }
        if (!response.ok) throw new ApiError(response.status, await problemOf(response));
        onConnect?.();
        failures = 0;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = (buffer + value).replace(/\r\n?/g, "\n");
          let cut;
          while (!stopped && (cut = buffer.indexOf("\n\n")) >= 0) {
            dispatch(buffer.slice(0, cut));
            buffer = buffer.slice(cut + 2);
          }
          if (stopped) return;
        }
      } catch (error) {
        if (stopped || error.name === "AbortError") return;
        failures += 1;
      }
      // The stream ended without `end` (server restart, proxy timeout): resume after the last id.
      await sleep(Math.min(retry * 2 ** Math.min(failures, 3), 5000));
    }
  })();
  return stop;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}` }, status);
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit ? value.toFixed(value < 10 ? 2 : 1) : value} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "–";
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function formatNumber(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return Number(value.toPrecision(digits)).toString();
}

export function formatTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

// Compact, for tables: the time alone for today, else the date without the year.
export function formatShortTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const time = date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  if (date.toDateString() === new Date().toDateString()) return time;
  return `${date.toLocaleDateString(undefined, { month: "short", day: "numeric" })} ${time}`;
}

export function duration(job, now = Date.now()) {
  if (!job.started_at) return null;
  const end = job.finished_at ? Date.parse(job.finished_at) : now;
  return (end - Date.parse(job.started_at)) / 1000;
}

// "2:4", "unstructured", a structure {layers: 0.2, ...} or a sparsity, as one short text.
export function describeSparsity(request) {
  const parts = [];
  if (request.structure && typeof request.structure === "object") {
    const removed = Object.entries(request.structure)
      .filter(([, value]) => typeof value === "number" && value > 0)
      .map(([key, value]) => `${key} ${value}`);
    if (removed.length) parts.push(removed.join(", "));
  }
  if (typeof request.sparsity === "number") parts.push(`${request.sparsity}`);
  return parts.join(" + ") || "–";
}

export function toast(message) {
  const box = document.getElementById("toast");
  if (!box) return;
  box.textContent = message;
  box.classList.add("shown");
  clearTimeout(box.hideTimer);
  box.hideTimer = setTimeout(() => box.classList.remove("shown"), 5000);
}

// A confirmation <dialog>; resolves true when the user confirms.
export function confirmAction(title, text, confirmLabel) {
  const dialog = document.getElementById("confirm-dialog");
  dialog.querySelector("#confirm-title").textContent = title;
  dialog.querySelector("#confirm-text").textContent = text;
  const yes = dialog.querySelector("#confirm-yes");
  yes.textContent = confirmLabel;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
    dialog.querySelector("#confirm-no").focus();
  });
}

// Save a download: a plain link when the server needs no token (the browser streams it to disk),
// otherwise fetched with the bearer header and handed over as a blob.
export async function download(url, filename, { expectedSha256, onStatus } = {}) {
  if (!token()) {
    const link = el("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    onStatus?.("download started");
    return;
  }
  onStatus?.("downloading…");
  const response = await authFetch(url);
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  const blob = await response.blob();
  if (expectedSha256 && globalThis.crypto?.subtle) {
    const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
    const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    if (hex !== expectedSha256) {
      onStatus?.(`checksum mismatch: got ${hex}`);
      throw new Error(`sha256 mismatch for ${filename}`);
    }
    onStatus?.("sha256 verified");
  }
  const href = URL.createObjectURL(blob);
  const link = el("a", { href, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60000);
}

// Wire the header: the forget-token button.
export function initChrome() {
  showSignOut();
  document.getElementById("signout")?.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
}

export function errorBox(error) {
  const text = error instanceof ApiError ? `${error.problem.title || "Error"}: ${error.message}` : String(error);
  return el("p", { class: "error", role: "alert" }, text);
}
