"""mpismoe-parity: the PyTorch vs ONNX Runtime gate users run in their CI."""

import json
import shutil

import pytest

from mpismoe_edge.parity import main


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    from mpismoe_edge.export import export_model
    from mpismoe_edge.model import load_checkpoint

    out = tmp_path_factory.mktemp("onnx") / "out"
    export_model(load_checkpoint(tiny_checkpoint), out, target="ort-cpu", log=None)
    return out


@pytest.mark.slow
def test_parity_passes_on_a_faithful_export(tiny_checkpoint, exported, tiny_jsonl, capsys):
    assert main([str(tiny_checkpoint), str(exported), "--data", str(tiny_jsonl), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["label_agreement"] == 1.0
    assert report["reference_accuracy"] == report["candidate_accuracy"]


@pytest.mark.slow
def test_parity_fails_with_exit_1_when_a_bar_is_missed(tiny_checkpoint, exported, tiny_jsonl, capsys):
    assert main([str(tiny_checkpoint), str(exported), "--data", str(tiny_jsonl), "--atol", "-1"]) == 1
    assert "parity FAILED" in capsys.readouterr().err


def test_parity_reports_missing_export_with_exit_2(tiny_checkpoint, tmp_path, tiny_jsonl, capsys):
    assert main([str(tiny_checkpoint), str(tmp_path / "nope"), "--data", str(tiny_jsonl)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_parity_refuses_data_without_text(tiny_checkpoint, exported, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    assert main([str(tiny_checkpoint), str(exported), "--data", str(bad)]) == 2
    assert "bad.jsonl line 1: 'text' missing" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--batch-size", "--limit"])
def test_parity_refuses_a_non_positive_size_with_exit_2(tiny_checkpoint, exported, tiny_jsonl, capsys, flag):
    assert main([str(tiny_checkpoint), str(exported), "--data", str(tiny_jsonl), flag, "0"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {flag} must be a positive integer, got 0"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _link_out(out):
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to("/etc/passwd")


BROKEN = [
    ("truncated-model", lambda out: _truncate(out / "onnx" / "model.onnx"), "model.onnx: ONNX Runtime cannot load it"),
    ("corrupt-tokenizer", lambda out: _truncate(out / "tokenizer.json"), "tokenizer.json is not a readable"),
    ("tokenizer-links-out", _link_out, "tokenizer.json leads outside the export folder"),
    ("corrupt-checkpoint", None, "not an mpismoe-edge checkpoint"),
]


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_broken_file_is_one_error_line_naming_it_with_exit_2_not_a_parity_failure(
    tiny_checkpoint, exported, tiny_jsonl, tmp_path, capsys, change, message
):
    out, ckpt = tmp_path / "out", tmp_path / "model.pt"
    shutil.copytree(exported, out)
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    if change is None:
        _truncate(ckpt)
    else:
        change(out)
    assert main([str(ckpt), str(out), "--data", str(tiny_jsonl)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and "1  parity FAILED" in out and "2  bad input" in out
