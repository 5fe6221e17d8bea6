// One job: live progress and per-block error from its SSE stream; once it has finished, the
// manifest's numbers (perplexity, per-layer sparsity, memory, and whatever sections it carries).

import {
  ApiError,
  TERMINAL,
  api,
  confirmAction,
  describeSparsity,
  download,
  el,
  errorBox,
  followEvents,
  formatBytes,
  formatNumber,
  formatSeconds,
  formatTime,
  initChrome,
  statusBadge,
  toast,
  token,
} from "./common.js";
import { heatmap, lineChart, timeline } from "./charts.js";
import { renderValue } from "./manifest.js";

const jobId = document.getElementById("job").dataset.jobId;
const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
const state = {
  job: null,
  attempt: null,
  phases: [], // [{name, start, end}] of the current attempt
  errors: new Map(), // block index -> output error (live)
  progress: null,
  manifest: null,
  finished: false,
};
let pending = false;

function scheduleDraw() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    drawLive();
  });
}

function setStatus(status) {
  state.job.status = status;
  const slot = document.getElementById("job-status");
  slot.replaceChildren(statusBadge(status));
  slot.dataset.status = status;
  document.getElementById("cancel-job").hidden = !["queued", "running"].includes(status);
  document.getElementById("delete-job").hidden = !TERMINAL.has(status);
}

function drawSummary(job) {
  const request = job.request || {};
  const parts = [
    ["model", request.model],
    ["method", request.method],
    ["pattern", request.pattern || "unstructured"],
    ["sparsity", describeSparsity(request)],
    ["created", formatTime(job.created_at)],
    ["attempt", `${job.attempt} of ${job.max_attempts}`],
  ];
  const summary = document.getElementById("job-summary");
  summary.replaceChildren(...parts.flatMap(([key, value]) => [el("span", { class: "muted" }, `${key} `), el("strong", {}, value ?? "–"), " "]));
  document.getElementById("request-json").textContent = JSON.stringify(request, null, 2);
  const errorSlot = document.getElementById("job-error");
  errorSlot.replaceChildren(job.error ? el("p", { class: "error", role: "alert" }, `${job.error.code}: ${job.error.message}`) : "");
}

function drawProgress() {
  const bar = document.getElementById("job-progress");
  const label = document.getElementById("progress-label");
  const text = document.getElementById("progress-text");
  const status = state.job.status;
  const p = state.progress;
  if (status === "succeeded") {
    bar.value = 1;
    label.textContent = "finished";
    text.textContent = "100%";
  } else if (TERMINAL.has(status)) {
    bar.value = p ? p.done / p.total : 0;
    label.textContent = status;
    text.textContent = "";
  } else if (p) {
    bar.value = p.done / p.total;
    label.textContent = `${p.phase}: ${p.message || `${p.done}/${p.total}`}`;
    const phase = state.phases[state.phases.length - 1];
    let eta = "";
    if (phase && p.done > 0 && p.done < p.total) {
      const elapsed = (p.time - phase.start) / 1000;
      eta = ` · about ${formatSeconds((elapsed / p.done) * (p.total - p.done))} left in this phase`;
    }
    text.textContent = `${Math.round((p.done / p.total) * 100)}%${eta}`;
  } else {
    if (status === "running") bar.removeAttribute("value");
    else bar.value = 0;
    label.textContent = status === "queued" ? "queued" : state.job.phase || status;
    text.textContent = "";
  }
}

function drawTimeline() {
  const phases = state.phases.map((phase, index) => ({
    name: phase.name,
    start: phase.start,
    end: phase.end ?? state.phases[index + 1]?.start ?? (state.finished ? phase.start : Date.now()),
  }));
  document.getElementById("timeline").replaceChildren(timeline(phases));
  const list = document.getElementById("phase-list");
  list.replaceChildren(
    ...phases.map((phase) =>
      el(
        "li",
        { dataset: { phase: phase.name } },
        el("strong", {}, phase.name),
        ` started ${new Date(phase.start).toLocaleTimeString()}, `,
        formatSeconds((phase.end - phase.start) / 1000),
      ),
    ),
  );
}

function drawErrorChart() {
  const points = [...state.errors.entries()].sort((a, b) => a[0] - b[0]);
  if (state.finished && points.length && !points.some(([, y]) => Number.isFinite(y))) {
    const text = "Not measured: this job's method runs no calibration forwards.";
    document.getElementById("error-chart").replaceChildren(el("p", { class: "muted", id: "no-error" }, text));
    return;
  }
  const chart = lineChart({
    series: [{ name: "", points }],
    xLabel: "block",
    yLabel: "relative output error",
    title: `output error per block: ${points.length} block${points.length === 1 ? "" : "s"}`,
  });
  chart.dataset.points = String(points.length);
  document.getElementById("error-chart").replaceChildren(chart);
}

function drawLive() {
  drawProgress();
  drawTimeline();
  drawErrorChart();
}

function logEvent(event) {
  const row = el(
    "tr",
    { dataset: { kind: event.kind } },
    el("td", { class: "num" }, event.id),
    el("td", {}, new Date(event.time).toLocaleTimeString()),
    el("td", {}, event.kind),
    el("td", {}, event.phase || ""),
    el("td", {}, event.message),
  );
  const body = document.querySelector("#event-log tbody");
  const wrap = body.closest(".table-wrap");
  const atBottom = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 8;
  body.append(row);
  if (atBottom) wrap.scrollTop = wrap.scrollHeight;
}

function onEvent(event) {
  logEvent(event);
  const time = Date.parse(event.time);
  if (event.attempt && event.attempt !== state.attempt && event.kind !== "state") {
    if (state.attempt !== null) {
      state.phases = [];
      state.errors.clear();
    }
    state.attempt = event.attempt;
  }
  if (event.kind === "state" && event.data?.status) {
    setStatus(event.data.status);
    if (TERMINAL.has(event.data.status)) {
      const last = state.phases[state.phases.length - 1];
      if (last && last.end === undefined) last.end = time;
    }
  } else if (event.kind === "phase") {
    const last = state.phases[state.phases.length - 1];
    if (last && last.end === undefined) last.end = time;
    state.phases.push({ name: event.phase, start: time });
    state.job.phase = event.phase;
    state.progress = null;
  } else if (event.kind === "progress" && event.total) {
    state.progress = { phase: event.phase, done: event.done, total: event.total, message: event.message, time };
    if (event.phase === "pruning" && event.data && "output_error" in event.data) {
      state.errors.set(event.done - 1, event.data.output_error);
    }
  } else if (event.kind === "result" && event.data?.perplexity) {
    drawPerplexity(event.data.perplexity);
  }
  scheduleDraw();
}

function kv(list, term, ...value) {
  list.append(el("dt", {}, term), el("dd", {}, ...value));
}

function drawPerplexity(ppl) {
  const list = document.getElementById("results");
  list.replaceChildren();
  if (!ppl) {
    kv(list, "Perplexity", "not evaluated");
    return;
  }
  const change = ppl.dense ? (ppl.pruned / ppl.dense - 1) * 100 : null;
  kv(list, "Perplexity before", el("span", { id: "ppl-dense", class: "big" }, formatNumber(ppl.dense, 5)));
  kv(
    list,
    "Perplexity after",
    el("span", { id: "ppl-pruned", class: "big" }, formatNumber(ppl.pruned, 5)),
    change === null ? "" : el("span", { class: "muted" }, ` (${change >= 0 ? "+" : ""}${change.toFixed(2)}%)`),
  );
  kv(list, "Window length", el("span", { id: "ppl-seqlen" }, `${formatNumber(ppl.seqlen)} tokens`));
  kv(list, "Tokens evaluated", el("span", { id: "ppl-tokens" }, formatNumber(ppl.tokens)), ppl.windows ? ` in ${ppl.windows} windows` : "");
}

function drawResults(manifest) {
  drawPerplexity(manifest.perplexity);
  const list = document.getElementById("results");
  const sparsity = manifest.sparsity;
  if (sparsity) {
    kv(
      list,
      "Sparsity",
      el("span", { id: "achieved-sparsity" }, formatNumber(sparsity.achieved, 4)),
      ` of ${formatNumber(sparsity.pruned_layers)} pruned layers (target ${formatNumber(sparsity.target)}); ${formatNumber(sparsity.of_all_parameters, 3)} of all parameters`,
    );
  }
  const memory = manifest.peak_memory || {};
  for (const [key, label] of [["rss_mb", "Peak memory (RSS)"], ["cuda_mb", "Peak GPU memory"]]) {
    const phases = memory[key] || {};
    const entries = Object.entries(phases);
    if (!entries.length) continue;
    const [phase, mb] = entries.reduce((best, item) => (item[1] > best[1] ? item : best));
    kv(list, label, el("span", { id: `peak-${key}` }, formatBytes(mb * 1048576)), el("span", { class: "muted" }, ` during ${phase}`));
  }
  if (manifest.total_seconds) kv(list, "Job time", formatSeconds(manifest.total_seconds));
  const model = manifest.model;
  if (model) {
    kv(list, "Model", `${model.architecture || ""} · ${model.num_blocks ?? "?"} blocks · computed in ${model.compute_dtype || "?"} on ${model.device || "?"}`);
  }
}

// Blocks along x, layer kinds along y, from manifest.layers ("<prefix>.<block>.<kind>").
function layerGrid(manifest) {
  const prefix = `${manifest.model?.blocks_prefix || ""}.`;
  const cells = new Map();
  const blocks = new Set();
  const kinds = [];
  const others = [];
  for (const [name, layer] of Object.entries(manifest.layers || {})) {
    const match = name.startsWith(prefix) ? /^(\d+)\.(.+)$/.exec(name.slice(prefix.length)) : null;
    if (!match) {
      others.push([name, layer]);
      continue;
    }
    const [block, kind] = [Number(match[1]), match[2]];
    blocks.add(block);
    if (!kinds.includes(kind)) kinds.push(kind);
    cells.set(`${block}|${kind}`, layer);
  }
  return { cells, blocks: [...blocks].sort((a, b) => a - b), kinds, others };
}

function drawHeatmap(manifest) {
  const grid = layerGrid(manifest);
  const section = document.getElementById("heatmap-section");
  if (!grid.kinds.length) return;
  section.hidden = false;
  const metric = document.getElementById("heatmap-metric").value;
  const values = [...grid.cells.values()].map((layer) => layer[metric]).filter((v) => typeof v === "number");
  const max = metric === "sparsity" ? 1 : Math.max(...values, 1e-12);
  const figure = heatmap({
    columns: grid.blocks,
    rows: grid.kinds,
    value: (kind, block) => grid.cells.get(`${block}|${kind}`)?.[metric] ?? null,
    min: 0,
    max,
    columnLabel: "block",
    rowLabel: "layer kind",
    title: `${metric === "sparsity" ? "achieved sparsity" : "relative layer error"}: ${grid.blocks.length} blocks by ${grid.kinds.length} layer kinds`,
    format: (v) => formatNumber(v, 3),
  });
  const notes = grid.others.length
    ? el("p", { class: "help" }, "Outside the blocks: ", grid.others.map(([name, layer]) => `${name} ${formatNumber(layer[metric], 3)}`).join(", "))
    : null;
  document.getElementById("heatmap").replaceChildren(figure, notes || "");
}

const SHOWN = new Set(["format", "request", "layers", "blocks", "perplexity", "sparsity", "peak_memory", "files", "total_seconds"]);

function drawExtra(manifest) {
  const sections = Object.entries(manifest).filter(([key, value]) => !SHOWN.has(key) && value !== null && value !== undefined);
  if (!sections.length) return;
  document.getElementById("extra-section").hidden = false;
  document.getElementById("extra").replaceChildren(
    ...sections.map(([key, value]) =>
      el(
        "details",
        { class: "manifest-section", open: ["structure", "parameters", "speed", "compatibility"].includes(key), dataset: { section: key } },
        el("summary", {}, key.replace(/_/g, " ")),
        renderValue(value),
      ),
    ),
  );
}

function drawArtifacts(listing) {
  document.getElementById("artifacts-section").hidden = false;
  const body = document.querySelector("#artifacts tbody");
  const status = document.getElementById("download-status");
  body.replaceChildren(
    ...listing.files.map((file) => {
      const link = el("a", { href: file.url, download: file.name.split("/").pop(), class: "button" }, "Download");
      link.setAttribute("aria-label", `download ${file.name}`);
      link.addEventListener("click", (event) => {
        if (!token()) return; // the browser downloads the plain link itself
        event.preventDefault();
        download(file.url, file.name.split("/").pop(), { expectedSha256: file.sha256, onStatus: (text) => (status.textContent = `${file.name}: ${text}`) }).catch(
          (error) => (status.textContent = `${file.name}: ${error.message}`),
        );
      });
      return el(
        "tr",
        { dataset: { name: file.name } },
        el("th", { scope: "row" }, el("code", {}, file.name)),
        el("td", { class: "num", title: `${file.size} bytes` }, formatBytes(file.size)),
        el("td", {}, el("code", { class: "sha" }, file.sha256)),
        el("td", {}, link),
      );
    }),
  );
  const all = document.getElementById("download-all");
  all.onclick = () =>
    download(listing.archive, `${jobId}.tar`, { onStatus: (text) => (status.textContent = `archive: ${text}`) }).catch(
      (error) => (status.textContent = `archive: ${error.message}`),
    );
}

async function finish() {
  state.finished = true;
  let job;
  try {
    job = await api(base);
  } catch (error) {
    document.getElementById("job-error").replaceChildren(errorBox(error));
    return;
  }
  state.job = job;
  setStatus(job.status);
  drawSummary(job);
  scheduleDraw();
  if (job.status !== "succeeded") {
    if (job.result?.perplexity) drawPerplexity(job.result.perplexity);
    return;
  }
  try {
    const listing = await api(`${base}/artifacts`);
    state.manifest = listing.manifest;
    if (listing.manifest.blocks?.length) {
      state.errors = new Map(listing.manifest.blocks.map((block) => [block.index, block.output_error]));
    }
    drawResults(listing.manifest);
    drawHeatmap(listing.manifest);
    drawExtra(listing.manifest);
    drawArtifacts(listing);
    scheduleDraw();
  } catch (error) {
    const text = error instanceof ApiError && error.status === 410 ? "The artifacts are no longer on the server." : null;
    document.getElementById("job-error").replaceChildren(text ? el("p", { class: "muted" }, text) : errorBox(error));
    if (job.result?.perplexity) drawPerplexity(job.result.perplexity);
  }
}

async function main() {
  initChrome();
  try {
    state.job = await api(base);
  } catch (error) {
    document.getElementById("job-error").replaceChildren(errorBox(error));
    return;
  }
  setStatus(state.job.status);
  drawSummary(state.job);
  drawLive();
  followEvents(jobId, { onEvent, onEnd: finish });
  document.getElementById("heatmap-metric").addEventListener("change", () => state.manifest && drawHeatmap(state.manifest));
  document.getElementById("cancel-job").addEventListener("click", async () => {
    if (!(await confirmAction("Cancel this job?", `Job ${jobId} stops at the next block boundary; its partial output is discarded.`, "Cancel job"))) return;
    try {
      const job = await api(`${base}/cancel`, { method: "POST" });
      setStatus(job.status);
      toast(`Cancelling ${jobId}`);
    } catch (error) {
      toast(error.message);
    }
  });
  document.getElementById("delete-job").addEventListener("click", async () => {
    if (!(await confirmAction("Delete this job?", `Job ${jobId}, its events and all its artifacts are removed for good.`, "Delete job"))) return;
    try {
      await api(base, { method: "DELETE" });
      location.href = "/ui";
    } catch (error) {
      toast(error.message);
    }
  });
  // Running phases grow on screen between events.
  setInterval(() => {
    if (!state.finished && state.job.status === "running") drawTimeline();
  }, 1000);
}

main();
