"""The runtime's import boundary: numpy, onnxruntime and tokenizers only (no torch, transformers, onnx)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import mpismoe_edge.runtime as rt

RUNTIME_DIR = Path(rt.__file__).parent
ALLOWED_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers"}


# The task-kind records hold their training-side behaviour too (loss, targets, metrics): those
# methods import torch and the torch-side metrics when called, which the runtime never does
# (test_runtime_runs_without_torch_transformers_onnx blocks them and runs it).
TRAINING_SIDE = {"tasks.py": {"torch", "mpismoe_edge"}}


def _imports(tree: ast.AST, in_function: bool = False):
    """(node, names, inside a function body) of every absolute import in ``tree``."""
    for node in ast.iter_child_nodes(tree):
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if isinstance(node, ast.Import):
            yield node, [a.name for a in node.names], in_function
        elif isinstance(node, ast.ImportFrom) and not node.level:  # relative: inside the runtime package
            yield node, [node.module], in_function
        yield from _imports(node, inside)


def test_runtime_sources_import_only_allowed_modules():
    for src in sorted(RUNTIME_DIR.glob("*.py")):
        tree = ast.parse(src.read_text(), filename=str(src))
        for node, names, in_function in _imports(tree):
            for name in names:
                top = name.split(".")[0]
                allowed = top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY
                allowed = allowed or (in_function and top in TRAINING_SIDE.get(src.name, ()))
                assert allowed, f"{src.name}:{node.lineno} imports {name}"


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
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
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
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
