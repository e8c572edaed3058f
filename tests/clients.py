"""The deploy clients the tests run an export in, each behind one function: feed -> logits.

A client missing here skips its tests with the reason; under CI (``CI=true``, set by .ci/run)
it fails them, so CI cannot pass without running every client (.ci/run installs them all).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mpismoe_edge.export.runtimes import OPENVINO_CONFIG

JS_DIR = Path(__file__).parent / "js"
BROWSER_DIR = Path(__file__).parent.parent / "examples" / "browser"  # the page, its packages and check_page.mjs
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
JS_PACKAGES = {
    "onnxruntime-node": "onnxruntime-node",
    "onnxruntime-web": "onnxruntime-web",
    "transformers.js": "@huggingface/transformers",
}


def _missing(client: str) -> str | None:
    """Why ``client`` cannot run here (None if it can)."""
    if client in JS_PACKAGES:
        if shutil.which("node") is None:
            return "node is not installed"
        if not (JS_DIR / "node_modules" / JS_PACKAGES[client]).is_dir():
            return f"{JS_PACKAGES[client]} is not installed (cd tests/js && npm ci)"
    elif client == "browser-page":
        if shutil.which("node") is None:
            return "node is not installed"
        if not Path(CHROMIUM).is_file():
            return f"{CHROMIUM} not found (apt-get install chromium)"
        for package in ("@huggingface/transformers", "puppeteer-core"):
            if not (BROWSER_DIR / "node_modules" / package).is_dir():
                return f"{package} is not installed (cd examples/browser && npm ci)"
    elif client == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "openvino is not installed (pip install openvino)"
    return None


def require(client: str) -> None:
    """Skip (locally) or fail (CI) unless ``client`` is installed."""
    reason = _missing(client)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{client}: {reason}; CI must run every deploy client")
        pytest.skip(f"{client}: {reason}")


def run_onnxruntime(model: Path, feed: dict[str, np.ndarray], output: str = "logits") -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run([output], feed)[0]


def run_reference(model: Path, feed: dict[str, np.ndarray], output: str = "logits") -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(model)).run([output], feed)[0]


def run_openvino(
    model: Path, feed: dict[str, np.ndarray], output: str = "logits", config=OPENVINO_CONFIG
) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(model), "CPU", dict(config))
    return np.asarray(compiled(feed)[compiled.output(output)])


def run_js(request: dict, tmp_path: Path) -> dict:
    """``node tests/js/run.mjs`` on ``request`` (see that file); returns its JSON reply."""
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request), encoding="utf-8")
    proc = subprocess.run(["node", str(JS_DIR / "run.mjs"), str(path)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"node {request['client']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def array(reply: dict) -> np.ndarray:
    return np.asarray(reply["data"], dtype=np.float32).reshape(reply["dims"])


def run_node_ort(client: str, model: Path, feed: dict[str, np.ndarray], tmp_path: Path) -> np.ndarray:
    request = {
        "client": client,
        "model": str(model),
        "feed": {k: {"dims": list(v.shape), "data": v.ravel().tolist()} for k, v in feed.items()},
    }
    return array(run_js(request, tmp_path)["logits"])
