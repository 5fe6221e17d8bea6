// The submit form, generated from the request's JSON schema (served by /ui/options), so fields the
// API gains later (a structure, new options) appear without changing this file. Blank fields are left
// out of the request (the server's defaults apply); the API validates, and its problem+json errors
// are shown next to the field each one names.

import { ApiError, api, el } from "./common.js";

// Shown up front, in this order (when the schema has them); the rest folds away under "Advanced".
const PRIMARY = ["model", "method", "pattern", "sparsity", "structure", "calibration.source", "calibration.samples", "calibration.seqlen"];
// Labels by path, then by key; otherwise the schema's title.
const LABELS = {
  "calibration.source": "Calibration source",
  "calibration.samples": "Calibration samples",
  "calibration.seqlen": "Calibration sequence length",
  seqlen: "Sequence length",
  max_tokens: "Max tokens",
  lam: "Lambda",
  owl: "OWL: outlier-weighted layer sparsity",
  sparsegpt: "SparseGPT",
  dtype: "Output dtype",
};
const HELP = {
  model: "a built-in alias, a model folder this server allows, or a Hugging Face hub id (org/name)",
  pattern: "'unstructured' or N:M such as 2:4",
  sparsity: "fraction of weights set to zero, between 0 and 1",
  "calibration.source": "builtin, self, hf:<dataset>, a text file this server allows, or upload one below",
};

const idOf = (path) => `f-${path.replace(/[^A-Za-z0-9_-]/g, "-")}`;

function resolve(schema, root) {
  if (schema?.$ref) return resolve(root.$defs[schema.$ref.split("/").pop()], root);
  return schema || {};
}

// A nullable schema (anyOf [X, null]) -> [X, true].
function unwrapNullable(schema, root) {
  const options = schema.anyOf || schema.oneOf;
  if (options) {
    const real = options.filter((option) => option.type !== "null");
    if (real.length === 1 && real.length < options.length) {
      const inner = resolve(real[0], root);
      return [{ ...inner, default: schema.default, description: schema.description ?? inner.description, title: schema.title ?? inner.title }, true];
    }
  }
  return [resolve(schema, root), false];
}

function titleOf(node) {
  const { path, key, schema } = node;
  const fromKey = key.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
  // An object's schema title is its class name (CalibrationSpec): the key reads better.
  return LABELS[path] || LABELS[key] || (schema.type === "object" ? fromKey : schema.title || fromKey);
}

// Walk the schema into nodes: {path, key, schema, nullable, required, children?}.
function walk(schema, root, prefix = "", required = []) {
  const nodes = [];
  for (const [key, raw] of Object.entries(schema.properties || {})) {
    const path = prefix ? `${prefix}.${key}` : key;
    const [resolved, nullable] = unwrapNullable(raw, root);
    const merged = { ...resolved, default: raw.default ?? resolved.default, description: raw.description ?? resolved.description };
    if (raw.title && !nullable) merged.title = raw.title;
    const node = { path, key, schema: merged, nullable, required: required.includes(key) };
    if (merged.type === "object" && merged.properties) node.children = walk(merged, root, path, merged.required || []);
    nodes.push(node);
  }
  return nodes;
}

function scalarDefault(schema) {
  const value = schema.default;
  return value === null || value === undefined || typeof value === "object" ? undefined : value;
}

function fieldFor(node, options) {
  const { path, schema } = node;
  const id = idOf(path);
  const describedBy = [];
  const help = HELP[path] || schema.description;
  const helpNode = help ? el("small", { id: `${id}-help`, class: "help" }, help) : null;
  if (helpNode) describedBy.push(helpNode.id);
  const error = el("p", { id: `${id}-error`, class: "field-error", role: "alert", "data-error-for": path });
  describedBy.push(error.id);
  const label = el("label", { for: id }, titleOf(node), node.required ? el("span", { class: "req", "aria-hidden": "true" }, " *") : null);
  const def = scalarDefault(schema);
  let control;
  let kind;
  if (schema.enum) {
    kind = "enum";
    control = el("select", { id, name: path });
    if (!node.required) control.append(el("option", { value: "" }, def !== undefined ? `default (${def})` : "default"));
    for (const value of schema.enum) control.append(el("option", { value }, value));
  } else if (schema.type === "boolean") {
    kind = "boolean";
    control = el("input", { id, name: path, type: "checkbox", checked: Boolean(def) });
    control.dataset.default = String(Boolean(def));
    return el("div", { class: "field check", "data-field": path }, control, label, helpNode, error);
  } else if (schema.type === "integer" || schema.type === "number") {
    kind = schema.type;
    control = el("input", { id, name: path, type: "text", inputmode: schema.type === "integer" ? "numeric" : "decimal", autocomplete: "off" });
    if (def !== undefined) control.placeholder = String(def);
  } else if (schema.type === "array" && schema.items?.enum) {
    kind = "choices";
    const group = el("fieldset", { class: "field choices", "data-field": path, id, "aria-describedby": describedBy.join(" ") });
    group.append(el("legend", {}, titleOf(node)));
    for (const value of schema.items.enum) {
      const boxId = `${id}-${value}`;
      group.append(el("span", { class: "choice" }, el("input", { type: "checkbox", id: boxId, value, "data-choice-of": path }), el("label", { for: boxId }, value)));
    }
    group.append(el("small", { class: "help" }, "none ticked: the server's default"), error);
    group.dataset.kind = kind;
    return group;
  } else if (schema.type === "array") {
    kind = "lines";
    control = el("textarea", { id, name: path, rows: 2, placeholder: "one per line; empty: the server's default" });
  } else if (schema.type === "object") {
    kind = "json";
    control = el("textarea", { id, name: path, rows: 2, placeholder: '{"regex": 0.6}; empty: none' });
  } else {
    kind = "string";
    control = el("input", { id, name: path, type: "text", autocomplete: "off", spellcheck: "false" });
    if (def !== undefined) control.placeholder = String(def);
    const suggestions = path === "model" ? [...options.builtin_models, ...options.local_models] : path.endsWith(".source") ? ["builtin", "self", ...options.text_files] : schema.examples || [];
    if (suggestions.length) {
      const listId = `${id}-list`;
      control.setAttribute("list", listId);
      node.datalist = el("datalist", { id: listId }, suggestions.map((value) => el("option", { value })));
    }
  }
  control.dataset.kind = kind;
  control.setAttribute("aria-describedby", describedBy.join(" "));
  if (node.required) control.setAttribute("aria-required", "true");
  return el("div", { class: "field", "data-field": path }, label, control, node.datalist || null, helpNode, error);
}

function groupFor(node, options) {
  // A nested object: its own fieldset; a nullable one is off unless ticked.
  const id = idOf(node.path);
  const legend = el("legend", {}, titleOf(node));
  const group = el("fieldset", { class: "group", id, "data-group": node.path });
  if (node.nullable) {
    const toggle = el("input", { type: "checkbox", id: `${id}-on`, "data-enables": node.path });
    legend.replaceChildren(toggle, el("label", { for: toggle.id }, ` ${titleOf(node)}`));
    group.classList.add("optional");
    toggle.addEventListener("change", () => group.classList.toggle("enabled", toggle.checked));
  }
  group.append(legend);
  if (node.schema.description) group.append(el("small", { class: "help" }, node.schema.description));
  group.append(el("p", { id: `${id}-error`, class: "field-error", role: "alert", "data-error-for": node.path }));
  for (const child of node.children) group.append(child.children ? groupFor(child, options) : fieldFor(child, options));
  return group;
}

function findNode(nodes, path) {
  for (const node of nodes) {
    if (node.path === path) return node;
    if (node.children && path.startsWith(`${node.path}.`)) return findNode(node.children, path);
  }
  return null;
}

export function buildForm(form, options) {
  const schema = options.request_schema;
  const nodes = walk(schema, schema, "", schema.required || []);
  const primary = form.querySelector("#primary-fields");
  const advanced = form.querySelector("#advanced-fields");
  const placed = new Set();
  for (const path of PRIMARY) {
    const node = findNode(nodes, path);
    if (!node) continue;
    placed.add(path);
    primary.append(node.children ? groupFor(node, options) : fieldFor(node, options));
    if (path === "calibration.source") primary.append(uploadField());
  }
  // Everything not placed above, grouped: top-level scalars first, then one fieldset per object.
  const general = el("fieldset", { class: "group" }, el("legend", {}, "General"));
  const rest = [];
  const addRemaining = (list, container) => {
    for (const node of list) {
      if (placed.has(node.path)) continue;
      if (node.children) {
        const remaining = node.children.filter((child) => !placed.has(child.path));
        if (remaining.length === node.children.length || node.nullable) rest.push(groupFor(node, options));
        else {
          const group = el("fieldset", { class: "group" }, el("legend", {}, titleOf(node)));
          addRemaining(remaining, group);
          rest.push(group);
        }
      } else container.append(fieldFor(node, options));
    }
  };
  addRemaining(nodes, general);
  advanced.append(general, ...rest);
  const model = form.querySelector(`#${idOf("model")}`);
  if (model && options.builtin_models.length) model.value = options.builtin_models[0];
  const sparsity = form.querySelector(`#${idOf("sparsity")}`);
  if (sparsity && !sparsity.value) sparsity.value = "0.5";
  form.nodes = nodes;
}

function uploadField() {
  const id = "f-upload";
  return el(
    "div",
    { class: "field", "data-field": "upload" },
    el("label", { for: id }, "Or upload a calibration file"),
    el("input", { id, type: "file", accept: ".txt,.jsonl,.parquet", "aria-describedby": `${id}-help ${id}-error` }),
    el("small", { id: `${id}-help`, class: "help" }, "sent to /v1/calibration first; the job then uses it as its calibration source"),
    el("p", { id: `${id}-error`, class: "field-error", role: "alert", "data-error-for": "upload" }),
  );
}

class FieldError extends Error {
  constructor(path, message) {
    super(message);
    this.path = path;
  }
}

function setPath(target, path, value) {
  const keys = path.split(".");
  let node = target;
  for (const key of keys.slice(0, -1)) node = node[key] ??= {};
  node[keys[keys.length - 1]] = value;
}

// The request object from the form: only what the user set (or changed from its default).
export function collect(form) {
  const request = {};
  const disabled = [...form.querySelectorAll("[data-enables]")].filter((box) => !box.checked).map((box) => box.dataset.enables);
  for (const box of form.querySelectorAll("[data-enables]")) if (box.checked) setPath(request, box.dataset.enables, {});
  const off = (path) => disabled.some((group) => path === group || path.startsWith(`${group}.`));
  for (const control of form.querySelectorAll("[data-kind]")) {
    const path = control.name || control.dataset.field;
    if (!path || off(path)) continue;
    const kind = control.dataset.kind;
    if (kind === "boolean") {
      if (String(control.checked) !== control.dataset.default) setPath(request, path, control.checked);
      continue;
    }
    if (kind === "choices") {
      const ticked = [...control.querySelectorAll("[data-choice-of]")].filter((box) => box.checked).map((box) => box.value);
      if (ticked.length) setPath(request, path, ticked);
      continue;
    }
    const text = control.value.trim();
    if (!text) continue;
    if (kind === "integer" || kind === "number") {
      const value = Number(text);
      if (!Number.isFinite(value)) throw new FieldError(path, `${text} is not a number`);
      setPath(request, path, value);
    } else if (kind === "lines") {
      setPath(request, path, text.split("\n").map((line) => line.trim()).filter(Boolean));
    } else if (kind === "json") {
      try {
        setPath(request, path, JSON.parse(text));
      } catch {
        throw new FieldError(path, "not valid JSON");
      }
    } else {
      setPath(request, path, text);
    }
  }
  return request;
}

export function clearErrors(form) {
  for (const node of form.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  form.querySelector("#form-error").textContent = "";
}

function errorTarget(form, path) {
  // The deepest field or group the path names (loc ["body", "owl", "threshold"] -> "owl.threshold").
  const parts = path.split(".");
  for (let n = parts.length; n > 0; n -= 1) {
    const candidate = parts.slice(0, n).join(".");
    const box = form.querySelector(`[data-error-for="${CSS.escape(candidate)}"]`);
    if (box) return { box, path: candidate };
  }
  return null;
}

function showFieldError(form, path, message) {
  const target = errorTarget(form, path);
  if (!target) return false;
  target.box.textContent = target.box.textContent ? `${target.box.textContent}; ${message}` : message;
  const control = form.querySelector(`#${CSS.escape(idOf(target.path))}`);
  control?.setAttribute("aria-invalid", "true");
  const folded = target.box.closest("details");
  if (folded) folded.open = true;
  return control || target.box;
}

// Put a problem+json next to the fields it concerns; returns the first element to focus.
export function showProblem(form, problem) {
  let first = null;
  const errors = Array.isArray(problem.errors) ? problem.errors : [];
  for (const error of errors) {
    const loc = (error.loc || []).filter((part) => part !== "body" && !/^\d+$/.test(String(part)));
    const placed = loc.length ? showFieldError(form, loc.join("."), error.msg) : false;
    first ||= placed;
    if (!placed) form.querySelector("#form-error").append(el("span", {}, error.msg, " "));
  }
  if (!errors.length) {
    // Admission errors name their field first: "model 'x': ...", "calibration.source 'y': ...".
    const lead = /^([a-z_]+(?:\.[a-z_]+)*)\b/.exec(problem.detail || "");
    const placed = lead ? showFieldError(form, lead[1], problem.detail) : false;
    first ||= placed;
    if (!placed) form.querySelector("#form-error").textContent = problem.detail || problem.title || "request refused";
  }
  return first;
}

async function uploadCalibration(form) {
  const input = form.querySelector("#f-upload");
  const file = input?.files?.[0];
  if (!file) return null;
  try {
    const upload = await api(`/v1/calibration?filename=${encodeURIComponent(file.name)}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": "application/octet-stream" },
    });
    input.value = "";
    return upload.source;
  } catch (error) {
    if (error instanceof ApiError) throw new FieldError("upload", error.message);
    throw error;
  }
}

export function wireForm(form, onSubmitted) {
  let key = crypto.randomUUID?.() || String(Math.random());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const button = form.querySelector("button[type=submit]");
    const status = form.querySelector("#form-status");
    button.disabled = true;
    status.textContent = "submitting…";
    try {
      const request = collect(form);
      const source = await uploadCalibration(form);
      if (source) {
        request.calibration = { ...(request.calibration || {}), source };
        form.querySelector(`#${idOf("calibration.source")}`).value = source;
      }
      const job = await api("/v1/jobs", { method: "POST", json: request, headers: { "Idempotency-Key": key } });
      key = crypto.randomUUID?.() || String(Math.random());
      status.textContent = `submitted ${job.id}`;
      onSubmitted(job);
    } catch (error) {
      status.textContent = "";
      let focus = null;
      if (error instanceof FieldError) focus = showFieldError(form, error.path, error.message);
      else if (error instanceof ApiError) focus = showProblem(form, error.problem);
      else form.querySelector("#form-error").textContent = String(error);
      if (focus?.focus) focus.focus();
    } finally {
      button.disabled = false;
    }
  });
}
