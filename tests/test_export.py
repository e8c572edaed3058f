"""End-to-end export: tiny MP-ISMoE checkpoint -> ONNX (both targets), parity, determinism, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_backbone, tiny_tokenizer
from onnx import numpy_helper

from mpismoe_edge.export import cli, lower, pipeline
from mpismoe_edge.export.fuse import fuse

BITS_MAP = {
    "encoder.layer.0.attention.*": 3,
    "encoder.layer.0.intermediate.dense": 2,
    "encoder.layer.1.output.dense": 8,
}


def _build(seed: int = 1):
    """Tiny model, mixed 2/3/4/8-bit backbone, packed 4-bit experts.

    The backbone's LayerNorm affine parameters are randomized: fresh ones (gamma 1, beta 0)
    give every token the same hidden-state norm, a degenerate case for the router's saliency
    (a hard top-m pick on such ties once broke parity); real backbones are not like that.
    """
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.model import build_model

    backbone = tiny_backbone("bert")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in backbone.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.5)
    side = SideConfig(reduction=4, num_heads=2, num_experts=4, top_k=2, expert_bits=4, expert_group_size=16)
    quant = QuantConfig(bits=4, group_size=32, method="rtn", bits_map=dict(BITS_MAP))
    config = ModelConfig(backbone="tiny-bert", labels=["neg", "neu", "pos"], max_length=16, side=side, quant=quant)
    model = build_model(backbone, config, tiny_tokenizer().to_str(), progress=False)
    model.pack_experts()
    # RTN gives integer zero points; GNP-IQ's are fractional below 8 bits. Have both kinds.
    from mpismoe_edge.quant.linear import QuantLinear

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear) and mod.bits < 8 and (".layer.1." in name or "experts.0." in name):
                mod.zeros.add_(torch.rand(mod.zeros.shape, generator=gen) - 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mpismoe_edge.model import save_checkpoint

    path = tmp_path_factory.mktemp("export-ckpt") / "model.pt"
    save_checkpoint(_build(), path)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    from mpismoe_edge.model import load_checkpoint

    return load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def portable(model):
    """The portable ONNX proto of ``model`` (one real torch.onnx export for the module)."""
    return lower.to_onnx(model)


@pytest.fixture
def cached_export(monkeypatch, portable):
    """Make export_model reuse the module's portable proto instead of re-tracing."""
    monkeypatch.setattr(pipeline, "to_onnx", lambda m, opset=18: copy.deepcopy(portable))


def _session(path_or_proto):
    src = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def _ops(proto):
    return {(n.domain, n.op_type) for n in proto.graph.node}


def test_portable_graph_structure(portable, model):
    assert portable.ir_version == 10
    assert {i.domain: i.version for i in portable.opset_import} == {"": 18, "ai.mpismoe": 1}
    assert sorted(f.name for f in portable.functions) == ["MaskedAttention", "QGather", "QMatMul", "TopKRoute"]
    assert all(f.domain == "ai.mpismoe" for f in portable.functions)
    # every function body is standard ONNX only
    assert {n.domain for f in portable.functions for n in f.node} == {""}
    assert {d for d, _ in _ops(portable)} == {"", "ai.mpismoe"}
    names = [i.name for i in portable.graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    for i in portable.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in portable.graph.output] == ["logits"]
    # no exporter stack traces (file paths) left in the graph
    assert not any(n.metadata_props for n in portable.graph.node)
    onnx.checker.check_model(portable, full_check=True)


def test_every_expert_is_in_the_graph(portable, model):
    """The experts are exported stacked (one wide FFN per layer): each expert's packed weights,
    scales, zero points and biases are its slice of the stacked initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in portable.graph.initializer}
    for b, moe in enumerate(model.side.moe_layers()):
        for e, expert in enumerate(moe.experts):
            hidden = expert.fc1.out_features
            for part in ("qweight", "scales", "zeros"):
                fc1 = inits[f"side.blocks.{b}.ffn.stacked_fc1_{part}"]
                np.testing.assert_array_equal(fc1[e * hidden : (e + 1) * hidden], getattr(expert.fc1, part).numpy())
                fc2 = inits[f"side.blocks.{b}.ffn.stacked_fc2_{part}"]
                blocks = getattr(expert.fc2, part).shape[1]
                np.testing.assert_array_equal(fc2[:, e * blocks : (e + 1) * blocks], getattr(expert.fc2, part).numpy())
            np.testing.assert_array_equal(
                inits[f"side.blocks.{b}.ffn.stacked_fc1_bias"][e * hidden : (e + 1) * hidden], expert.fc1.bias.numpy()
            )
            np.testing.assert_array_equal(inits[f"side.blocks.{b}.ffn.stacked_fc2_bias"][e], expert.fc2.bias.numpy())


def test_stacked_experts_are_not_saved_in_the_checkpoint(model):
    assert not any("stacked_" in k for k in model.state_dict())


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_forcing_each_expert_matches_torch(portable, model, target):
    """Push one expert to the top of every token's routing via the router bias, in both worlds."""
    proto = copy.deepcopy(portable)
    if target != "portable":
        proto, _ = fuse(proto, target)
    inits = {t.name: t for t in proto.graph.initializer}
    feed = lower.make_inputs(model, 3, 9, lengths=[9, 6, 2], seed=5)
    moe = model.side.moe_layers()[0]
    name = "side.blocks.0.ffn.router.gate.bias"
    saved = moe.router.gate.bias.detach().clone()
    try:
        outs = []
        for e in range(len(moe.experts)):
            bias = saved.clone()
            bias[e] += 50.0
            with torch.no_grad():
                moe.router.gate.bias.copy_(bias)
                ref = model(**feed).numpy()
            inits[name].CopyFrom(numpy_helper.from_array(bias.numpy(), name))
            got = _session(proto).run(None, {k: v.numpy() for k, v in feed.items()})[0]
            np.testing.assert_allclose(got, ref, atol=1e-4)
            outs.append(ref)
        # the experts really differ, so each run exercised a different expert
        assert all(not np.allclose(outs[0], o, atol=1e-4) for o in outs[1:])
    finally:
        with torch.no_grad():
            moe.router.gate.bias.copy_(saved)


@pytest.mark.parametrize("target", ["portable", "ort-cpu", "ort-cuda"])
def test_export_model_targets_parity(model, cached_export, tmp_path, target):
    out = tmp_path / "out"
    manifest = pipeline.export_model(model, out, target=target, log=None)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "manifest.json",
        "onnx",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model.onnx"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    par = manifest["parity"]
    assert par["passed"] and par["max_abs_diff"] <= 1e-4
    cases = {(c["batch"], c["padded"]) for c in par["cases"]}
    assert {(1, False), (1, True), (7, False), (7, True)} <= cases
    proto = onnx.load(out / "onnx" / "model.onnx")
    ops = _ops(proto)
    if target == "portable":
        assert ("com.microsoft", "MatMulNBits") not in ops
    else:
        assert ("com.microsoft", "MatMulNBits") in ops
        assert ("ai.mpismoe", "QMatMul") in ops  # the 3-bit layers keep the portable function
    if target == "ort-cpu":
        assert manifest["fusion"]["matmulnbits_2bit"] and manifest["fusion"]["matmulnbits_8bit"]
        assert manifest["fusion"]["zero_points_uint8"] and manifest["fusion"]["zero_points_shift"]
    if target == "ort-cuda":
        assert manifest["fusion"]["portable_2bit"]
    assert manifest["format"] == "mpismoe-edge-onnx/1"
    assert manifest["task"] == "classification" and manifest["labels"] == ["neg", "neu", "pos"]
    assert manifest["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and manifest["outputs"] == ["logits"]
    assert manifest["target"] == target and manifest["opset"] == 18 and manifest["max_length"] == 16
    assert manifest["bits"]["backbone.encoder.layer.0.attention.self.query"] == 3
    assert manifest["bits"]["backbone.encoder.layer.0.intermediate.dense"] == 2
    assert manifest["bits"]["backbone.encoder.layer.1.output.dense"] == 8
    assert manifest["bits"]["side.blocks.1.ffn.experts.3.fc2"] == 4
    assert "backbone.pooler.dense" not in manifest["bits"]  # quantized, but unused, so not exported
    assert manifest["sizes"]["onnx/model.onnx"] == (out / "onnx" / "model.onnx").stat().st_size
    assert manifest["sizes"]["packed_codes"] > 0


@pytest.mark.parametrize("target", ["ort-cpu", "ort-cuda"])
def test_ort_targets_fuse_every_exact_gelu(portable, model, target):
    """Each erf GELU (backbone FFNs, experts, head) becomes one com.microsoft.Gelu; outputs unchanged."""
    erfs = sum(n.op_type == "Erf" for n in portable.graph.node)
    assert erfs > 0
    proto, stats = fuse(copy.deepcopy(portable), target)
    assert stats["gelu"] == erfs
    assert not any(n.op_type == "Erf" for n in proto.graph.node)
    assert sum(n.op_type == "Gelu" and n.domain == "com.microsoft" for n in proto.graph.node) == erfs
    assert [i.name for i in proto.graph.input] == [i.name for i in portable.graph.input]
    onnx.checker.check_model(proto, full_check=True)
    feed = {k: v.numpy() for k, v in lower.make_inputs(model, 3, 11, lengths=[11, 7, 3], seed=2).items()}
    np.testing.assert_allclose(_session(proto).run(None, feed)[0], _session(portable).run(None, feed)[0], atol=1e-5)


def test_runtime_reads_the_export(model, cached_export, tmp_path):
    runtime = pytest.importorskip("mpismoe_edge.runtime.session")
    out = tmp_path / "out"
    pipeline.export_model(model, out, target="ort-cpu", log=None, validate=False)
    pred = runtime.Predictor.from_dir(out)
    res = pred.predict(["i love this movie", "awful"])
    assert [r["label"] in ("neg", "neu", "pos") for r in res] == [True, True]


def test_parity_failure_writes_nothing_and_keeps_old_output(model, cached_export, tmp_path):
    out = tmp_path / "out"
    pipeline.export_model(model, out, log=None, validate=False)

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.raises(pipeline.ParityError):
        pipeline.export_model(model, out, target="ort-cpu", atol=0.0, log=None)
    assert files() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind


def test_replaces_previous_export_atomically(model, cached_export, tmp_path):
    out = tmp_path / "out"
    pipeline.export_model(model, out, log=None, validate=False)
    m2 = pipeline.export_model(model, out, target="ort-cpu", log=None, validate=False)
    assert json.loads((out / "manifest.json").read_text())["target"] == "ort-cpu" == m2["target"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_external_data(model, cached_export, tmp_path):
    out = tmp_path / "out"
    manifest = pipeline.export_model(model, out, log=None, external_data=True, validate=False)
    assert (out / "onnx" / "model.onnx.data").is_file() and manifest["sizes"]["onnx/model.onnx.data"] > 0
    graph_only = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    inline = [
        t.name
        for t in graph_only.graph.initializer
        if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) >= 1024
    ]
    assert inline == []  # every initializer of 1 KiB or more lives in the data file
    feed = lower.make_inputs(model, 2, 7, lengths=[7, 3])
    with torch.no_grad():
        ref = model(**feed).numpy()
    got = _session(out / "onnx" / "model.onnx").run(None, {k: v.numpy() for k, v in feed.items()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.slow
def test_deterministic_bytes(ckpt, portable):
    """A fresh load and export of the same checkpoint gives byte-identical model.onnx."""
    from mpismoe_edge.model import load_checkpoint

    again = lower.to_onnx(load_checkpoint(ckpt))
    assert again.SerializeToString() == portable.SerializeToString()
    a, _ = fuse(copy.deepcopy(portable), "ort-cpu")
    b, _ = fuse(copy.deepcopy(again), "ort-cpu")
    assert a.SerializeToString() == b.SerializeToString()


# ---------------------------------------------------------------- CLI


def _cli(args, capsys):
    code = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.slow
@pytest.mark.parametrize("which,target", [("mixed-bits", "ort-cpu"), ("shared-fixture", "portable")])
def test_cli_end_to_end(which, target, ckpt, tiny_checkpoint, tmp_path, capsys):
    """The real thing: load, trace, fuse, validate, write (no cached proto)."""
    src = ckpt if which == "mixed-bits" else tiny_checkpoint
    out = tmp_path / "nested" / "out"
    code, stdout, err = _cli([src, "-o", out, "--target", target], capsys)
    assert code == 0, err
    assert "ok:" in stdout and "parity batch=7" in err and "max abs diff" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["target"] == target
    assert (out / "tokenizer.json").read_text() == tiny_tokenizer().to_str()


def test_cli_no_validate(ckpt, tmp_path, capsys, monkeypatch, portable):
    monkeypatch.setattr(pipeline, "to_onnx", lambda m, opset=18: copy.deepcopy(portable))
    out = tmp_path / "out"
    code, stdout, _ = _cli([ckpt, "-o", out, "--no-validate", "-q"], capsys)
    assert code == 0 and "not validated" in stdout
    assert json.loads((out / "manifest.json").read_text())["parity"] is None


def _evil_pickle(path: Path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path.write_bytes(pickle.dumps({"format": "mpismoe-edge/1", "x": Evil()}))


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "truncated",
        "garbage",
        "pickle-code",
        "foreign",
        "target",
        "opset",
        "atol",
        "accuracy-level",
        "out-is-file",
        "out-foreign-dir",
    ],
)
def test_cli_errors_exit_2_and_write_nothing(case, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    src = ckpt
    extra: list = []
    if case == "missing":
        src = tmp_path / "nope.pt"
    elif case == "truncated":
        src = tmp_path / "t.pt"
        src.write_bytes(ckpt.read_bytes()[:2000])
    elif case == "garbage":
        src = tmp_path / "g.pt"
        src.write_bytes(b"not a checkpoint at all")
    elif case == "pickle-code":
        src = tmp_path / "evil.pt"
        _evil_pickle(src)
    elif case == "foreign":
        src = tmp_path / "other.pt"
        torch.save({"weights": torch.zeros(2)}, src)
    elif case == "target":
        extra = ["--target", "tensorrt"]
    elif case == "opset":
        extra = ["--opset", "17"]
    elif case == "atol":
        extra = ["--atol", "-1"]
    elif case == "accuracy-level":
        extra = ["--accuracy-level", "7"]
    elif case == "out-is-file":
        out.write_text("x")
    elif case == "out-foreign-dir":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _cli([src, "-o", out, *extra], capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp dirs
    if case == "pickle-code":
        assert "pwned" not in stdout
    if case == "out-foreign-dir":
        assert (out / "notes.txt").read_text() == "mine"


def test_export_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and "1  the export ran and failed" in out and "2  bad input" in out


# ---------------------------------------------------------------- staging folders of killed exports

_STAGE = """
import os, sys
from pathlib import Path
from mpismoe_edge.export.output import commit, staging_dir
out = Path(sys.argv[1])
with staging_dir(out) as tmp:
    (tmp / "manifest.json").write_text('{"format": "mpismoe-edge-onnx/1"}')
    print(tmp, flush=True)
    if sys.argv[2] == "die":
        os._exit(0)  # as kill -9: no cleanup runs
    sys.stdin.readline()  # wait until told to finish
    commit(tmp, out)
"""


def _staging(out):
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(model, cached_export, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", _STAGE, str(out), "die"], check=True, capture_output=True, timeout=120)
    assert len(_staging(out)) == 1 and not out.exists()  # what a killed export leaves
    pipeline.export_model(model, out, log=None, validate=False)
    assert _staging(out) == [] and json.loads((out / "manifest.json").read_text())["format"].startswith("mpismoe")


@pytest.mark.slow
def test_a_live_exports_staging_folder_is_kept_and_both_exports_finish(model, cached_export, tmp_path):
    out = tmp_path / "out"
    other = subprocess.Popen(
        [sys.executable, "-c", _STAGE, str(out), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        theirs = Path(other.stdout.readline().strip())
        pipeline.export_model(model, out, log=None, validate=False)
        assert theirs.is_dir() and (theirs / "manifest.json").is_file()  # not taken for a dead export's
        other.stdin.write("go\n")
        other.stdin.flush()
        assert other.wait(timeout=120) == 0
    finally:
        other.kill()
    assert _staging(out) == [] and json.loads((out / "manifest.json").read_text())["format"].startswith("mpismoe")


@pytest.mark.parametrize(
    "name, age_hours, removed",
    [
        (".out.tmp-abcd1234", 25, True),  # the older unnamed form, untouched for a day
        (".out.tmp-abcd1234", 1, False),  # ... but recent: it may be live
        (".out.tmp-1@elsewhere-abcd1234", 1, False),  # another host's: its pid says nothing here
        (".out.tmp-1@elsewhere-abcd1234", 25, True),
        (".other.tmp-abcd1234", 25, False),  # another output's
        (".out.old-abcd1234", 25, False),  # a replaced export being deleted: not a staging folder
    ],
)
def test_an_unattributable_staging_folder_is_removed_by_age_only(tmp_path, name, age_hours, removed):
    from mpismoe_edge.export.output import remove_stale_staging

    folder = tmp_path / name
    folder.mkdir()
    past = time.time() - age_hours * 3600
    os.utime(folder, (past, past))
    assert remove_stale_staging(tmp_path / "out") == ([folder] if removed else [])
    assert folder.exists() != removed


@pytest.mark.parametrize("max_length", [16, 64, 128, 512])
def test_validation_runs_the_models_max_length_padded_and_unpadded(max_length):
    from types import SimpleNamespace

    from mpismoe_edge.export.validate import default_cases

    fake = SimpleNamespace(config=SimpleNamespace(max_length=max_length), input_names=["input_ids"])
    cases = default_cases(fake)
    full = [c for c in cases if c.seq == max_length]
    assert any(not c.padded for c in full) and any(c.padded for c in full)
    assert min(c.seq for c in cases) <= 5  # short sequences stay


def test_float_layers_on_a_float_exact_target_are_refused_before_any_work(model, tmp_path):
    from mpismoe_edge.export.pipeline import export_model

    with pytest.raises(ValueError, match="ort-int8 option"):
        export_model(model, tmp_path / "out", target="portable", float_layers=["encoder.layer.0.output.dense"])
    assert not (tmp_path / "out").exists()
