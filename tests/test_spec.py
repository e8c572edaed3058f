"""runtime/spec.py is the one home of the shared names: every side reads them from there."""

import pytest

from mpismoe_edge.runtime import spec


def test_every_export_target_has_a_lowering_plan():
    pytest.importorskip("onnx")
    from mpismoe_edge.export.fuse import INT8_TARGET, TARGET_BITS
    from mpismoe_edge.export.runtimes import TARGET_RUNTIMES

    assert (*TARGET_BITS, INT8_TARGET) == spec.TARGETS and spec.DEFAULT_TARGET in spec.TARGETS
    assert tuple(TARGET_RUNTIMES) == spec.TARGETS


def test_the_export_cli_offers_the_targets_and_opset_of_the_spec():
    from mpismoe_edge.export.cli import build_parser

    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["target"].choices) == spec.TARGETS and actions["target"].default == spec.DEFAULT_TARGET
    assert actions["opset"].default == spec.MIN_OPSET


def test_an_export_directory_holds_only_the_spec_file_names():
    from mpismoe_edge.export.output import EXPORT_FILES

    assert EXPORT_FILES == {
        spec.MODEL_DIR,
        spec.CONFIG_FILE,
        spec.TOKENIZER_FILE,
        spec.TOKENIZER_CONFIG_FILE,
        spec.SPECIAL_TOKENS_FILE,
        spec.MANIFEST_FILE,
        spec.README_FILE,
        spec.MODEL_FILE,
        spec.DATA_FILE,
    }


def test_the_format_on_disk_is_mpismoe_edge_onnx_1():
    assert spec.FORMAT == "mpismoe-edge-onnx/1" == spec.FORMAT_PREFIX + str(spec.FORMAT_MAJOR)


def test_the_runtime_maps_every_graph_optimization_name():
    from mpismoe_edge.runtime.session import GRAPH_OPTIMIZATION

    assert tuple(GRAPH_OPTIMIZATION) == spec.GRAPH_OPTIMIZATIONS
