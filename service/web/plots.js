// Line charts as inline SVG (no chart library): named series over a shared x axis, round ticks, a legend and a text
// summary.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 480;
const HEIGHT = 200;
const PAD = { left: 46, right: 10, top: 10, bottom: 28 };

function svg(name, attributes = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatNumber(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const size = Math.abs(value);
  if (size !== 0 && (size < 1e-3 || size >= 1e5)) return value.toExponential(2);
  return Number(value.toPrecision(3)).toString();
}

/** About `count` round ticks (1, 2 or 5 times a power of ten apart) that cover [lo, hi], and their step. */
export function niceTicks(lo, hi, count = 4) {
  const raw = Math.max(hi - lo, 1e-12) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const first = Math.floor(lo / step + 1e-9);
  const last = Math.ceil(hi / step - 1e-9);
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const ticks = [];
  for (let i = first; i <= last; i++) ticks.push(Number((i * step).toFixed(decimals)));
  return { ticks, step, decimals };
}

/**
 * A <figure> with one chart. series: [{name, points: [[x, y], ...]}]; each series gets the colour of its place
 * (CSS classes series-0, series-1, ...). yRange: [min, max] to fix the axis (e.g. [0, 1]), else it fits the data.
 */
export function lineChart({ title, series, xLabel = "step", yRange }) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  const drawn = series.filter((s) => s.points.length);
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1])).filter(Number.isFinite);
  let [y0, y1] = yRange ?? [Math.min(...ys), Math.max(...ys)];
  if (!ys.length) [y0, y1] = [0, 1];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  // Round ticks; the axis runs from the first to the last, so that every point lies between two labelled lines.
  const yTicks = niceTicks(y0, y1, 5);
  [y0, y1] = [yTicks.ticks[0], yTicks.ticks.at(-1)];
  const x0 = xs.length ? Math.min(...xs) : 0;
  const x1 = xs.length ? Math.max(...xs, x0 + 1) : 1;
  const xTicks = niceTicks(x0, x1, 4).ticks.filter((x) => x >= x0 && x <= x1 && Number.isInteger(x));
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (WIDTH - PAD.left - PAD.right);
  const py = (y) => HEIGHT - PAD.bottom - ((y - y0) / (y1 - y0)) * (HEIGHT - PAD.top - PAD.bottom);

  const summary = drawn.map((s) => `${s.name} ${formatNumber(s.points.at(-1)[1])}`).join(", ");
  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${title}: ${summary || "no data yet"} (at ${xLabel} ${xs.length ? Math.max(...xs) : "–"})`,
  });
  chart.append(svg("title", {}, title));
  chart.append(
    svg("rect", {
      class: "plot-area",
      x: PAD.left,
      y: PAD.top,
      width: WIDTH - PAD.left - PAD.right,
      height: HEIGHT - PAD.top - PAD.bottom,
    }),
  );
  for (const y of yTicks.ticks) {
    const label = y.toFixed(yTicks.decimals);
    chart.append(svg("line", { class: "grid-line", x1: PAD.left, x2: WIDTH - PAD.right, y1: py(y), y2: py(y) }));
    chart.append(svg("text", { class: "tick y-tick", x: PAD.left - 4, y: py(y) + 4, "text-anchor": "end" }, label));
  }
  for (const x of xTicks) {
    const anchor = x === x0 ? "start" : x === x1 ? "end" : "middle";
    const at = { class: "tick x-tick", x: px(x), y: HEIGHT - PAD.bottom + 14, "text-anchor": anchor };
    chart.append(svg("text", at, String(x)));
  }
  chart.append(
    svg(
      "text",
      { class: "axis-label", x: (PAD.left + WIDTH - PAD.right) / 2, y: HEIGHT - 4, "text-anchor": "middle" },
      xLabel,
    ),
  );
  series.forEach((s, i) => {
    const points = s.points.filter((p) => Number.isFinite(p[1]));
    if (!points.length) return;
    const line = points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
    chart.append(svg("polyline", { class: `series series-${i}`, points: line }));
    const [lx, ly] = points.at(-1);
    chart.append(svg("circle", { class: `series-dot series-${i}`, cx: px(lx), cy: py(ly), r: 3 }));
  });

  const caption = document.createElement("figcaption");
  const heading = document.createElement("span");
  heading.className = "chart-title";
  heading.textContent = title;
  caption.append(heading);
  const legend = document.createElement("ul");
  legend.className = "legend";
  series.forEach((s, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `swatch series-${i}`;
    swatch.setAttribute("aria-hidden", "true");
    const last = s.points.at(-1);
    item.append(swatch, `${s.name} ${last ? formatNumber(last[1]) : "–"}`);
    legend.append(item);
  });
  caption.append(legend);
  figure.append(caption, chart);
  return figure;
}
