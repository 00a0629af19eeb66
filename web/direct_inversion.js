// ComfyUI-DirectInversion web extension.
// - P2P Editor: a live view of how the editor tokenises and aligns the source and target prompts (from the pack's
//   route, which runs the editor's own alignment code with ComfyUI's tokenizers). Replaced, inserted and deleted
//   words are highlighted; the mode `auto` would pick is shown; clicking a word toggles it in the local-blend
//   words, shift-clicking a target word toggles it in the reweight words.
// - Invert and Direct Inversion Sampler: after a run, a per-step chart sent by the node (source-branch error and
//   Direct Inversion offset; step size and null-text loss for the inversion), and on the sampler the warnings the
//   node sends (an editor whose settings make it do nothing).
// - Edit Metrics: the scores' text the node sends (`text`, as PreviewAny's), shown on the node: the official
//   frontend displays that text only for its own PreviewAny and SaveText nodes.
// The attention-map grid of an editor run is shown on the sampler as ComfyUI's usual image preview.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/direct_inversion/p2p_alignment";
const TOKENIZERS = ["sd1", "sd2", "sdxl"];
const COLORS = ["#4fc3f7", "#ffb74d", "#aed581", "#f06292"];

const STYLE = `
.di-alignment { font: 12px sans-serif; color: #ddd; padding: 4px; overflow: auto; box-sizing: border-box; }
.di-alignment .di-head { display: flex; gap: 8px; align-items: center; margin-bottom: 4px; color: #aaa; }
.di-alignment select { background: #222; color: #ddd; border: 1px solid #555; font-size: 11px; }
.di-alignment .di-row { display: flex; flex-wrap: wrap; gap: 3px; align-items: center; margin: 2px 0; }
.di-alignment .di-label { width: 46px; color: #999; }
.di-word { padding: 1px 4px; border-radius: 3px; background: #333; cursor: pointer; border: 1px solid transparent; }
.di-word.di-replace { background: #8a5a00; }
.di-word.di-insert { background: #1b5e20; }
.di-word.di-delete { background: #7f1d1d; text-decoration: line-through; }
.di-word.di-blend { border-color: #4fc3f7; }
.di-word.di-reweight { border-color: #f06292; border-style: dashed; }
.di-alignment .di-error { color: #ff8a80; }
.di-chart { font: 11px sans-serif; color: #ccc; padding: 2px 4px; box-sizing: border-box; }
.di-chart svg { width: 100%; height: 110px; background: #1e1e1e; border: 1px solid #444; }
.di-chart .di-legend span { margin-right: 8px; white-space: nowrap; }
.di-chart .di-warning { color: #ffb74d; margin-top: 3px; white-space: normal; }
.di-metrics { font: 12px/15px monospace; color: #ddd; padding: 4px; white-space: pre; overflow: auto;
              box-sizing: border-box; user-select: text; }
`;

function injectStyle() {
  if (document.getElementById("di-style")) return;
  const style = document.createElement("style");
  style.id = "di-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

const widgetOf = (node, name) => node.widgets?.find((w) => w.name === name);
const wordList = (text) => (text || "").split(",").map((s) => s.trim()).filter(Boolean);
const plain = (word) => word.replace(/^[^\w]+|[^\w]+$/g, "").toLowerCase();

function setWidget(node, name, value) {
  const w = widgetOf(node, name);
  if (!w) return;
  w.value = value;
  w.callback?.(value);
  node.setDirtyCanvas?.(true, true);
}

function toggleWord(node, name, word) {
  const list = wordList(widgetOf(node, name)?.value);
  const i = list.findIndex((x) => plain(x) === plain(word));
  if (i >= 0) list.splice(i, 1);
  else list.push(plain(word));
  setWidget(node, name, list.join(", "));
}

function toggleReweight(node, word) {
  const words = wordList(widgetOf(node, "reweight_words")?.value);
  const values = wordList(widgetOf(node, "reweight_values")?.value);
  const i = words.findIndex((x) => plain(x) === plain(word));
  if (i >= 0) {
    words.splice(i, 1);
    values.splice(i, 1);
  } else {
    words.push(plain(word));
    values.push("2.0");
  }
  setWidget(node, "reweight_words", words.join(", "));
  setWidget(node, "reweight_values", values.join(", "));
}

function renderAlignment(node, view, data) {
  view.body.replaceChildren();
  if (data.error) {
    const err = document.createElement("div");
    err.className = "di-error";
    err.textContent = data.error;
    view.body.appendChild(err);
    view.mode.textContent = "";
    return;
  }
  view.mode.textContent = `auto → ${data.auto_mode}`;
  const sourceOps = {};
  const targetOps = {};
  for (const entry of data.alignment) {
    if (entry.source !== null) sourceOps[entry.source] = entry.op === "insert" ? "same" : entry.op;
    if (entry.target !== null) targetOps[entry.target] = entry.op;
  }
  const blend = { source: wordList(widgetOf(node, "blend_source_words")?.value).map(plain),
                  target: wordList(widgetOf(node, "blend_target_words")?.value).map(plain) };
  const reweight = wordList(widgetOf(node, "reweight_words")?.value).map(plain);
  for (const side of ["source", "target"]) {
    const row = document.createElement("div");
    row.className = "di-row";
    row.dataset.side = side;
    const label = document.createElement("span");
    label.className = "di-label";
    label.textContent = side;
    row.appendChild(label);
    data[side].forEach((item, index) => {
      const chip = document.createElement("span");
      const op = (side === "source" ? sourceOps : targetOps)[index] || "same";
      chip.className = `di-word di-${op}`;
      if (blend[side].includes(plain(item.word))) chip.classList.add("di-blend");
      if (side === "target" && reweight.includes(plain(item.word))) chip.classList.add("di-reweight");
      chip.textContent = item.word;
      chip.title = `${op}; token positions ${item.positions.join(", ")}` +
        (side === "target" ? "\nclick: local-blend word · shift-click: reweight" : "\nclick: local-blend word");
      chip.addEventListener("click", (event) => {
        if (side === "target" && event.shiftKey) toggleReweight(node, item.word);
        else toggleWord(node, side === "source" ? "blend_source_words" : "blend_target_words", item.word);
        renderAlignment(node, view, data);
      });
      row.appendChild(chip);
    });
    view.body.appendChild(row);
  }
}

async function refreshAlignment(node, view) {
  const source = widgetOf(node, "source_prompt")?.value ?? "";
  const target = widgetOf(node, "target_prompt")?.value ?? "";
  const request = ++view.request;
  let data;
  try {
    const response = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ source, target, tokenizer: view.tokenizer.value }),
    });
    data = await response.json();
  } catch (error) {
    data = { error: `alignment unavailable: ${error}` };
  }
  if (request === view.request) renderAlignment(node, view, data);
}

function addAlignmentView(node) {
  injectStyle();
  const element = document.createElement("div");
  element.className = "di-alignment";
  const head = document.createElement("div");
  head.className = "di-head";
  const title = document.createElement("span");
  title.textContent = "alignment";
  const tokenizer = document.createElement("select");
  for (const name of TOKENIZERS) tokenizer.add(new Option(name, name));
  tokenizer.title = "tokenizer of the model family (SD1.x, SD2.x, SDXL)";
  const mode = document.createElement("span");
  mode.className = "di-mode";
  head.append(title, tokenizer, mode);
  const body = document.createElement("div");
  element.append(head, body);
  const view = { element, body, mode, tokenizer, request: 0, timer: null };
  const schedule = () => {
    clearTimeout(view.timer);
    view.timer = setTimeout(() => refreshAlignment(node, view), 250);
  };
  tokenizer.addEventListener("change", schedule);
  for (const name of ["source_prompt", "target_prompt", "blend_source_words", "blend_target_words",
                      "reweight_words"]) {
    const w = widgetOf(node, name);
    if (!w) continue;
    const previous = w.callback;
    w.callback = function (...args) {
      schedule();
      return previous?.apply(this, args);
    };
    w.inputEl?.addEventListener("input", schedule);
  }
  node.addDOMWidget("alignment", "di_alignment", element, { serialize: false, hideOnZoom: false,
                                                            getMinHeight: () => 90 });
  node.diAlignment = { view, schedule };
  schedule();
}

function renderChart(node, chart, warnings = []) {
  injectStyle();
  let holder = node.diChart;
  if (!holder) {
    const element = document.createElement("div");
    element.className = "di-chart";
    node.addDOMWidget("chart", "di_chart", element, { serialize: false, hideOnZoom: false,
                                                      getMinHeight: () => 150 });
    holder = node.diChart = { element };
    node.setSize?.([node.size[0], Math.max(node.size[1], node.computeSize?.()[1] ?? 0)]);
  }
  const series = Object.entries(chart.series);
  const values = series.flatMap(([, v]) => v.filter((x) => x !== null));
  const top = Math.max(1e-12, ...values);
  const steps = Math.max(1, chart.steps - 1);
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  series.forEach(([name, vals], k) => {
    const line = document.createElementNS(svgNS, "polyline");
    const points = vals.map((v, i) => (v === null ? null : `${(i / steps) * 300},${100 - (v / top) * 95}`))
      .filter((p) => p !== null);
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[k % COLORS.length]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.dataset.series = name;
    svg.appendChild(line);
  });
  const titleEl = document.createElement("div");
  titleEl.textContent = `${chart.title} (max ${top.toPrecision(3)})`;
  const legend = document.createElement("div");
  legend.className = "di-legend";
  series.forEach(([name, vals], k) => {
    const last = [...vals].reverse().find((x) => x !== null);
    const item = document.createElement("span");
    item.style.color = COLORS[k % COLORS.length];
    item.textContent = `■ ${name}${last === undefined ? "" : ` (last ${last.toPrecision(3)})`}`;
    legend.appendChild(item);
  });
  const notes = warnings.map((text) => {
    const note = document.createElement("div");
    note.className = "di-warning";
    note.textContent = `⚠ ${text}`;
    return note;
  });
  holder.element.replaceChildren(titleEl, svg, legend, ...notes);
}

const METRIC_LINE = 15; // px per line of the metrics text (12 px monospace)
const METRIC_CHAR = 7.3; // px per character of it

function renderMetrics(node, text) {
  injectStyle();
  let element = node.diMetrics;
  if (!element) {
    element = node.diMetrics = document.createElement("div");
    element.className = "di-metrics";
    // as tall as the text (with the padding and the margin the frontend takes off), scrolling past 24 lines
    node.addDOMWidget("metrics", "di_metrics", element, {
      serialize: false, hideOnZoom: false,
      getMinHeight: () => 24 + METRIC_LINE * Math.min(24, (element.textContent || " ").split("\n").length) });
  }
  element.textContent = text;
  const longest = Math.max(...text.split("\n").map((line) => line.length));
  const size = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size[0], size[0], Math.min(900, 24 + METRIC_CHAR * longest)),
                  Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "DirectInversion.web",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "DirectInversion_P2PEditor") {
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = created?.apply(this, arguments);
        addAlignmentView(this);
        return result;
      };
      const configured = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = configured?.apply(this, arguments);
        this.diAlignment?.schedule();
        return result;
      };
    }
    if (nodeData.name === "DirectInversion_Invert" || nodeData.name === "DirectInversion_Sampler") {
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = executed?.apply(this, arguments);
        const chart = message?.direct_inversion_chart?.[0];
        if (chart) renderChart(this, chart, message?.direct_inversion_warnings ?? []);
        return result;
      };
    }
    if (nodeData.name === "DirectInversion_EditMetrics") {
      const executed = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = executed?.apply(this, arguments);
        const text = message?.text;
        if (text !== undefined) renderMetrics(this, Array.isArray(text) ? text.join("\n") : String(text));
        return result;
      };
    }
  },
});
