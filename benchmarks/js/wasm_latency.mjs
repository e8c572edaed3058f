// Median latency (ms) of ONNX models on onnxruntime-web's wasm backend (1 thread) under node,
// the models run interleaved. Usage: node wasm_latency.mjs BATCH SEQ REPEATS model.onnx...
// Prints one JSON object {path: median_ms}. Inputs as benchmarks/export.py feeds them: token ids
// in [1000, vocab), every other row padded to half length, token types 0.
import * as ort from "onnxruntime-web";

const [batch, seq, repeats] = process.argv.slice(2, 5).map(Number);
const paths = process.argv.slice(5);
ort.env.wasm.numThreads = 1;
ort.env.logLevel = "error";

function feeds(session) {
  const n = batch * seq;
  const ids = new BigInt64Array(n), mask = new BigInt64Array(n), types = new BigInt64Array(n);
  let s = 12345;
  for (let r = 0; r < batch; r++) {
    for (let c = 0; c < seq; c++) {
      s = (s * 1103515245 + 12345) % 2147483648;
      const real = r % 2 === 0 || c < seq / 2;
      ids[r * seq + c] = BigInt(real ? 1000 + (s % 29000) : 0);
      mask[r * seq + c] = real ? 1n : 0n;
    }
  }
  const all = { input_ids: ids, attention_mask: mask, token_type_ids: types };
  const out = {};
  for (const name of session.inputNames) out[name] = new ort.Tensor("int64", all[name], [batch, seq]);
  return out;
}

const sessions = [];
for (const p of paths) {
  const s = await ort.InferenceSession.create(p, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  sessions.push([p, s, feeds(s)]);
}
const times = Object.fromEntries(paths.map((p) => [p, []]));
for (const [, s, f] of sessions) { await s.run(f); await s.run(f); }
for (let i = 0; i < repeats; i++) {
  for (const [p, s, f] of sessions) {
    const t0 = performance.now();
    await s.run(f);
    times[p].push(performance.now() - t0);
  }
}
const median = (v) => { const a = [...v].sort((x, y) => x - y); const m = a.length >> 1; return a.length % 2 ? a[m] : (a[m - 1] + a[m]) / 2; };
console.log(JSON.stringify(Object.fromEntries(paths.map((p) => [p, median(times[p])]))));
