"""Which runtimes each export target supports: what the manifest states and the deploy tests hold
each target to (tests/test_deploy.py runs every pair listed here and compares logits and labels
with Python ONNX Runtime).

* ``onnxruntime``: Python ONNX Runtime (and the C API: the same library).
* ``onnxruntime-node``, ``onnxruntime-web``: the npm packages, under node (web on its wasm backend).
* ``transformers.js``: ``pipeline(task, dir)`` of ``@huggingface/transformers`` on the HF layout.
* ``openvino``: OpenVINO's CPU plugin, on a graph exported with the functions inlined.
* ``onnx-reference``: ``onnx.reference.ReferenceEvaluator``, the ONNX spec's own evaluator
  (standard ops only, so not the com.microsoft ones of the ort-* targets).
* ``onnxruntime-mobile``: ``onnx/model.ort`` (export option), run here by Python ONNX Runtime.
"""

from __future__ import annotations

from mpismoe_edge.runtime.spec import ONNXRUNTIME, TARGET_SPECS  # noqa: F401  (ONNXRUNTIME re-exported)

TARGET_RUNTIMES: dict[str, tuple[str, ...]] = {name: t.runtimes for name, t in TARGET_SPECS.items()}
RUNTIMES = tuple(dict.fromkeys(r for rs in TARGET_RUNTIMES.values() for r in rs))
NEEDS_INLINED = ("openvino",)  # runtimes that do not read model-local functions
# OpenVINO's CPU plugin computes in bfloat16 by default on CPUs with bf16 units (AMX, AVX512-BF16),
# and quantizes the activations of layers with compressed weights (the ort-cpu MatMulNBits) to int8
# on the fly: the MiniLM logits then differ by ~1e-2. Compile with both off to match the other runtimes.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
