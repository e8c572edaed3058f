"""The ort-int8 target: ORT's fused BERT backbone, int8 compute and weights, no float copy of a packed weight."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_model
from onnx import numpy_helper

from mpismoe_edge.export import cli, pipeline
from mpismoe_edge.export.fuse import default_atol
from mpismoe_edge.export.int8_target import unsupported
from mpismoe_edge.export.lower import make_inputs
from mpismoe_edge.runtime.spec import INT8_ATOL, MODEL_PATHS

pytestmark = pytest.mark.slow  # the int8 target exports the backbone twice (TorchScript + ORT optimizer)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_model()
    m.pack_experts()
    return m.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "out"
    manifest = pipeline.export_model(model, out, target="ort-int8", log=None)
    return out, manifest


def _session_ops(path, tmp_path) -> dict[str, int]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(so.optimized_model_filepath).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def _max_abs_diff(proto: onnx.ModelProto, model) -> float:
    """Max |logit difference| of ``proto`` on ONNX Runtime vs ``model`` on a padded batch."""
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = make_inputs(model, batch=3, seq=9, lengths=[9, 5, 2], seed=1)
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        return float(np.abs(got - model(**feed).numpy()).max())


def test_int8_export_passes_validation_at_the_int8_tolerance(exported):
    _, manifest = exported
    assert manifest["target"] == "ort-int8"
    assert manifest["parity"]["passed"] and manifest["parity"]["atol"] == INT8_ATOL == default_atol("ort-int8")
    assert default_atol("portable") == default_atol("ort-cpu") == 1e-4


def test_int8_backbone_is_fused_and_runs_int8_kernels(exported, tmp_path):
    out, manifest = exported
    fusion = manifest["fusion"]
    assert fusion["backbone_Attention"] == 2 and fusion["backbone_EmbedLayerNormalization"] == 1
    assert fusion["int8_layers"] == 2 * 4 and fusion["float_layers"] == 0  # qkv, attention output, FFN in and out
    ops = _session_ops(out / MODEL_PATHS[0], tmp_path)
    assert ops["QAttention"] == 2 and ops["DynamicQuantizeMatMul"] == 2 * 3
    # the 4-bit tables' rows are gathered per call from their codes
    assert "EmbedLayerNormalization" not in ops and ops["GatherBlockQuantized"] == 3


def _float_tables(proto: onnx.ModelProto, model) -> list[str]:
    """Float initializers as large as a backbone weight matrix or an embedding table."""
    hidden = model.backbone.config.hidden_size
    return [
        t.name
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and hidden in t.dims and min(t.dims) >= hidden
    ]


def test_int8_file_holds_int8_weights_and_the_packed_word_table_not_float_copies(exported, model):
    out, manifest = exported
    proto = onnx.load(str(out / MODEL_PATHS[0]))
    inits = {t.name: t for t in proto.graph.initializer}
    assert _float_tables(proto, model) == []
    assert inits["backbone.embeddings.word_embeddings.qweight"].data_type == onnx.TensorProto.UINT8
    layers, hidden = model.backbone.config.num_hidden_layers, model.backbone.config.hidden_size
    inner = model.backbone.config.intermediate_size
    assert manifest["sizes"]["int8_weights"] == layers * (4 * hidden * hidden + 2 * hidden * inner)
    packed = set(manifest["bits"])  # the layers whose codes the file holds: the tables, not the int8 layers
    assert "backbone.embeddings.word_embeddings" in packed and not any(n.startswith("backbone.encoder") for n in packed)


def test_session_load_folds_no_packed_weight_to_float(exported, model, tmp_path):
    out, _ = exported
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out / MODEL_PATHS[0]), so, providers=["CPUExecutionProvider"])
    assert _float_tables(onnx.load(so.optimized_model_filepath), model) == []


def test_float_layers_compute_from_their_packed_codes(model, tmp_path):
    from mpismoe_edge.export.int8_target import int8_model

    name = "encoder.layer.0.output.dense"
    proto, stats = int8_model(model, float_layers=[name])
    assert stats["int8_layers"] == 2 * 4 - 1 and stats["float_layers"] == 1
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and f"backbone.{name}.qweight" in n.input]
    assert len(nbits) == 1
    assert _max_abs_diff(proto, model) <= INT8_ATOL


def test_a_float_layer_that_is_no_backbone_matmul_is_refused(model):
    from mpismoe_edge.export.int8_target import int8_model

    with pytest.raises(ValueError, match="cannot keep"):
        int8_model(model, float_layers=["encoder.layer.0.attention.self.query"])


def test_int8_logits_agree_with_pytorch_on_padded_batches(exported, model):
    out, _ = exported
    sess = ort.InferenceSession(str(out / MODEL_PATHS[0]), providers=["CPUExecutionProvider"])
    feed = make_inputs(model, batch=6, seq=12, lengths=[12, 9, 4, 12, 2, 7], seed=3)
    got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    with torch.no_grad():
        ref = model(**feed).numpy()
    assert np.abs(got - ref).max() <= INT8_ATOL


def test_int8_reexport_is_byte_identical(exported, model, tmp_path):
    out, _ = exported
    pipeline.export_model(model, tmp_path / "again", target="ort-int8", log=None, validate=False)
    assert (tmp_path / "again" / MODEL_PATHS[0]).read_bytes() == (out / MODEL_PATHS[0]).read_bytes()


def test_every_expert_is_in_the_int8_graph(exported, model):
    out, _ = exported
    inits = {t.name: t for t in onnx.load(str(out / MODEL_PATHS[0])).graph.initializer}
    for i, block in enumerate(model.side.blocks):
        fc1 = numpy_helper.to_array(inits[f"side.blocks.{i}.ffn.stacked_fc1_qweight"])
        assert f"side.blocks.{i}.ffn.stacked_fc2_qweight" in inits
        assert fc1.shape[0] == len(block.ffn.experts) * block.ffn.experts[0].fc1.out_features


def test_int8_path_takes_quantized_bert_backbones_of_any_width():
    assert unsupported(tiny_model("bert")) is None
    assert unsupported(tiny_model("bert", bits=3)) is None
    assert "float" in unsupported(tiny_model("bert", bits=None))


def test_a_3_bit_backbone_gathers_its_tables_through_the_portable_function(tmp_path):
    from mpismoe_edge.export.int8_target import int8_model

    torch.manual_seed(0)
    model = tiny_model("bert", bits=3).eval()
    proto, stats = int8_model(model)
    assert sum(n.op_type == "QGather" for n in proto.graph.node) == 3 and stats["gathered_tables"] == 1
    assert _max_abs_diff(proto, model) <= INT8_ATOL


def test_int8_target_on_a_non_bert_backbone_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="BERT backbones only"):
        pipeline.export_model(tiny_model("distilbert"), tmp_path / "o", target="ort-int8", log=None)
    assert not (tmp_path / "o").exists()


def test_cli_exports_int8_on_request(tiny_checkpoint, tmp_path, capsys):
    code = cli.main([str(tiny_checkpoint), "-o", str(tmp_path / "o"), "--target", "ort-int8", "-q"])
    assert code == 0 and "target ort-int8" in capsys.readouterr().out


def test_cli_keeps_the_named_layers_in_float(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    args = [str(tiny_checkpoint), "-o", str(out), "--target", "ort-int8", "-q"]
    assert cli.main([*args, "--float-layers", "encoder.layer.0.output.dense"]) == 0
    fusion = json.loads((out / "manifest.json").read_text())["fusion"]
    assert fusion["float_layers"] == 1


def test_cli_refuses_float_layers_on_a_float_target_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    args = [
        str(tiny_checkpoint),
        "-o",
        str(out),
        "--target",
        "portable",
        "--float-layers",
        "encoder.layer.0.output.dense",
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--float-layers" in err and not out.exists()


def test_parity_gate_judges_an_int8_export_by_the_int8_bars(tiny_checkpoint, tiny_jsonl, tmp_path, capsys):
    from mpismoe_edge.parity import main as parity_main
    from mpismoe_edge.runtime.spec import PARITY_BARS

    out = tmp_path / "o"
    assert cli.main([str(tiny_checkpoint), "-o", str(out), "--target", "ort-int8", "-q"]) == 0
    capsys.readouterr()
    assert parity_main([str(tiny_checkpoint), str(out), "--data", str(tiny_jsonl), "--json"]) in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert (report["atol"], report["min_agreement"]) == PARITY_BARS["ort-int8"]
