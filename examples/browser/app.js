// The page: runs one mpismoe-edge export with transformers.js (onnxruntime-web, wasm) in this tab.
//
// serve.py tells the page what to load in /page.json: {model, task, target, pipeline, models,
// transformers, wasm} (the export's name under `models`, the transformers.js module, the folder of
// the onnxruntime-web build transformers.js was made with). Nothing is fetched from anywhere but
// this page's own server: remote models are off and the wasm files are local.
//
// window.mpismoe holds the state for scripts driving the page (tests/test_browser_page.py):
// {ready, error, runs, loadMs, result: {text, task, inferenceMs, pipeline, logits: {dims, data},
// inputIds}}.

const state = (window.mpismoe = { ready: false, error: null, runs: 0, loadMs: null, result: null });
const $ = (id) => document.getElementById(id);

function fail(err) {
  state.error = String(err?.stack || err);
  $("status").className = "error";
  $("status").textContent = `error: ${err?.message || err}`;
  console.error(err);
}

function plain(tensor) {
  return { dims: Array.from(tensor.dims), data: Array.from(tensor.data, Number) };
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

// classification / multi-label: every label with its probability, highest first
function showScores(rows) {
  const table = document.createElement("table");
  table.id = "scores";
  const head = table.createTHead().insertRow();
  for (const name of ["label", "", "probability"]) head.appendChild(document.createElement("th")).textContent = name;
  const body = table.createTBody();
  rows.forEach(({ label, score }, i) => {
    const row = body.insertRow();
    row.dataset.label = label;
    row.dataset.score = String(score);
    if (i === 0) row.className = "top";
    cell(row, label, "label");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * score).toFixed(1)}%`;
    const barCell = row.insertCell();
    barCell.className = "barcell";
    barCell.appendChild(bar);
    cell(row, score.toFixed(4), "number probability");
  });
  return table;
}

// regression: the one number the head outputs
function showNumber(name, value) {
  const div = document.createElement("div");
  div.id = "score";
  div.dataset.label = name;
  div.dataset.score = String(value);
  div.textContent = `${name}: ${value.toFixed(4)}`;
  return div;
}

// token classification: the text's tokens, entities highlighted with their tag, then a table of them
function showEntities(tokenizer, inputIds, entities) {
  const wrap = document.createElement("div");
  const tokens = document.createElement("div");
  tokens.id = "tokens";
  const byIndex = new Map(entities.map((e) => [e.index, e]));
  inputIds.forEach((id, index) => {
    const word = tokenizer.decode([id], { skip_special_tokens: true });
    if (word === "") return;
    const span = tokens.appendChild(document.createElement("span"));
    span.className = "token";
    span.textContent = word;
    const entity = byIndex.get(index);
    if (entity) {
      span.classList.add("entity");
      span.title = `${entity.entity} ${entity.score.toFixed(4)}`;
      span.appendChild(document.createElement("span")).className = "tag";
      span.lastChild.textContent = entity.entity;
    }
  });
  wrap.appendChild(tokens);
  const table = wrap.appendChild(document.createElement("table"));
  table.id = "entities";
  const head = table.createTHead().insertRow();
  for (const name of ["token", "entity", "probability"]) head.appendChild(document.createElement("th")).textContent = name;
  const body = table.createTBody();
  for (const e of entities) {
    const row = body.insertRow();
    Object.assign(row.dataset, { index: String(e.index), entity: e.entity, score: String(e.score), word: e.word });
    cell(row, e.word);
    cell(row, e.entity, "label");
    cell(row, e.score.toFixed(4), "number probability");
  }
  if (!entities.length) cell(body.insertRow(), "no entities (every token is O)");
  return wrap;
}

async function main() {
  const cfg = await (await fetch("page.json")).json();
  const abs = (path) => new URL(path, location.href).href;
  $("about").textContent = `${cfg.model}: ${cfg.task}, target ${cfg.target}, transformers.js pipeline "${cfg.pipeline}"`;

  const { env, pipeline } = await import(abs(cfg.transformers));
  env.allowRemoteModels = false; // never the Hugging Face Hub
  env.allowLocalModels = true; // (off by default in browsers)
  // a path on this server, not a full URL: transformers.js 4.3.1 checks which files a local model has
  // only for non-URL paths (with a URL the pipeline comes without its tokenizer)
  env.localModelPath = cfg.models;
  env.useBrowserCache = false; // a re-export under the same name is read afresh
  // the files transformers.js would otherwise take from a CDN, from this server instead
  env.backends.onnx.wasm.wasmPaths = {
    mjs: abs(`${cfg.wasm}ort-wasm-simd-threaded.asyncify.mjs`),
    wasm: abs(`${cfg.wasm}ort-wasm-simd-threaded.asyncify.wasm`),
  };

  const t0 = performance.now();
  const pipe = await pipeline(cfg.pipeline, cfg.model, { dtype: "fp32", device: "wasm" });
  state.loadMs = performance.now() - t0;
  $("times").textContent = `model loaded in ${state.loadMs.toFixed(0)} ms`;
  $("status").textContent = "ready";
  $("run").disabled = false;

  async function run(text) {
    const encoded = pipe.tokenizer([text], { padding: true, truncation: true });
    const t1 = performance.now();
    let shown;
    let logits;
    if (cfg.task === "regression") {
      // the text-classification pipeline would softmax the one logit (always 1.0): read the model's output
      ({ logits } = await pipe.model(encoded));
      shown = logits.data[0];
    } else if (cfg.pipeline === "token-classification") {
      shown = await pipe(text);
    } else {
      shown = await pipe(text, { top_k: null });
    }
    const inferenceMs = performance.now() - t1;
    if (!logits) ({ logits } = await pipe.model(encoded)); // the raw logits too, for scripts (not timed)
    const inputIds = Array.from(encoded.input_ids.data, Number);
    const out = $("output");
    out.replaceChildren(
      cfg.task === "regression"
        ? showNumber(cfg.labels?.[0] ?? "score", shown)
        : cfg.pipeline === "token-classification"
          ? showEntities(pipe.tokenizer, inputIds, shown)
          : showScores(shown),
    );
    $("times").textContent = `model loaded in ${state.loadMs.toFixed(0)} ms; this text took ${inferenceMs.toFixed(1)} ms`;
    state.result = { text, task: cfg.task, inferenceMs, pipeline: shown, logits: plain(logits), inputIds };
    state.runs += 1;
  }

  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("run").disabled = true;
    $("status").textContent = "running...";
    run($("text").value)
      .then(() => ($("status").textContent = "ready"))
      .catch(fail)
      .finally(() => ($("run").disabled = false));
  });
  state.ready = true;
}

main().catch(fail);
