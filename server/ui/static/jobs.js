// The jobs page: a table kept live by the jobs' SSE streams (a few at a time, for the active jobs),
// re-listed when a job changes state or every so often while the tab is visible; and the submit form.

import {
  TERMINAL,
  api,
  describeSparsity,
  duration,
  el,
  errorBox,
  followEvents,
  formatSeconds,
  formatShortTime,
  formatTime,
  initChrome,
  statusBadge,
  toast,
} from "./common.js";
import { buildForm, wireForm } from "./form.js";

const MAX_STREAMS = 4; // browsers allow 6 connections per host over HTTP/1.1: keep two for the API
const REFRESH_MS = 10000;
const PAGE = 50;

const tbody = document.querySelector("#jobs-table tbody");
const filter = document.getElementById("status-filter");
const compareButton = document.getElementById("compare-selected");
const liveState = document.getElementById("live-state");
const rows = new Map(); // job id -> {job, tr, cells}
const streams = new Map(); // job id -> stop()
let shown = PAGE;
let nextCursor = null;
let refreshTimer = null;
let dirty = new Set();

function progressCell(job) {
  const bar = el("progress", { max: 1, "aria-label": `progress of ${job.id}` });
  const text = el("span", { class: "progress-text" });
  return { node: el("div", { class: "progress-cell" }, bar, text), bar, text };
}

function makeRow(job) {
  const select = el("input", { type: "checkbox", "aria-label": `select ${job.id} for comparison` });
  select.addEventListener("change", updateCompareButton);
  const progress = progressCell(job);
  const cells = {
    select,
    status: el("td"),
    phase: el("td"),
    progress,
    model: el("td", { class: "model" }),
    method: el("td"),
    pattern: el("td"),
    sparsity: el("td"),
    created: el("td"),
    duration: el("td", { class: "num" }),
  };
  const link = el("a", { href: `/ui/jobs/${encodeURIComponent(job.id)}` }, job.id);
  const tr = el(
    "tr",
    { dataset: { jobId: job.id } },
    el("td", {}, select),
    el("th", { scope: "row" }, link),
    cells.status,
    cells.phase,
    el("td", {}, progress.node),
    cells.model,
    cells.method,
    cells.pattern,
    cells.sparsity,
    cells.created,
    cells.duration,
  );
  return { job, tr, cells };
}

function render(row) {
  const { job, cells } = row;
  const request = job.request || {};
  cells.status.replaceChildren(statusBadge(job.status));
  cells.status.dataset.status = job.status;
  // A finished job's last phase says little ("verifying"); a failed one's says where it stopped.
  cells.phase.textContent = job.status === "succeeded" ? "done" : job.phase || (job.status === "queued" ? "waiting" : "–");
  const bar = cells.progress.bar;
  let fraction = null;
  if (job.status === "succeeded") fraction = 1;
  else if (job.progress) fraction = job.progress.fraction;
  if (fraction === null) {
    if (job.status === "running") bar.removeAttribute("value"); // indeterminate while a phase has no counts
    else bar.value = 0;
    cells.progress.text.textContent = "";
  } else {
    bar.value = fraction;
    const counts = job.progress && job.status !== "succeeded" ? ` (${job.progress.done}/${job.progress.total})` : "";
    cells.progress.text.textContent = `${Math.round(fraction * 100)}%${counts}`;
  }
  cells.model.textContent = request.model || "–";
  cells.model.title = request.model || "";
  cells.method.textContent = request.method || "–";
  cells.pattern.textContent = request.pattern || "unstructured";
  cells.sparsity.textContent = describeSparsity(request);
  cells.created.textContent = formatShortTime(job.created_at);
  cells.created.title = formatTime(job.created_at);
  cells.duration.textContent = formatSeconds(duration(job));
  cells.select.disabled = job.status !== "succeeded";
  if (cells.select.disabled) cells.select.checked = false;
}

function scheduleRender(row) {
  dirty.add(row);
  if (dirty.size > 1) return;
  requestAnimationFrame(() => {
    const batch = dirty;
    dirty = new Set();
    for (const item of batch) render(item);
    updateCompareButton();
  });
}

function updateCompareButton() {
  const chosen = [...rows.values()].filter((row) => row.cells.select.checked).map((row) => row.job.id);
  compareButton.disabled = chosen.length < 2;
  compareButton.dataset.ids = chosen.join(",");
}

function applyEvent(row, event) {
  const job = row.job;
  if (event.kind === "state" && event.data?.status) {
    job.status = event.data.status;
    if (job.status === "running" && !job.started_at) job.started_at = event.time;
    if (TERMINAL.has(job.status)) {
      job.finished_at ||= event.time;
      job.progress = null;
      scheduleRefresh(300);
    }
  } else if (event.kind === "phase") {
    job.phase = event.phase;
    job.progress = null;
  } else if (event.kind === "progress" && event.total) {
    job.phase = event.phase || job.phase;
    job.progress = { done: event.done, total: event.total, fraction: event.done / event.total };
  }
  scheduleRender(row);
}

function reconcileStreams() {
  const active = [...rows.values()]
    .filter((row) => !TERMINAL.has(row.job.status))
    .sort((a, b) => {
      const rank = (row) => (row.job.status === "queued" ? 1 : 0); // running first, then the queue's head
      return rank(a) - rank(b) || a.job.created_at.localeCompare(b.job.created_at);
    })
    .slice(0, MAX_STREAMS)
    .map((row) => row.job.id);
  for (const [id, stop] of streams) {
    if (!active.includes(id)) {
      stop();
      streams.delete(id);
    }
  }
  for (const id of active) {
    if (streams.has(id)) continue;
    const stop = followEvents(id, {
      onEvent: (event) => {
        const row = rows.get(id);
        if (row) applyEvent(row, event);
      },
      onEnd: () => {
        streams.delete(id);
        scheduleRefresh(200);
      },
    });
    streams.set(id, stop);
  }
  liveState.textContent = streams.size ? `live: following ${streams.size} active job${streams.size > 1 ? "s" : ""}` : "";
}

let refreshing = false;

async function refresh() {
  if (refreshing) return scheduleRefresh(500); // one listing in flight at a time (e.g. behind the token dialog)
  refreshing = true;
  try {
    await listJobs();
  } finally {
    refreshing = false;
  }
}

async function listJobs() {
  const params = new URLSearchParams({ limit: String(Math.min(shown, 200)) });
  if (filter.value) params.set("status", filter.value);
  const errorSlot = document.getElementById("jobs-error");
  let page;
  try {
    page = await api(`/v1/jobs?${params}`);
  } catch (error) {
    errorSlot.replaceChildren(errorBox(error));
    return;
  }
  errorSlot.replaceChildren();
  nextCursor = page.next_cursor;
  const seen = new Set();
  const ordered = [];
  for (const job of page.jobs) {
    seen.add(job.id);
    let row = rows.get(job.id);
    if (row) row.job = job;
    else {
      row = makeRow(job);
      rows.set(job.id, row);
    }
    render(row);
    ordered.push(row.tr);
  }
  for (const [id, row] of rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
  const current = [...tbody.children];
  if (current.length !== ordered.length || current.some((tr, i) => tr !== ordered[i])) tbody.replaceChildren(...ordered);
  document.getElementById("jobs-empty").hidden = rows.size > 0;
  document.getElementById("load-more").hidden = !nextCursor || shown >= 200; // the API's page limit
  updateCompareButton();
  reconcileStreams();
}

function scheduleRefresh(delay) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, delay);
}

function addSubmitted(job) {
  if (filter.value && filter.value !== job.status) filter.value = "";
  const row = rows.get(job.id) || makeRow(job);
  rows.set(job.id, row);
  render(row);
  tbody.prepend(row.tr);
  document.getElementById("jobs-empty").hidden = true;
  reconcileStreams();
  toast(`Job ${job.id} submitted`);
}

async function initForm() {
  const form = document.getElementById("job-form");
  try {
    const options = await api("/ui/options");
    buildForm(form, options);
    wireForm(form, addSubmitted);
  } catch (error) {
    form.replaceChildren(errorBox(error));
  }
}

initChrome();
filter.addEventListener("change", () => {
  shown = PAGE;
  refresh();
});
document.getElementById("load-more").addEventListener("click", () => {
  shown += PAGE;
  refresh();
});
compareButton.addEventListener("click", () => {
  location.href = `/ui/compare?ids=${encodeURIComponent(compareButton.dataset.ids)}`;
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") scheduleRefresh(0);
});
setInterval(() => {
  if (document.visibilityState === "visible") refresh();
}, REFRESH_MS);
setInterval(() => {
  for (const row of rows.values()) if (row.job.status === "running") row.cells.duration.textContent = formatSeconds(duration(row.job));
}, 1000);
await refresh();
if (!rows.size && !filter.value) document.getElementById("new-job").open = true;
await initForm();
