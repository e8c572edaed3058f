"""The browser page (examples/browser): ``serve.py`` serves a tiny export on 127.0.0.1 and
``check_page.mjs`` drives the page in headless Chromium (Debian's, via puppeteer-core), typing
texts and reading what the page shows. The page feeds the tokens our runtime feeds, its logits
match Python ONNX Runtime (atol 1e-4), it shows the same labels and probabilities (entities for
token classification, the number for regression) and its load and inference times, and it asks
for nothing outside its own server. serve.py's bad input is one error line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from clients import BROWSER_DIR, CHROMIUM, require, run_onnxruntime
from conftest import TEXTS, tiny_model

from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.manifest import find_model
from mpismoe_edge.runtime.text import TextEncoder

ATOL = 1e-4
PAGE_TEXTS = TEXTS[:3]
TAGS = ["O", "B-X", "I-X"]
SERVE = BROWSER_DIR / "serve.py"


def _export(tmp_path_factory, task, labels, **options):
    from mpismoe_edge.export import export_model

    model = tiny_model(task=task, labels=labels).eval()
    model.pack_experts()
    out = tmp_path_factory.mktemp("page") / f"tiny-{task}"
    export_model(model, out, validate=False, log=None, **options)
    return out


@contextmanager
def served(export):
    """``serve.py EXPORT --port 0`` running; yields the page's URL."""
    proc = subprocess.Popen(
        [sys.executable, str(SERVE), str(export), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # "serving http://127.0.0.1:PORT/ (...)" once it listens
        if not line.startswith("serving http://127.0.0.1:"):
            proc.kill()
            raise AssertionError(f"serve.py did not start: {line}{proc.stderr.read()}")
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def drive(url: str, texts: list[str]) -> dict:
    """``node check_page.mjs URL TEXT...``: what the page showed for each text (see that file)."""
    proc = subprocess.run(
        ["node", str(BROWSER_DIR / "check_page.mjs"), url, *texts],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CHROMIUM": CHROMIUM},
    )
    if proc.returncode != 0:
        raise AssertionError(f"check_page.mjs failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def _page(tmp_path_factory, task, labels):
    require("browser-page")
    out = _export(tmp_path_factory, task, labels)
    with served(out) as url:
        reply = drive(url, PAGE_TEXTS)
    return out, reply


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    return _page(tmp_path_factory, "classification", ("neg", "neu", "pos"))


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    return _page(tmp_path_factory, "regression", ("score",))


@pytest.fixture(scope="module")
def token_classification(tmp_path_factory):
    return _page(tmp_path_factory, "token-classification", TAGS)


def _reference(out, text) -> tuple[dict, np.ndarray]:
    """The feed our runtime builds for ``text`` alone, and Python ONNX Runtime's logits on it."""
    feed = TextEncoder(out / "tokenizer.json", 16).encode([text]).arrays()
    return feed, run_onnxruntime(find_model(out), feed)


def _logits(run) -> np.ndarray:
    return np.asarray(run["result"]["logits"]["data"], dtype=np.float32).reshape(run["result"]["logits"]["dims"])


@pytest.mark.slow
@pytest.mark.parametrize("page", ["classification", "regression", "token_classification"])
def test_page_fetches_nothing_outside_its_server_and_logs_no_error(page, request):
    _, reply = request.getfixturevalue(page)
    assert reply["offOrigin"] == []
    assert reply["console"] == []


@pytest.mark.slow
@pytest.mark.parametrize("page", ["classification", "regression", "token_classification"])
def test_page_feeds_our_tokens_and_its_logits_match_python_onnxruntime(page, request):
    out, reply = request.getfixturevalue(page)
    assert [run["text"] for run in reply["runs"]] == PAGE_TEXTS
    for run in reply["runs"]:
        feed, ref = _reference(out, run["text"])
        assert run["result"]["inputIds"] == feed["input_ids"].ravel().tolist()
        np.testing.assert_allclose(_logits(run), ref, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_page_reports_its_load_and_inference_times(classification):
    _, reply = classification
    assert reply["loadMs"] > 0
    assert all(run["result"]["inferenceMs"] > 0 for run in reply["runs"])


@pytest.mark.slow
def test_page_shows_every_label_with_the_probability_our_runtime_gives(classification):
    out, reply = classification
    for run, mine in zip(reply["runs"], Predictor.from_dir(out).predict(PAGE_TEXTS)):
        shown = run["shown"]
        assert shown[0]["label"] == mine["label"]  # the top row is the predicted label
        assert {row["label"]: pytest.approx(float(row["score"]), abs=ATOL) for row in shown} == mine["probabilities"]
        assert [row["text"] for row in shown] == [f"{row['label']} {float(row['score']):.4f}" for row in shown]


@pytest.mark.slow
def test_page_shows_the_regression_score_itself(regression):
    out, reply = regression
    scores = [r["score"] for r in Predictor.from_dir(out).predict(PAGE_TEXTS)]
    for run, score in zip(reply["runs"], scores):
        (shown,) = run["shown"]
        assert float(shown["score"]) == pytest.approx(score, abs=ATOL)
        assert shown["text"] == f"score: {float(shown['score']):.4f}"


@pytest.mark.slow
def test_page_highlights_the_entities_python_onnxruntime_finds(token_classification):
    out, reply = token_classification
    for run in reply["runs"]:
        feed, ref = _reference(out, run["text"])
        tokens = range(1, int(feed["attention_mask"].sum()) - 1)  # not [CLS], [SEP]
        want = [(j, TAGS[int(ref[0, j].argmax())]) for j in tokens if TAGS[int(ref[0, j].argmax())] != "O"]
        assert [(int(row["index"]), row["entity"]) for row in run["shown"]] == want
        for row in run["shown"]:
            probs = np.exp(ref[0, int(row["index"])]) / np.exp(ref[0, int(row["index"])]).sum()
            assert float(row["score"]) == pytest.approx(float(probs.max()), abs=ATOL)


def _layout(model_dir, tmp_path):
    """The hand-built tiny export (conftest ``model_dir``, the old layout) moved into Hugging Face's layout."""
    out = tmp_path / "export"
    shutil.copytree(model_dir, out)
    (out / "onnx").mkdir()
    (out / "model.onnx").rename(out / "onnx" / "model.onnx")
    for name in ("config.json", "tokenizer_config.json"):
        (out / name).write_text("{}")
    return out


def _edit_manifest(out, **fields):
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, **fields}))
    return out


def _with_file(out, name):
    (out / name).write_bytes(b"")
    return out


def _serve(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SERVE), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args,message",
    [
        (lambda dirs: [dirs["tmp"] / "missing"], "not an mpismoe-edge export"),
        (lambda dirs: [dirs["tmp"]], "not an mpismoe-edge export"),  # no manifest.json
        (lambda dirs: [dirs["old"]], "config.json, tokenizer_config.json, onnx/model.onnx missing"),
        (lambda dirs: [_edit_manifest(dirs["new"], inputs=["pixel_values"])], "the page runs text exports"),
        (
            lambda dirs: [_with_file(dirs["new"], "onnx/model.onnx.data")],
            "cannot read external weights",
        ),
        (lambda dirs: [dirs["new"], "--name", "a/b"], "model name 'a/b'"),
        (lambda dirs: [dirs["new"], "--node-modules", dirs["tmp"]], "@huggingface/transformers is not installed"),
    ],
    ids=["missing", "no-manifest", "old-layout", "image-export", "external-data", "bad-name", "no-node-modules"],
)
def test_serve_refuses_bad_input_with_one_error_line(args, message, model_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    dirs = {"tmp": tmp_path / "empty", "old": old, "new": _layout(model_dir, tmp_path)}
    dirs["tmp"].mkdir()
    proc = _serve(*args(dirs))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr


def test_serve_refuses_a_port_in_use(model_dir, tmp_path):
    require("browser-page")  # the port is taken only after the page's packages are found
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve(_layout(model_dir, tmp_path), "--port", taken.getsockname()[1])
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot listen on 127.0.0.1:") and "choose another --port" in proc.stderr
