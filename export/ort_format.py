"""ONNX Runtime Mobile: ``model.ort`` + ``required_operators.config`` next to ``model.onnx``.

What ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does, with one change: the graph
is saved with optimizations disabled. The converter's default (all, constant folding included)
folds a portable export's dequantization into float weights (a 4-bit MiniLM became a 3.3x
larger ``.ort``); unoptimized, the ``.ort`` keeps the packed codes. ONNX Runtime runs an ``.ort``
as saved, so a portable export's ``.ort`` dequantizes its weights on every run (slower than the
``.onnx``, which ORT folds at load); an ort-cpu export's MatMulNBits read the packed codes
directly, so ``--target ort-cpu --ort-format`` is the mobile build that is both small and fast.
The config lists the operators a reduced-operator ONNX Runtime build needs
(``--include_ops_by_config``).
"""

from __future__ import annotations

from pathlib import Path

ORT_FILE = "model.ort"
OPS_CONFIG_FILE = "required_operators.config"


def write_ort(onnx_path: Path) -> list[Path]:
    """Convert ``onnx_path`` to ``model.ort`` and write its operator config beside it; returns both paths."""
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    onnx_path = Path(onnx_path)
    ort_path = onnx_path.with_name(ORT_FILE)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.optimized_model_filepath = str(ort_path)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    config_path = onnx_path.with_name(OPS_CONFIG_FILE)
    create_config_from_models([ort_path], config_path, enable_type_reduction=False)
    # the config's header names the model by its (temporary) absolute path; name it by file
    text = config_path.read_text(encoding="utf-8").replace(str(ort_path), ORT_FILE)
    config_path.write_text(text, encoding="utf-8")
    return [ort_path, config_path]
