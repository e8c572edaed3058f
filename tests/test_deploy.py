"""Runs wherever the target says: every (target, runtime) pair of export/runtimes.py runs a tiny
export and matches Python ONNX Runtime's logits (atol 1e-4; 1e-3 for int8) and labels; the Hugging Face layout
loads as the task's transformers.js pipeline; the .ort keeps the weights packed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clients import array, require, run_js, run_node_ort, run_onnxruntime, run_openvino, run_reference
from conftest import TEXTS, tiny_model

from mpismoe_edge.export.fuse import INT8_TARGET
from mpismoe_edge.export.ort_format import OPS_CONFIG_FILE, ORT_FILE
from mpismoe_edge.export.runtimes import NEEDS_INLINED, TARGET_RUNTIMES
from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.manifest import find_model
from mpismoe_edge.runtime.spec import CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE
from mpismoe_edge.runtime.text import TextEncoder

pytestmark = pytest.mark.slow  # every export runs in the deploy clients (node, wasm, OpenVINO, .ort)

ATOL = 1e-4
# ort-int8 quantizes activations at run time: x86 MLAS (VNNI/AMX) and wasm round them on different
# kernels, a one-step flip moves a logit by ~1e-4..1e-3 (3.4e-4 seen in onnxruntime-web 1.30.0).
INT8_CROSS_RUNTIME_ATOL = 1e-3  # the same int8 graph in two runtimes (runtime.spec.INT8_ATOL: int8 vs PyTorch)
PAIRS = [(t, r) for t, runtimes in TARGET_RUNTIMES.items() for r in runtimes]
PIPELINES = {
    "classification": "text-classification",
    "regression": "text-classification",
    "token-classification": "token-classification",
}
TAGS = ["O", "B-X", "I-X"]


def _export(tmp_path_factory, task="classification", labels=("neg", "neu", "pos"), **options):
    from mpismoe_edge.export import export_model

    model = tiny_model(task=task, labels=labels).eval()
    model.pack_experts()
    out = tmp_path_factory.mktemp("deploy") / "tiny"
    export_model(model, out, validate=False, log=None, **options)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """target -> {inline: export dir}, exported lazily (only what the selected tests need)."""
    cache: dict = {}

    def get(target: str, inline: bool = False):
        if (target, inline) not in cache:
            cache[target, inline] = _export(tmp_path_factory, target=target, inline=inline, ort_format=not inline)
        return cache[target, inline]

    return get


def _feed(out) -> dict[str, np.ndarray]:
    return TextEncoder(out / "tokenizer.json", 16).encode(TEXTS).arrays()


def _logits(runtime: str, out, feed, tmp_path) -> np.ndarray:
    model = find_model(out)
    if runtime == "onnxruntime":
        return Predictor.from_dir(out).run_arrays(feed)
    if runtime in ("onnxruntime-node", "onnxruntime-web"):
        return run_node_ort(runtime, model, feed, tmp_path)
    if runtime == "openvino":
        return run_openvino(model, feed)
    if runtime == "onnx-reference":
        return run_reference(model, feed)
    if runtime == "onnxruntime-mobile":
        return run_onnxruntime(model.with_name(ORT_FILE), feed)
    raise AssertionError(f"no client for {runtime}")


@pytest.mark.parametrize("target,runtime", [p for p in PAIRS if p[1] != "transformers.js"])
def test_target_runs_in_each_runtime_it_states(exports, target, runtime, tmp_path):
    require(runtime)
    out = exports(target, inline=runtime in NEEDS_INLINED)
    assert runtime in json.loads((out / "manifest.json").read_text())["runtimes"]
    feed = _feed(out)
    ref = run_onnxruntime(find_model(out), feed)
    got = _logits(runtime, out, feed, tmp_path)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=INT8_CROSS_RUNTIME_ATOL if target == INT8_TARGET else ATOL, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("target", [t for t, r in PAIRS if r == "transformers.js"])
def test_transformers_js_text_classification_pipeline_matches(exports, target, tmp_path):
    require("transformers.js")
    out = exports(target)
    reply = run_js(
        {"client": "transformers.js", "dir": str(out), "task": "text-classification", "texts": TEXTS}, tmp_path
    )
    feed = _feed(out)
    np.testing.assert_array_equal(array(reply["input_ids"]), feed["input_ids"])  # same tokens, same padding
    ref = run_onnxruntime(find_model(out), feed)
    np.testing.assert_allclose(array(reply["logits"]), ref, atol=ATOL, rtol=0)
    ours = Predictor.from_dir(out).predict(TEXTS)
    for mine, theirs in zip(ours, reply["pipeline"]):
        assert theirs[0]["label"] == mine["label"]
        assert {d["label"]: pytest.approx(d["score"], abs=1e-4) for d in theirs} == mine["probabilities"]


def test_transformers_js_token_classification_pipeline_matches(tmp_path_factory, tmp_path):
    require("transformers.js")
    out = _export(tmp_path_factory, task="token-classification", labels=TAGS)
    reply = run_js(
        {"client": "transformers.js", "dir": str(out), "task": "token-classification", "texts": TEXTS}, tmp_path
    )
    feed = _feed(out)
    ref = run_onnxruntime(find_model(out), feed)
    np.testing.assert_allclose(array(reply["logits"]), ref, atol=ATOL, rtol=0)
    for i, entities in enumerate(reply["pipeline"]):
        # one entity per non-special token whose top label is not "O" (the pipeline's default ignore list)
        want = [j for j in range(1, int(feed["attention_mask"][i].sum()) - 1) if TAGS[int(ref[i, j].argmax())] != "O"]
        assert [e["index"] for e in entities] == want
        assert [e["entity"] for e in entities] == [TAGS[int(ref[i, j].argmax())] for j in want]


def test_transformers_js_regression_model_returns_the_score_as_its_logit(tmp_path_factory, tmp_path):
    """transformers.js's text-classification pipeline loads a regression export; it softmaxes the
    one logit (score 1.0), so the score is read from the pipeline's model output."""
    require("transformers.js")
    out = _export(tmp_path_factory, task="regression", labels=("score",))
    reply = run_js(
        {"client": "transformers.js", "dir": str(out), "task": "text-classification", "texts": TEXTS}, tmp_path
    )
    scores = [r["score"] for r in Predictor.from_dir(out).predict(TEXTS)]
    np.testing.assert_allclose(array(reply["logits"])[:, 0], scores, atol=ATOL, rtol=0)
    assert [(r[0]["label"], r[0]["score"]) for r in reply["pipeline"]] == [("score", 1.0)] * len(TEXTS)


@pytest.mark.parametrize(
    "task,labels",
    [("classification", ["neg", "neu", "pos"]), ("regression", ["score"]), ("token-classification", TAGS)],
)
def test_export_writes_the_hugging_face_layout(tmp_path_factory, task, labels):
    out = _export(tmp_path_factory, task=task, labels=labels)
    assert {p.name for p in out.iterdir()} == {
        "onnx",
        "manifest.json",
        "README.md",
        "tokenizer.json",
        CONFIG_FILE,
        TOKENIZER_CONFIG_FILE,
        SPECIAL_TOKENS_FILE,
    }
    assert {p.name for p in (out / "onnx").iterdir()} == {"model.onnx"}
    config = json.loads((out / CONFIG_FILE).read_text())
    head = "TokenClassification" if task == "token-classification" else "SequenceClassification"
    assert config["model_type"] == "bert" and config["architectures"] == [f"BertFor{head}"]
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["label2id"] == {name: i for i, name in enumerate(labels)}
    assert config.get("problem_type") == {
        "classification": "single_label_classification",
        "regression": "regression",
    }.get(task)
    tok = json.loads((out / TOKENIZER_CONFIG_FILE).read_text())
    assert tok["model_max_length"] == 16
    assert tok["model_input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    special = {
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
    }
    assert json.loads((out / SPECIAL_TOKENS_FILE).read_text()) == special
    assert {k: tok[k] for k in special} == special


def test_transformers_python_reads_the_tokenizer_as_our_runtime_does(exports):
    from transformers import AutoTokenizer

    out = exports("portable")
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="np")
    feed = _feed(out)
    assert sorted(enc.keys()) == sorted(feed)
    for name in feed:
        np.testing.assert_array_equal(enc[name], feed[name])


def test_runtime_still_reads_the_old_layout(exports, tmp_path):
    """Exports made before onnx/ (model.onnx beside manifest.json) load as before."""
    import shutil

    old = tmp_path / "old"
    new = exports("portable")
    old.mkdir()
    for name in ("manifest.json", "tokenizer.json"):
        shutil.copy(new / name, old / name)
    shutil.copy(new / "onnx" / "model.onnx", old / "model.onnx")
    np.testing.assert_array_equal(
        Predictor.from_dir(old).predict_logits(TEXTS), Predictor.from_dir(new).predict_logits(TEXTS)
    )


def test_ort_format_writes_the_operator_config_of_the_graph(exports):
    out = exports("ort-cpu")
    config = (out / "onnx" / OPS_CONFIG_FILE).read_text()
    assert f"# - {ORT_FILE}" in config
    assert "com.microsoft;1;" in config and "MatMulNBits" in config
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sizes"][f"onnx/{ORT_FILE}"] == (out / "onnx" / ORT_FILE).stat().st_size


def _quickstart_export():
    """The quickstart's real MiniLM export (CI runs scripts/quickstart.sh before the tests)."""
    import os
    from pathlib import Path

    out = Path(os.environ.get("MPISMOE_QUICKSTART_EXPORT", Path(__file__).parents[1] / "runs" / "default" / "onnx"))
    if not (out / "manifest.json").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"no quickstart export at {out}; CI runs scripts/quickstart.sh first")
        pytest.skip(f"no quickstart export at {out} (run scripts/quickstart.sh)")
    return out


@pytest.mark.slow
def test_real_minilm_export_runs_in_transformers_js_openvino_and_ort_mobile(tmp_path):
    """The quickstart's 4-bit MiniLM: the same logits and labels in transformers.js's pipeline,
    OpenVINO (functions inlined) and ONNX Runtime Mobile's .ort, which stays under 1.1x the .onnx."""
    import onnx

    from mpismoe_edge.export.ort_format import write_ort
    from mpismoe_edge.export.pipeline import inline_functions

    for client in ("transformers.js", "openvino"):
        require(client)
    out = _quickstart_export()
    texts = ["I love my new self-driving car", "autonomous cars scare me", "the bus was late again today"]
    predictor = Predictor.from_dir(out)
    feed = predictor.encoder.encode(texts).arrays()
    model = find_model(out)
    ref = run_onnxruntime(model, feed)

    reply = run_js(
        {"client": "transformers.js", "dir": str(out), "task": "text-classification", "texts": texts}, tmp_path
    )
    np.testing.assert_array_equal(array(reply["input_ids"]), feed["input_ids"])
    np.testing.assert_allclose(array(reply["logits"]), ref, atol=ATOL, rtol=0)
    assert [r[0]["label"] for r in reply["pipeline"]] == [p["label"] for p in predictor.predict(texts)]

    inlined = tmp_path / "inlined.onnx"
    onnx.save(inline_functions(onnx.load(model)), inlined)
    np.testing.assert_allclose(run_openvino(inlined, feed), ref, atol=ATOL, rtol=0)

    copy = tmp_path / "mobile" / "model.onnx"
    copy.parent.mkdir()
    copy.write_bytes(model.read_bytes())
    ort_path, _ = write_ort(copy)
    assert ort_path.stat().st_size <= 1.1 * model.stat().st_size
    np.testing.assert_allclose(run_onnxruntime(ort_path, feed), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_inline_functions_writes_standard_ops_with_the_same_logits(exports, target):
    import onnx

    out, inlined = exports(target), exports(target, inline=True)
    proto = onnx.load(find_model(inlined))
    assert not proto.functions
    assert {n.domain for n in proto.graph.node} <= {"", "com.microsoft"}
    assert "CastLike" not in {n.op_type for n in proto.graph.node}  # ORT has no kernel: it would not fold it
    assert json.loads((inlined / "manifest.json").read_text())["inlined_functions"] is True
    feed = _feed(out)
    np.testing.assert_allclose(
        run_onnxruntime(find_model(inlined), feed), run_onnxruntime(find_model(out), feed), atol=1e-6, rtol=0
    )


def test_cli_writes_inlined_graph_and_ort_file(tiny_checkpoint, tmp_path, capsys):
    from mpismoe_edge.export import cli

    out = tmp_path / "out"
    assert (
        cli.main([str(tiny_checkpoint), "-o", str(out), "--inline-functions", "--ort-format", "--no-validate", "-q"])
        == 0
    )
    assert {p.name for p in (out / "onnx").iterdir()} == {"model.onnx", ORT_FILE, OPS_CONFIG_FILE}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inlined_functions"] is True and manifest["model"] == "onnx/model.onnx"
    assert set(manifest["sizes"]) >= {"onnx/model.onnx", f"onnx/{ORT_FILE}", f"onnx/{OPS_CONFIG_FILE}"}
