// Two or more jobs side by side: quality, size, time and memory from their manifests, and their
// per-block output error curves on one chart.

import { api, describeSparsity, el, errorBox, formatBytes, formatNumber, formatSeconds, initChrome } from "./common.js";
import { lineChart } from "./charts.js";

// Manifest sections whose leaves become rows when present (structured and speed results included).
const GENERIC = ["structure", "parameters", "speed", "benchmark", "compatibility"];

function idsFromLocation() {
  const raw = new URLSearchParams(location.search).get("ids") || "";
  return [...new Set(raw.split(/[\s,]+/).filter(Boolean))];
}

async function load(id) {
  const path = `/v1/jobs/${encodeURIComponent(id)}`;
  try {
    const job = await api(path);
    let listing = null;
    if (job.status === "succeeded") {
      try {
        listing = await api(`${path}/artifacts`);
      } catch {
        listing = null; // artifacts gone: the job's own result still compares
      }
    }
    return { id, job, listing, manifest: listing?.manifest || null };
  } catch (error) {
    return { id, error };
  }
}

function leaves(value, prefix, out) {
  if (value === null || value === undefined) return out;
  if (typeof value === "object" && !Array.isArray(value)) {
    for (const [key, item] of Object.entries(value)) leaves(item, `${prefix}.${key}`, out);
  } else if (!Array.isArray(value)) {
    out.set(prefix, value);
  }
  return out;
}

function rowsFor(entries) {
  const ppl = (e) => e.manifest?.perplexity || e.job?.result?.perplexity || null;
  const weightBytes = (e) => {
    if (!e.listing) return null;
    const names = new Set([...(e.manifest.weights?.dense || []), ...(e.manifest.weights?.packed || [])]);
    const files = e.listing.files.filter((f) => names.has(f.name) || names.has(f.name.split("/").pop()));
    return files.length ? files.reduce((sum, f) => sum + f.size, 0) : null;
  };
  const peak = (e) => {
    const rss = e.manifest?.peak_memory?.rss_mb;
    return rss && Object.keys(rss).length ? Math.max(...Object.values(rss)) * 1048576 : null;
  };
  const rows = [
    ["Status", (e) => e.job?.status],
    ["Model", (e) => e.job?.request.model],
    ["Method", (e) => e.job?.request.method],
    ["Pattern", (e) => e.job?.request.pattern || "unstructured"],
    ["Sparsity / structure", (e) => (e.job ? describeSparsity(e.job.request) : null)],
    ["Perplexity before", (e) => formatNumber(ppl(e)?.dense, 5)],
    ["Perplexity after", (e) => formatNumber(ppl(e)?.pruned, 5)],
    ["Perplexity change", (e) => (ppl(e)?.dense ? `${((ppl(e).pruned / ppl(e).dense - 1) * 100).toFixed(2)}%` : null)],
    ["Evaluation", (e) => (ppl(e) ? `${formatNumber(ppl(e).tokens)} tokens, windows of ${ppl(e).seqlen}` : null)],
    ["Achieved sparsity", (e) => formatNumber(e.manifest?.sparsity?.achieved ?? e.job?.result?.sparsity?.achieved, 4)],
    ["Weights size", (e) => (weightBytes(e) === null ? null : formatBytes(weightBytes(e)))],
    ["All files", (e) => (e.listing ? formatBytes(e.listing.files.reduce((sum, f) => sum + f.size, 0)) : null)],
    ["Job time", (e) => (e.manifest?.total_seconds ? formatSeconds(e.manifest.total_seconds) : null)],
    ["Peak memory (RSS)", (e) => (peak(e) === null ? null : formatBytes(peak(e)))],
  ];
  const extra = new Map();
  for (const entry of entries) {
    for (const section of GENERIC) {
      for (const [key, value] of leaves(entry.manifest?.[section], section, new Map())) {
        if (!extra.has(key)) extra.set(key, new Map());
        extra.get(key).set(entry.id, value);
      }
    }
  }
  for (const [key, values] of extra) {
    rows.push([key.replace(/_/g, " "), (e) => (typeof values.get(e.id) === "number" ? formatNumber(values.get(e.id), 5) : values.get(e.id))]);
  }
  return rows;
}

function drawTable(entries) {
  const table = document.getElementById("compare-table");
  table.tHead.replaceChildren(
    el(
      "tr",
      {},
      el("th", { scope: "col" }, "Metric"),
      entries.map((e) => el("th", { scope: "col", dataset: { jobId: e.id } }, el("a", { href: `/ui/jobs/${encodeURIComponent(e.id)}` }, e.id))),
    ),
  );
  table.tBodies[0].replaceChildren(
    ...rowsFor(entries).map(([label, get]) =>
      el(
        "tr",
        {},
        el("th", { scope: "row" }, label),
        entries.map((e) => el("td", {}, e.error ? (label === "Status" ? e.error.message : "") : get(e) ?? "–")),
      ),
    ),
  );
  document.getElementById("compare-section").hidden = false;
}

function drawCurves(entries) {
  const measured = (e) => e.manifest?.blocks?.some((block) => Number.isFinite(block.output_error));
  const series = entries.filter(measured).map((e) => ({
    name: `${e.id} (${e.job.request.method}, ${e.job.request.pattern || "unstructured"}, ${describeSparsity(e.job.request)})`,
    points: e.manifest.blocks.map((block) => [block.index, block.output_error]),
  }));
  const unmeasured = entries.filter((e) => e.manifest && !measured(e)).map((e) => e.id);
  const note = unmeasured.length
    ? el("p", { class: "help", id: "unmeasured" }, `No per-block output error recorded for ${unmeasured.join(", ")} (a method that runs no calibration forwards).`)
    : "";
  if (!series.length) {
    if (unmeasured.length) {
      document.getElementById("compare-chart").replaceChildren(note);
      document.getElementById("curves-section").hidden = false;
    }
    return;
  }
  const chart = lineChart({
    series,
    xLabel: "block",
    yLabel: "relative output error",
    title: `output error per block for ${series.length} jobs`,
    width: 960,
    height: 320,
  });
  chart.dataset.series = String(series.length);
  document.getElementById("compare-chart").replaceChildren(chart, note);
  document.getElementById("curves-section").hidden = false;
}

async function main() {
  initChrome();
  const ids = idsFromLocation();
  const input = document.getElementById("compare-ids");
  input.value = ids.join(", ");
  document.getElementById("compare-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const chosen = input.value.split(/[\s,]+/).filter(Boolean);
    location.search = `?ids=${encodeURIComponent(chosen.join(","))}`;
  });
  if (ids.length < 2) {
    if (ids.length) document.getElementById("compare-error").replaceChildren(errorBox("Give at least two job ids."));
    return;
  }
  const entries = await Promise.all(ids.slice(0, 12).map(load));
  drawTable(entries);
  drawCurves(entries);
}

main();
