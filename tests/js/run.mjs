// Runs an mpismoe-edge export in a JavaScript client, for tests/test_deploy.py.
//
//   node run.mjs REQUEST.json   ->   one JSON object on stdout
//
// REQUEST: {"client": "onnxruntime-node" | "onnxruntime-web", "model": "DIR/onnx/model.onnx",
//           "feed": {name: {"dims": [...], "data": [...int64]}}}
//       or {"client": "transformers.js", "dir": "DIR", "task": "text-classification" | "token-classification",
//           "texts": [...]}
// REPLY:   {"logits": {"dims", "data"}} (onnxruntime-*: also "outputs", every graph output by name) and, for transformers.js, "pipeline": what the pipeline returned
//          (its top label per text, or its entities per text) and the logits of the pipeline's own model.
import { readFileSync } from "node:fs";
import path from "node:path";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));

function tensors(ort, feed) {
  const out = {};
  for (const [name, { dims, data }] of Object.entries(feed)) {
    out[name] = new ort.Tensor("int64", BigInt64Array.from(data.map(BigInt)), dims);
  }
  return out;
}

function plain(tensor) {
  return { dims: Array.from(tensor.dims), data: Array.from(tensor.data, Number) };
}

async function runOrt(ort, options) {
  const session = await ort.InferenceSession.create(request.model, options);
  const outputs = await session.run(tensors(ort, request.feed));
  const reply = { inputs: session.inputNames, outputs: {} };
  for (const name of session.outputNames) reply.outputs[name] = plain(outputs[name]);
  if (outputs.logits) reply.logits = plain(outputs.logits);
  return reply;
}

async function runTransformers() {
  const { env, pipeline } = await import("@huggingface/transformers");
  env.allowRemoteModels = false;
  env.localModelPath = path.dirname(path.resolve(request.dir)) + path.sep;
  const pipe = await pipeline(request.task, path.basename(request.dir));
  const results = [];
  for (const text of request.texts) {
    results.push(await pipe(text, request.task === "text-classification" ? { top_k: null } : {}));
  }
  const encoded = pipe.tokenizer(request.texts, { padding: true, truncation: true });
  const { logits } = await pipe.model(encoded);
  return { pipeline: results, logits: plain(logits), input_ids: plain(encoded.input_ids) };
}

let reply;
if (request.client === "onnxruntime-node") {
  const ort = (await import("onnxruntime-node")).default;
  reply = await runOrt(ort, { executionProviders: ["cpu"] });
} else if (request.client === "onnxruntime-web") {
  const ort = await import("onnxruntime-web");
  ort.env.wasm.numThreads = 1;
  reply = await runOrt(ort, { executionProviders: ["wasm"] });
} else if (request.client === "transformers.js") {
  reply = await runTransformers();
} else {
  throw new Error(`unknown client ${request.client}`);
}
process.stdout.write(JSON.stringify(reply));
