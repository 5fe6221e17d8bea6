// Charts as SVG built with DOM calls (no library, no innerHTML): line charts, a heatmap, a timeline.
// Colours: the Okabe-Ito palette for series and phases, viridis for the heatmap (both colour-blind
// safe); series also differ by marker shape and dash, and every chart has a text equivalent.

const SVG = "http://www.w3.org/2000/svg";
export const PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];
const LIGHT = new Set([1, 4, 6]); // palette entries that need dark text on them
const DASHES = ["", "6 3", "2 3", "8 3 2 3"];
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function niceStep(span, count) {
  const raw = span / Math.max(count, 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const unit = raw / power;
  return (unit <= 1 ? 1 : unit <= 2 ? 2 : unit <= 5 ? 5 : 10) * power;
}

function linearTicks(min, max, count = 5) {
  if (min === max) return [min];
  const step = niceStep(max - min, count);
  const ticks = [];
  for (let value = Math.ceil(min / step) * step; value <= max + step * 1e-9; value += step) {
    ticks.push(Number(value.toPrecision(12)));
  }
  return ticks;
}

function tickLabel(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1e4 || magnitude < 1e-3) return value.toExponential(0);
  return Number(value.toPrecision(3)).toString();
}

function marker(shape, x, y, color) {
  const size = 3.5;
  if (shape === 1) return svg("rect", { x: x - size, y: y - size, width: size * 2, height: size * 2, fill: color });
  if (shape === 2) {
    return svg("polygon", { points: `${x},${y - size - 1} ${x - size - 1},${y + size} ${x + size + 1},${y + size}`, fill: color });
  }
  if (shape === 3) {
    return svg("polygon", { points: `${x},${y - size - 1} ${x + size + 1},${y} ${x},${y + size + 1} ${x - size - 1},${y}`, fill: color });
  }
  return svg("circle", { cx: x, cy: y, r: size, fill: color });
}

// series: [{name, points: [[x, y], ...]}]; y null values are skipped. Returns a <figure>.
export function lineChart({ series, xLabel, yLabel, title, log = "auto", xInteger = true, width = 640, height = 260 }) {
  const margin = { left: 62, right: 16, top: 12, bottom: 40 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const all = series.flatMap((s) => s.points.filter(([, y]) => y !== null && y !== undefined && Number.isFinite(y)));
  const figure = document.createElement("figure");
  figure.className = "chart";
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || yLabel || "chart" });
  root.style.maxWidth = `${width * 1.25}px`; // about natural size on a wide card; shrinks on narrow ones
  figure.append(root);
  if (!all.length) {
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" }, "no data yet"));
    return figure;
  }
  const xs = all.map(([x]) => x);
  const ys = all.map(([, y]) => y);
  let [xMin, xMax] = [Math.min(...xs), Math.max(...xs)];
  if (xMin === xMax) [xMin, xMax] = [xMin - 1, xMax + 1];
  const positive = ys.every((y) => y > 0);
  const useLog = log === true || (log === "auto" && positive && Math.max(...ys) / Math.min(...ys) > 20);
  let yMin;
  let yMax;
  let yTicks;
  let toY;
  if (useLog) {
    yMin = 10 ** Math.floor(Math.log10(Math.min(...ys)));
    yMax = 10 ** Math.ceil(Math.log10(Math.max(...ys)));
    yTicks = [];
    for (let t = yMin; t <= yMax * 1.0001; t *= 10) yTicks.push(t);
    toY = (y) => margin.top + plotH - ((Math.log10(y) - Math.log10(yMin)) / (Math.log10(yMax) - Math.log10(yMin))) * plotH;
  } else {
    yMin = Math.min(0, ...ys);
    yMax = Math.max(...ys);
    if (yMax === yMin) yMax = yMin + 1;
    const step = niceStep(yMax - yMin, 5);
    yMax = Math.ceil(yMax / step - 1e-9) * step; // end the axis on a tick
    yTicks = linearTicks(yMin, yMax);
    toY = (y) => margin.top + plotH - ((y - yMin) / (yMax - yMin)) * plotH;
  }
  const toX = (x) => margin.left + ((x - xMin) / (xMax - xMin)) * plotW;
  const axes = svg("g", { class: "axes" });
  for (const tick of yTicks) {
    const y = toY(tick);
    axes.append(
      svg("line", { x1: margin.left, x2: margin.left + plotW, y1: y, y2: y, class: "grid" }),
      svg("text", { x: margin.left - 6, y: y + 4, "text-anchor": "end" }, tickLabel(tick)),
    );
  }
  let xTicks = linearTicks(xMin, xMax, 8);
  if (xInteger) xTicks = xTicks.filter((t) => Number.isInteger(t));
  for (const tick of xTicks) {
    const x = toX(tick);
    axes.append(
      svg("line", { x1: x, x2: x, y1: margin.top + plotH, y2: margin.top + plotH + 4, class: "tick" }),
      svg("text", { x, y: margin.top + plotH + 16, "text-anchor": "middle" }, tickLabel(tick)),
    );
  }
  axes.append(
    svg("line", { x1: margin.left, x2: margin.left + plotW, y1: margin.top + plotH, y2: margin.top + plotH, class: "axis" }),
    svg("line", { x1: margin.left, x2: margin.left, y1: margin.top, y2: margin.top + plotH, class: "axis" }),
    svg("text", { x: margin.left + plotW / 2, y: height - 6, "text-anchor": "middle", class: "label" }, xLabel || ""),
    svg(
      "text",
      { x: 14, y: margin.top + plotH / 2, "text-anchor": "middle", class: "label", transform: `rotate(-90 14 ${margin.top + plotH / 2})` },
      `${yLabel || ""}${useLog ? " (log)" : ""}`,
    ),
  );
  root.append(axes);
  series.forEach((s, index) => {
    const color = s.color || PALETTE[index % PALETTE.length];
    const points = s.points.filter(([, y]) => y !== null && y !== undefined && Number.isFinite(y) && (!useLog || y > 0));
    const group = svg("g", { class: "series", "data-series": s.name });
    if (points.length > 1) {
      group.append(
        svg("polyline", {
          points: points.map(([x, y]) => `${toX(x).toFixed(1)},${toY(y).toFixed(1)}`).join(" "),
          fill: "none",
          stroke: color,
          "stroke-width": 2,
          "stroke-dasharray": DASHES[index % DASHES.length] || null,
        }),
      );
    }
    for (const [x, y] of points) {
      const dot = marker(index % 4, toX(x), toY(y), color);
      dot.classList.add("point");
      dot.append(svg("title", {}, `${s.name ? `${s.name}: ` : ""}${xLabel || "x"} ${x}, ${yLabel || "y"} ${tickLabel(y)}`));
      group.append(dot);
    }
    root.append(group);
  });
  if (series.length > 1 || series[0]?.name) {
    const legend = document.createElement("ul");
    legend.className = "legend";
    series.forEach((s, index) => {
      const swatch = svg("svg", { viewBox: "0 0 28 10", width: 28, height: 10, "aria-hidden": "true" });
      const color = s.color || PALETTE[index % PALETTE.length];
      swatch.append(
        svg("line", { x1: 0, x2: 28, y1: 5, y2: 5, stroke: color, "stroke-width": 2, "stroke-dasharray": DASHES[index % DASHES.length] || null }),
        marker(index % 4, 14, 5, color),
      );
      const item = document.createElement("li");
      item.append(swatch, document.createTextNode(` ${s.name}`));
      legend.append(item);
    });
    figure.append(legend);
  }
  return figure;
}

export function viridis(t) {
  const clamped = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0));
  const position = clamped * (VIRIDIS.length - 1);
  const low = Math.floor(position);
  const high = Math.min(low + 1, VIRIDIS.length - 1);
  const mix = position - low;
  const channel = (hex, i) => parseInt(hex.slice(1 + 2 * i, 3 + 2 * i), 16);
  const rgb = [0, 1, 2].map((i) => Math.round(channel(VIRIDIS[low], i) * (1 - mix) + channel(VIRIDIS[high], i) * mix));
  return `rgb(${rgb.join(",")})`;
}

// columns along x (blocks), rows along y (layer kinds); value(row, column) -> number or null.
export function heatmap({ columns, rows, value, min = 0, max = 1, title, format = (v) => v.toFixed(3), columnLabel, rowLabel }) {
  const cell = Math.max(8, Math.min(28, Math.floor(560 / Math.max(columns.length, 1))));
  const labelW = Math.min(180, 8 + 7 * Math.max(...rows.map((r) => String(r).length), 4));
  const width = labelW + cell * columns.length + 12;
  const height = 18 + cell * rows.length + 34;
  const figure = document.createElement("figure");
  figure.className = "chart heatmap";
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || "heatmap" });
  root.style.maxWidth = `${width}px`; // natural size; shrinks on narrow screens
  const span = max - min || 1;
  rows.forEach((row, r) => {
    root.append(svg("text", { x: labelW - 6, y: 18 + r * cell + cell / 2 + 4, "text-anchor": "end", class: "tick-label" }, row));
    columns.forEach((column, c) => {
      const v = value(row, column);
      const rect = svg("rect", {
        x: labelW + c * cell,
        y: 18 + r * cell,
        width: cell - 1,
        height: cell - 1,
        fill: v === null || v === undefined ? "#d0d0d0" : viridis((v - min) / span),
        class: "cell",
        "data-row": row,
        "data-column": column,
        "data-value": v ?? "",
      });
      rect.append(svg("title", {}, `${columnLabel || "column"} ${column}, ${row}: ${v === null || v === undefined ? "not pruned" : format(v)}`));
      root.append(rect);
    });
  });
  const every = Math.ceil(columns.length / Math.max(1, Math.floor((cell * columns.length) / 28)));
  columns.forEach((column, c) => {
    if (c % every === 0) {
      root.append(svg("text", { x: labelW + c * cell + cell / 2, y: 12, "text-anchor": "middle", class: "tick-label" }, column));
    }
  });
  root.append(
    svg("text", { x: labelW + (cell * columns.length) / 2, y: height - 2, "text-anchor": "middle", class: "label" }, columnLabel || ""),
  );
  // Colour scale: a gradient with its ends labelled.
  const gradientId = `g${Math.random().toString(36).slice(2)}`;
  const gradient = svg("linearGradient", { id: gradientId });
  VIRIDIS.forEach((color, i) => gradient.append(svg("stop", { offset: `${(i / (VIRIDIS.length - 1)) * 100}%`, "stop-color": color })));
  root.append(svg("defs", {}, gradient));
  const barY = 18 + cell * rows.length + 6;
  const barW = Math.min(160, cell * columns.length);
  root.append(
    svg("rect", { x: labelW, y: barY, width: barW, height: 8, fill: `url(#${gradientId})` }),
    svg("text", { x: labelW - 4, y: barY + 8, "text-anchor": "end", class: "tick-label" }, format(min)),
    svg("text", { x: labelW + barW + 4, y: barY + 8, class: "tick-label" }, format(max)),
  );
  if (rowLabel) root.setAttribute("aria-roledescription", `heatmap of ${rowLabel} by ${columnLabel}`);
  figure.append(root);
  return figure;
}

// phases: [{name, start (ms), end (ms)}] -> a horizontal bar of coloured segments.
export function timeline(phases, { width = 640, height = 34 } = {}) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "phase timeline", class: "timeline" });
  if (!phases.length) return root;
  const start = phases[0].start;
  const end = Math.max(...phases.map((p) => p.end));
  const span = Math.max(end - start, 1);
  phases.forEach((phase, index) => {
    const x = ((phase.start - start) / span) * width;
    const w = Math.max(((phase.end - phase.start) / span) * width, 2);
    const rect = svg("rect", { x, y: 4, width: w, height: height - 8, fill: PALETTE[index % PALETTE.length], class: "phase", "data-phase": phase.name });
    rect.append(svg("title", {}, `${phase.name}: ${((phase.end - phase.start) / 1000).toFixed(1)} s`));
    root.append(rect);
    if (w > phase.name.length * 7.5 + 8) { // the label fits inside its segment
      root.append(svg("text", { x: x + 4, y: height / 2 + 4, class: LIGHT.has(index % PALETTE.length) ? "on-light" : "on-dark" }, phase.name));
    }
  });
  return root;
}
