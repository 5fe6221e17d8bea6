// Any manifest section as HTML, whatever its shape: objects as definition lists, lists of records as
// tables, numbers formatted. Sections the job page has no special view for (a structure, parameter
// counts, speed, compatibility, benchmarks) are shown this way as soon as a job's manifest has them.

import { el, formatNumber } from "./common.js";

const MAX_DEPTH = 4;
const MAX_ROWS = 200;

function scalar(value) {
  if (value === null || value === undefined) return el("span", { class: "muted" }, "–");
  if (typeof value === "number") return el("span", { class: "num" }, formatNumber(value, 5));
  if (typeof value === "boolean") return el("span", {}, value ? "yes" : "no");
  return el("span", {}, String(value));
}

const isScalar = (value) => value === null || ["string", "number", "boolean"].includes(typeof value);
const isRecord = (value) => value !== null && typeof value === "object" && !Array.isArray(value);

export function renderValue(value, depth = 0) {
  if (isScalar(value)) return scalar(value);
  if (depth >= MAX_DEPTH) return el("code", {}, JSON.stringify(value));
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "muted" }, "none");
    if (value.every(isScalar)) {
      return el("span", {}, value.slice(0, MAX_ROWS).map((v) => (typeof v === "number" ? formatNumber(v, 5) : String(v))).join(", "));
    }
    if (value.every(isRecord)) {
      const columns = [...new Set(value.flatMap((row) => Object.keys(row)))];
      const rows = value.slice(0, MAX_ROWS).map((row) => el("tr", {}, columns.map((column) => el("td", {}, renderValue(row[column], depth + 1)))));
      const table = el(
        "table",
        { class: "compact" },
        el("thead", {}, el("tr", {}, columns.map((column) => el("th", { scope: "col" }, column.replace(/_/g, " "))))),
        el("tbody", {}, rows),
      );
      const more = value.length > MAX_ROWS ? el("p", { class: "muted" }, `… and ${value.length - MAX_ROWS} more`) : null;
      return el("div", { class: "table-wrap" }, table, more);
    }
    return el("code", {}, JSON.stringify(value));
  }
  const list = el("dl", { class: "kv nested" });
  for (const [key, item] of Object.entries(value).slice(0, MAX_ROWS)) {
    list.append(el("dt", {}, key.replace(/_/g, " ")), el("dd", {}, renderValue(item, depth + 1)));
  }
  return list;
}
