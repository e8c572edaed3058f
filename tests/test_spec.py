"""runtime/spec.py is the one home of the shared names: every side reads them from there."""

import pytest

from mpismoe_edge.runtime import spec


def test_each_export_target_is_one_record_that_the_export_side_reads():
    pytest.importorskip("onnx")
    from mpismoe_edge.export import rules
    from mpismoe_edge.export.fuse import INT8_TARGET, default_atol
    from mpismoe_edge.export.runtimes import TARGET_RUNTIMES

    assert tuple(spec.TARGET_SPECS) == spec.TARGETS and spec.DEFAULT_TARGET in spec.TARGETS
    for name, target in spec.TARGET_SPECS.items():
        assert all(hasattr(rules, f"{rule}_rules") for rule in target.rules)  # each names a rule set
        assert TARGET_RUNTIMES[name] == target.runtimes and default_atol(name) == target.atol
        assert spec.PARITY_BARS.get(name, spec.DEFAULT_PARITY_BARS) == target.parity_bars
    assert [name for name, t in spec.TARGET_SPECS.items() if t.int8] == [INT8_TARGET]


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
