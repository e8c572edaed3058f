"""Tests for mpismoe_edge.runtime on a tiny hand-built ONNX classifier (no torch needed).

The test model is embedding -> masked mean pool -> linear over input_ids/attention_mask/
token_type_ids, built with onnx.helper; the tokenizer is a tiny WordPiece made with `tokenizers`.
Only the tests import onnx; the runtime itself must not (checked below in a subprocess).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
tokenizers = pytest.importorskip("tokenizers")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import mpismoe_edge.runtime as rt  # noqa: E402
from mpismoe_edge.runtime import Predictor  # noqa: E402
from mpismoe_edge.runtime.session import ProviderFallbackWarning, TruncationWarning  # noqa: E402

LABELS = ["negative", "neutral", "positive"]
WORDS = ["the", "phone", "battery", "movie", "is", "was", "very", "not", "good", "great", "fine",
         "bad", "awful", "poor", "and", "but", "really", "##s", "##ly", ",", ".", "!"]
HIDDEN = 8
RUNTIME_DIR = Path(rt.__file__).parent


def make_tokenizer(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    # A fixed-length padding setting in tokenizer.json must not leak into the runtime.
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=40)
    tok.save(str(path))
    return tok


def make_weights(vocab_size: int, classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"emb": rng.normal(size=(vocab_size, HIDDEN)).astype(np.float32),
            "type_emb": rng.normal(size=(2, HIDDEN)).astype(np.float32),
            "W": rng.normal(size=(HIDDEN, classes)).astype(np.float32),
            "b": rng.normal(size=(classes,)).astype(np.float32)}


def make_model(path: Path, weights: dict, float_mask: bool = False, external: bool = False) -> None:
    classes = weights["W"].shape[1]
    mask_type = TensorProto.FLOAT if float_mask else TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", mask_type, ["batch", "seq"]),
              helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"])]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
              numpy_helper.from_array(np.array([1], np.int64), "axes_seq"),
              numpy_helper.from_array(np.array(1e-9, np.float32), "eps")]
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
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=64)
    else:
        onnx.save(model, str(path))


def build_model_dir(out: Path, task: str = "classification", max_length: int = 32,
                    float_mask: bool = False, external: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out / "tokenizer.json")
    classes = len(LABELS) if task == "classification" else 1
    make_model(out / "model.onnx", make_weights(tok.get_vocab_size(), classes), float_mask, external)
    manifest = {"format": "mpismoe-edge-onnx/1", "task": task, "max_length": max_length,
                "labels": LABELS if task == "classification" else None,
                "inputs": ["input_ids", "attention_mask", "token_type_ids"], "outputs": ["logits"],
                "target": "portable", "opset": 17, "bits": {"layer0": 4}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def reference_logits(model_dir: Path, texts: list[str], max_length: int) -> np.ndarray:
    """The same computation in numpy, one text at a time (no padding at all)."""
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    w = make_weights(tok.get_vocab_size(), len(LABELS))
    rows = []
    for t in texts:
        e = tok.encode(t)
        h = w["emb"][e.ids] + w["type_emb"][e.type_ids]
        rows.append(h.mean(0) @ w["W"] + w["b"])
    return np.stack(rows)


TEXTS = ["The phone is great!", "bad battery", "the movie was really, really awful but the phone "
         "was fine and the battery was good", "not good", "", "zzz unknown words"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("export") / "out")


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_dir(model_dir)


# ---- predictions -----------------------------------------------------------------------------

def test_predict_labels_and_probabilities(predictor, model_dir):
    results = predictor.predict(TEXTS)
    assert len(results) == len(TEXTS)
    logits = predictor.predict_logits(TEXTS)
    assert logits.shape == (len(TEXTS), len(LABELS)) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference_logits(model_dir, TEXTS, 32), atol=1e-5)
    for res, row in zip(results, logits):
        assert set(res) == {"label", "probabilities", "truncated"}
        assert list(res["probabilities"]) == LABELS
        assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert res["label"] == LABELS[int(row.argmax())]
        assert res["truncated"] is False
    assert predictor.provider == "cpu" and predictor.labels == LABELS
    assert "negative" in repr(predictor)


def test_single_string_is_one_text(predictor):
    assert len(predictor.predict("great phone")) == 1


def test_padding_invariance(predictor):
    alone = predictor.predict_logits(["bad battery"])
    longer = ["the movie was really really awful but the phone was fine " * 2, "bad battery",
              "the phone is good and the battery is very good"]
    for bs in (1, 2, 3, 32):
        batched = predictor.predict_logits(longer, batch_size=bs)
        np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)
        np.testing.assert_allclose(batched, predictor.predict_logits(longer, batch_size=1), atol=1e-5)


def test_truncation_flagged(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", max_length=8))
    long = "the phone is very very very good and the battery is fine"
    with pytest.warns(TruncationWarning, match="1 of 2"):
        res = p.predict([long, "bad"])
    assert res[0]["truncated"] is True and res[1]["truncated"] is False
    with pytest.warns(TruncationWarning):
        logits = p.predict_logits([long])
    np.testing.assert_allclose(logits, reference_logits(tmp_path / "out", [long], 8), atol=1e-5)


def test_regression_task(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", task="regression"))
    res = p.predict(["good", "bad phone"])
    assert all(set(r) == {"score", "truncated"} and isinstance(r["score"], float) for r in res)


def test_token_classification_needs_per_token_logits(tmp_path):
    out = build_model_dir(tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "task": "token-classification"}))
    p = Predictor.from_dir(out)
    assert p.task == "token-classification"
    with pytest.raises(ValueError, match=r"must return logits \[batch, seq, labels\] \(\[1, 4, labels\] here\), got \[1, 3\]"):
        p.predict(["good phone"])


def test_graph_optimization_and_threads_agree(model_dir, predictor):
    p = Predictor.from_dir(model_dir, threads=1, graph_optimization="disable")
    np.testing.assert_allclose(p.predict_logits(TEXTS), predictor.predict_logits(TEXTS), atol=1e-6)


def test_external_data_model(tmp_path):
    out = build_model_dir(tmp_path / "out", external=True)
    assert (out / "model.onnx.data").is_file()
    p = Predictor.from_dir(out)
    np.testing.assert_allclose(p.predict_logits(TEXTS), reference_logits(out, TEXTS, 32), atol=1e-5)


# ---- errors ----------------------------------------------------------------------------------

def test_empty_batch_and_bad_types(predictor):
    with pytest.raises(ValueError, match="empty batch"):
        predictor.predict([])
    with pytest.raises(ValueError, match="empty batch"):
        predictor.predict_logits(())
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        predictor.predict(["ok", None])
    with pytest.raises(TypeError):
        predictor.predict([1, 2])
    with pytest.raises(TypeError):
        predictor.predict(b"bytes")
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict(["ok"], batch_size=0)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "manifest.json", "model.onnx.data"])
def test_missing_files(tmp_path, name):
    out = build_model_dir(tmp_path / "out", external=name == "model.onnx.data")
    (out / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
        Predictor.from_dir(out)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Predictor.from_dir(tmp_path / "nope")


def test_bad_manifest_and_options(tmp_path, model_dir):
    out = build_model_dir(tmp_path / "out")
    (out / "manifest.json").write_text(json.dumps({"format": "mpismoe-edge-onnx/2"}))
    with pytest.raises(ValueError, match="unsupported format"):
        Predictor.from_dir(out)
    (out / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Predictor.from_dir(out)
    with pytest.raises(ValueError, match="provider"):
        Predictor.from_dir(model_dir, provider="tpu")
    with pytest.raises(ValueError, match="graph_optimization"):
        Predictor.from_dir(model_dir, graph_optimization="max")
    with pytest.raises(ValueError, match="threads"):
        Predictor.from_dir(model_dir, threads=0)


def _feed(predictor, texts):
    return predictor.encoder.encode(texts).arrays()


def test_run_arrays_matches_predict(predictor):
    texts = ["good phone", "awful battery and poor movie"]
    np.testing.assert_allclose(predictor.run_arrays(_feed(predictor, texts)),
                               predictor.predict_logits(texts), atol=1e-6)


def test_run_arrays_validation(predictor):
    good = _feed(predictor, ["good phone", "bad"])
    with pytest.raises(ValueError, match="missing \\['token_type_ids'\\].*input_ids: int64"):
        predictor.run_arrays({k: v for k, v in good.items() if k != "token_type_ids"})
    with pytest.raises(ValueError, match="unexpected \\['pixels'\\]"):
        predictor.run_arrays({**good, "pixels": good["input_ids"]})
    with pytest.raises(ValueError, match="input_ids has dtype int32, expected int64"):
        predictor.run_arrays({**good, "input_ids": good["input_ids"].astype(np.int32)})
    with pytest.raises(ValueError, match="rank"):
        predictor.run_arrays({**good, "attention_mask": good["attention_mask"][0]})
    with pytest.raises(ValueError, match="same dimension"):
        predictor.run_arrays({**good, "attention_mask": good["attention_mask"][:, :-1]})
    with pytest.raises(ValueError, match="empty batch"):
        predictor.run_arrays({k: v[:0] for k, v in good.items()})
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, "):
        predictor.run_arrays({**good, "input_ids": good["input_ids"] + 1000})
    with pytest.raises(TypeError, match="numpy array"):
        predictor.run_arrays({**good, "input_ids": good["input_ids"].tolist()})
    with pytest.raises(TypeError):
        predictor.run_arrays([good["input_ids"]])


def test_float_input_nan_rejected(tmp_path):
    p = Predictor.from_dir(build_model_dir(tmp_path / "out", float_mask=True))
    assert p.input_spec()["attention_mask"][0] == "float32"
    res = p.predict(["good phone", "bad"])  # text path casts the mask to float32 itself
    assert len(res) == 2
    feed = p.encoder.encode(["good phone"]).arrays()
    feed["attention_mask"] = feed["attention_mask"].astype(np.float32)
    p.run_arrays(feed)
    feed["attention_mask"][0, 0] = np.nan
    with pytest.raises(ValueError, match="attention_mask contains NaN"):
        p.run_arrays(feed)


# ---- threads ---------------------------------------------------------------------------------

def test_thread_safety(predictor):
    batches = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))]
    serial = [predictor.predict_logits(b, batch_size=2) for b in batches]
    results: dict[tuple[int, int], np.ndarray] = {}
    errors = []
    start = threading.Barrier(8)

    def work(tid):
        try:
            start.wait()
            for rep in range(20):
                k = (tid + rep) % len(batches)
                results[(tid, rep)] = (k, predictor.predict_logits(batches[k], batch_size=2))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 160
    for k, logits in results.values():
        np.testing.assert_array_equal(logits, serial[k])


# ---- CLI -------------------------------------------------------------------------------------

def run_cli(*args, stdin: bytes | None = None):
    return subprocess.run([sys.executable, "-m", "mpismoe_edge.runtime.cli", *map(str, args)],
                          input=stdin, capture_output=True, timeout=120)


def test_cli_text(model_dir, predictor):
    r = run_cli(model_dir, "--text", "great phone", "--text", "awful battery", "--batch-size", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["index"] for x in lines] == [0, 1]
    expected = predictor.predict(["great phone", "awful battery"])
    for got, exp in zip(lines, expected):
        assert got["label"] == exp["label"]
        assert got["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-6)


def test_cli_jsonl(model_dir, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "good phone", "id": 7}\n\n{"text": "bad"}\n{"text": "' + "good " * 50 + '"}\n')
    r = run_cli(model_dir, "--input", f, "--provider", "auto", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [(x["index"], x["line"]) for x in lines] == [(0, 1), (1, 3), (2, 4)]
    assert [x["truncated"] for x in lines] == [False, False, True]
    assert "warning: 1 of 3" in r.stderr.decode()
    r2 = run_cli(model_dir, "--input", "-", stdin=f.read_bytes())
    assert r2.returncode == 0 and r2.stdout == r.stdout


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not valid UTF-8"),
    (b'{"text": "ok"}\n["text"]\n', "line 2: expected a JSON object"),
    (b'{"text": "ok"}\n\n{"txt": "x"}\n', "line 3: 'text' missing"),
    (b'{"text": 5}\n', "line 1: 'text' must be a string, got int"),
    (b'{"text": "ok"\n', "line 1: not valid JSON"),
    (b"\n\n", "holds no rows"),
])
def test_cli_bad_jsonl(model_dir, tmp_path, content, message):
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    r = run_cli(model_dir, "--input", f)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_errors(model_dir, tmp_path):
    r = run_cli(tmp_path / "missing", "--text", "x")
    assert r.returncode == 2 and b"error: " in r.stderr and b"Traceback" not in r.stderr
    r = run_cli(model_dir, "--input", tmp_path / "nope.jsonl")
    assert r.returncode == 2 and b"data file not found" in r.stderr
    r = run_cli(model_dir, "--text", "x", "--batch-size", "0")
    assert r.returncode == 2 and b"--batch-size must be a positive integer" in r.stderr
    r = run_cli(model_dir)  # neither --text nor --input: argparse usage error
    assert r.returncode == 2 and b"Traceback" not in r.stderr


# ---- the runtime's import boundary -----------------------------------------------------------

ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers"}


def test_runtime_sources_import_only_allowed_modules():
    for src in sorted(RUNTIME_DIR.glob("*.py")):
        tree = ast.parse(src.read_text(), filename=str(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: stays inside the runtime package
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY, \
                    f"{src.name}:{node.lineno} imports {name}"


BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = ("torch", "transformers", "onnx", "onnxscript")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def test_runtime_runs_without_torch_transformers_onnx(model_dir, tmp_path):
    script = BLOCKER + textwrap.dedent(f"""
        import io, json, contextlib
        from mpismoe_edge.runtime import Predictor
        from mpismoe_edge.runtime.parity import compare_logits
        from mpismoe_edge.runtime.cli import run_main
        p = Predictor.from_dir({str(model_dir)!r}, provider="auto")
        logits = p.predict_logits(["good phone", "bad battery"])
        assert compare_logits(logits, logits).passed
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert run_main([{str(model_dir)!r}, "--text", "good"]) == 0
        assert json.loads(buf.getvalue())["label"]
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("OK", p.predict(["good phone"])[0]["label"])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK ")


def test_parity_module_needs_only_numpy(tmp_path):
    script = textwrap.dedent("""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("onnxruntime", "tokenizers", "torch", "onnx"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Blocker())
        import numpy as np
        from mpismoe_edge.runtime import compare_logits
        print(compare_logits(np.eye(3), np.eye(3)).passed)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


# ---- CUDA (skips unless a GPU and a working CUDA onnxruntime are present) --------------------

def test_cuda_provider(model_dir, predictor):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = Predictor.from_dir(model_dir, provider="cuda")
    if p.provider != "cuda":
        assert any(issubclass(w.category, ProviderFallbackWarning) for w in caught)
        pytest.skip("CUDA is not usable here; the CUDA request fell back to CPU with a warning")
    assert p.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(p.predict_logits(TEXTS), predictor.predict_logits(TEXTS), atol=1e-4)
    assert Predictor.from_dir(model_dir, provider="auto").provider == "cuda"


def test_auto_provider_falls_back_silently(model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = Predictor.from_dir(model_dir, provider="auto")
    assert p.provider in ("cpu", "cuda")
    assert p.predict(["good"])[0]["label"] in LABELS
