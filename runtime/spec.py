"""What training, export and the runtime share: one definition of each name and number.

The torch-free runtime owns these facts, so the training and export sides import them from here
instead of keeping copies (this module imports nothing but the standard library).
"""

from __future__ import annotations

import dataclasses
import typing

# (the task kinds, with their names, heads, losses, metrics and how output is read: tasks.py)

# ---- graph inputs and outputs --------------------------------------------------------------
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUTS = ("pixel_values",)
OUTPUT_NAME = "logits"
MULTI_TASK = "multi-task"  # manifest "task" of an export of several tasks on one backbone ("tasks" lists them)
LAYOUTS = ("merged", "split")  # a multi-task export: one graph, or the backbone's and one per task
BACKBONE_MODEL_FILE = "backbone.onnx"  # the split layout's backbone graph (outputs the hidden states)


def task_output(name: str) -> str:
    """The graph output holding task ``name``'s logits in a multi-task export."""
    return f"{name}_logits"


def side_model_file(name: str) -> str:
    """The split layout's graph of task ``name`` (hidden states + attention_mask -> its logits)."""
    return f"side_{name}.onnx"


# ---- running an export -------------------------------------------------------------------
PROVIDERS = ("cpu", "cuda", "auto")  # auto: CUDA when this onnxruntime can use it, else CPU
GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disable")  # ONNX Runtime's graph optimization levels
DEFAULT_BATCH_SIZE = 32  # texts per ONNX Runtime call

# ---- export targets and the ONNX opset -----------------------------------------------------
TargetName = typing.Literal["portable", "ort-cpu", "ort-cuda", "ort-int8"]
DEFAULT_TARGET: str = "portable"
MIN_OPSET = 18  # BitwiseAnd (18); also the lowest opset torch.onnx's dynamo exporter targets

EXPORT_ATOL = 1e-4  # export validation's max |logit difference| vs PyTorch on the float-exact targets
# int8 activations (ort-int8: rounded per tensor, per call) move the logits by ~5e-2; this bar
# catches wiring bugs (logits off by O(1)); label agreement is what mpismoe-parity measures.
INT8_ATOL = 0.25
DEFAULT_PARITY_BARS = (1e-3, 0.999)  # mpismoe-parity's (max |logit difference|, min label agreement), float-exact

# the runtimes an export can promise (export/runtimes.py says what each is; tests/test_deploy.py runs them)
ONNXRUNTIME = ("onnxruntime", "onnxruntime-node", "onnxruntime-web", "transformers.js", "onnxruntime-mobile")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """One export target, whole: how its graph is lowered and what it promises.

    ``packed_bits``: the ``QMatMul`` widths lowered to ``com.microsoft.MatMulNBits`` (others keep
    the portable function); ``rules``: the rule sets of ``export/rules/`` applied after that;
    ``int8``: the backbone takes ORT's fused int8 path (``export/int8_target.py``), its side
    network lowered by ``fuse`` with this record's widths and rules; ``atol``: export validation's
    tolerance; ``parity_bars``: ``mpismoe-parity``'s defaults; ``runtimes``: where the export runs
    (held by the deploy tests).
    """

    name: str
    packed_bits: frozenset[int]
    rules: tuple[str, ...]
    runtimes: tuple[str, ...]
    int8: bool = False
    atol: float = EXPORT_ATOL
    parity_bars: tuple[float, float] = DEFAULT_PARITY_BARS


TARGET_SPECS: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        TargetSpec("portable", frozenset(), (), ONNXRUNTIME + ("openvino", "onnx-reference")),
        TargetSpec("ort-cpu", frozenset({2, 4, 8}), ("gelu", "masked_attention"), ONNXRUNTIME + ("openvino",)),
        # CUDA MatMulNBits kernels exist for 4 and 8 bits; 2-bit nodes keep the portable function
        TargetSpec("ort-cuda", frozenset({4, 8}), ("gelu",), ("onnxruntime",)),
        TargetSpec(
            "ort-int8",
            frozenset({2, 4, 8}),
            ("gelu", "masked_attention"),
            ONNXRUNTIME,
            int8=True,
            atol=INT8_ATOL,
            parity_bars=(INT8_ATOL, 0.995),
        ),
    )
}
TARGETS: tuple[str, ...] = tuple(TARGET_SPECS)
assert TARGETS == typing.get_args(TargetName), "TargetName and TARGET_SPECS list the same targets"
# views of the records for the modules that read one fact
TARGET_ATOL = {t.name: t.atol for t in TARGET_SPECS.values() if t.atol != EXPORT_ATOL}
PARITY_BARS = {t.name: t.parity_bars for t in TARGET_SPECS.values() if t.parity_bars != DEFAULT_PARITY_BARS}


# ---- the exported directory ----------------------------------------------------------------
FORMAT_PREFIX = "mpismoe-edge-onnx/"
FORMAT_MAJOR = 1
FORMAT = f"{FORMAT_PREFIX}{FORMAT_MAJOR}"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, when the model is large
MODEL_DIR = "onnx"  # Hugging Face's ONNX layout keeps the graph under onnx/
MODEL_PATHS = (f"{MODEL_DIR}/{MODEL_FILE}", MODEL_FILE)  # where the graph is: this layout, then the old one
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"  # ours; the Hugging Face loaders read the three below
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
README_FILE = "README.md"  # the model card (export/model_card.py)
# top-level entries an export may hold (model.onnx(.data) of the old layout too, so an old export can be replaced)
EXPORT_FILES = frozenset(
    {
        MODEL_DIR,
        CONFIG_FILE,
        TOKENIZER_FILE,
        TOKENIZER_CONFIG_FILE,
        SPECIAL_TOKENS_FILE,
        MANIFEST_FILE,
        README_FILE,
        MODEL_FILE,
        DATA_FILE,
    }
)

# ---- the training run's directory ----------------------------------------------------------
CHECKPOINT_FILE = "model.pt"
LAST_CHECKPOINT_FILE = "last.pt"  # resumable state of the last epoch
METRICS_FILE = "metrics.json"
