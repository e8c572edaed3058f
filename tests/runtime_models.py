"""A tiny hand-built ONNX classifier and its tokenizer, for the runtime tests (no torch needed).

The model is embedding -> masked mean pool -> linear over input_ids/attention_mask/
token_type_ids, built with onnx.helper; the tokenizer is a tiny WordPiece made with `tokenizers`.
Only the tests import onnx; the runtime itself must not (tests/test_runtime_boundary.py).
Its fixtures ``model_dir`` and ``predictor`` live in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mpismoe_edge.runtime.spec import FORMAT, MANIFEST_FILE, MODEL_FILE, OUTPUT_NAME, TEXT_INPUTS, TOKENIZER_FILE  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
WORDS = [
    "the",
    "phone",
    "battery",
    "movie",
    "is",
    "was",
    "very",
    "not",
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
    "and",
    "but",
    "really",
    "##s",
    "##ly",
    ",",
    ".",
    "!",
]
HIDDEN = 8


def make_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    # A fixed-length padding setting in tokenizer.json must not leak into the runtime.
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=40)
    tok.save(str(path))
    return tok


def make_weights(vocab_size: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.normal(size=(vocab_size, HIDDEN)).astype(np.float32),
        "type_emb": rng.normal(size=(2, HIDDEN)).astype(np.float32),
        "W": rng.normal(size=(HIDDEN, classes)).astype(np.float32),
        "b": rng.normal(size=(classes,)).astype(np.float32),
    }


def make_model(path: Path, weights: dict, float_mask: bool = False, external: bool = False) -> None:
    classes = weights["W"].shape[1]
    mask_type = TensorProto.FLOAT if float_mask else TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", mask_type, ["batch", "seq"]),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
        numpy_helper.from_array(np.array([1], np.int64), "axes_seq"),
        numpy_helper.from_array(np.array(1e-9, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["typ"]),
        helper.make_node("Add", ["tok", "typ"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes_last"], ["mask3"]),
        helper.make_node("Mul", ["h", "mask3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axes_seq"], ["sum"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "axes_seq"], ["cnt"], keepdims=0),
        helper.make_node("Max", ["cnt", "eps"], ["cnt1"]),
        helper.make_node("Div", ["sum", "cnt1"], ["pooled"]),
        helper.make_node("MatMul", ["pooled", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny_classifier", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx 1.23 writes IR 14, which onnxruntime 1.31 refuses
    onnx.checker.check_model(model)
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=64,
        )
    else:
        onnx.save(model, str(path))


def build_model_dir(
    out: Path, task: str = "classification", max_length: int = 32, float_mask: bool = False, external: bool = False
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out / TOKENIZER_FILE)
    classes = len(LABELS) if task == "classification" else 1
    make_model(out / MODEL_FILE, make_weights(tok.get_vocab_size(), classes), float_mask, external)
    manifest = {
        "format": FORMAT,
        "task": task,
        "max_length": max_length,
        "labels": LABELS if task == "classification" else None,
        "inputs": list(TEXT_INPUTS),
        "outputs": [OUTPUT_NAME],
        "target": "portable",
        "opset": 17,
        "bits": {"layer0": 4},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    return out


def reference_logits(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    """The same computation in numpy, one text at a time (no padding at all)."""
    tok = tokenizers.Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tok.no_padding()
    tok.enable_truncation(max_length)
    w = make_weights(tok.get_vocab_size(), len(LABELS))
    rows = []
    for t in texts:
        e = tok.encode(t)
        h = w["emb"][e.ids] + w["type_emb"][e.type_ids]
        rows.append(h.mean(0) @ w["W"] + w["b"])
    return np.stack(rows)


TEXTS = [
    "The phone is great!",
    "bad battery",
    "the movie was really, really awful but the phone was fine and the battery was good",
    "not good",
    "",
    "zzz unknown words",
]
