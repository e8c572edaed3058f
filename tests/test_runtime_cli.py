"""``mpismoe-run``: JSON lines out, one clear ``error: ...`` (exit 2, nothing printed) on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run_cli(*args, stdin: bytes | None = None):
    return subprocess.run(
        [sys.executable, "-m", "mpismoe_edge.runtime.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=120,
    )


def test_texts_give_one_json_line_each_as_the_predictor_does(model_dir, predictor):
    r = run_cli(model_dir, "--text", "great phone", "--text", "awful battery", "--batch-size", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["index"] for x in lines] == [0, 1]
    for got, exp in zip(lines, predictor.predict(["great phone", "awful battery"])):
        assert got["label"] == exp["label"]
        assert got["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-6)


@pytest.fixture
def jsonl(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "good phone", "id": 7}\n\n{"text": "bad"}\n{"text": "' + "good " * 50 + '"}\n')
    return f


def test_jsonl_lines_keep_their_index_and_line_number(model_dir, jsonl):
    r = run_cli(model_dir, "--input", jsonl, "--provider", "auto", "--threads", "1")
    assert r.returncode == 0, r.stderr.decode()
    lines = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [(x["index"], x["line"]) for x in lines] == [(0, 1), (1, 3), (2, 4)]


def test_a_truncated_text_is_flagged_and_warned_about(model_dir, jsonl):
    r = run_cli(model_dir, "--input", jsonl)
    assert [json.loads(x)["truncated"] for x in r.stdout.decode().splitlines()] == [False, False, True]
    assert r.stderr.decode().startswith("warning: 1 of 3")


def test_stdin_reads_as_the_file_does(model_dir, jsonl):
    r, r2 = run_cli(model_dir, "--input", jsonl), run_cli(model_dir, "--input", "-", stdin=jsonl.read_bytes())
    assert r2.returncode == 0 and r2.stdout == r.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not valid UTF-8"),
        (b'{"text": "ok"}\n["text"]\n', "line 2: expected a JSON object"),
        (b'{"text": "ok"}\n\n{"txt": "x"}\n', "line 3: 'text' missing"),
        (b'{"text": 5}\n', "line 1: 'text' must be a string, got int"),
        (b'{"text": "ok"\n', "line 1: not valid JSON"),
        (b"\n\n", "holds no rows"),
    ],
    ids=["utf8", "not-object", "no-text", "text-not-str", "json", "empty"],
)
def test_a_bad_jsonl_line_is_named_and_nothing_is_printed(model_dir, tmp_path, content, message):
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    r = run_cli(model_dir, "--input", f)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "--text", "x"], "error: model directory not found"),
        (["{model}", "--input", "{tmp}/nope.jsonl"], "error: data file not found"),
        (["{model}", "--text", "x", "--batch-size", "0"], "error: --batch-size must be a positive integer, got 0"),
        (["{model}", "--text", "x", "--threads", "0"], "error: --threads must be a positive integer, got 0"),
        (["{model}"], "one of the arguments --text --input is required"),
    ],
    ids=["no-model", "no-input-file", "batch-size", "threads", "no-source"],
)
def test_a_bad_argument_exits_2_with_one_error(model_dir, tmp_path, args, message):
    fill = {"missing": tmp_path / "missing", "model": model_dir, "tmp": tmp_path}
    r = run_cli(*[a.format(**fill) for a in args])
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and message in err and "Traceback" not in err


def test_a_csv_input_reads_its_text_column(model_dir, tmp_path, jsonl):
    f = tmp_path / "in.csv"
    f.write_text('text,id\ngood phone,7\nbad,8\n"' + "good " * 50 + '",9\n')
    r, ref = run_cli(model_dir, "--input", f), run_cli(model_dir, "--input", jsonl)
    assert r.returncode == 0, r.stderr.decode()
    strip = [{k: v for k, v in json.loads(x).items() if k != "line"} for x in r.stdout.decode().splitlines()]
    assert strip == [{k: v for k, v in json.loads(x).items() if k != "line"} for x in ref.stdout.decode().splitlines()]


def test_a_line_that_is_not_json_says_the_input_format(model_dir, tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("text,label\ngreat phone,pos\n")
    err = run_cli(model_dir, "--input", f).stderr.decode()
    assert "in.txt line 1: not valid JSON" in err and "JSONL holds one JSON object per line" in err


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _link_tokenizer_out(out):
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to("/etc/passwd")


BROKEN = [
    ("truncated-model", lambda out: _truncate(out / "model.onnx"), "model.onnx: ONNX Runtime cannot load it"),
    ("corrupt-tokenizer", lambda out: _truncate(out / "tokenizer.json"), "tokenizer.json is not a readable"),
    ("tokenizer-links-out", _link_tokenizer_out, "tokenizer.json leads outside the export folder"),
]


@pytest.mark.parametrize("change, message", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_broken_export_file_is_one_error_line_naming_it_with_exit_2(tmp_path, change, message):
    from runtime_models import build_model_dir

    out = build_model_dir(tmp_path / "out")
    change(out)
    r = run_cli(out, "--text", "good")
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"", err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err


def test_help_documents_the_exit_codes():
    out = run_cli("--help").stdout.decode()
    assert "exit status:" in out and "0  " in out and "2  bad input" in out
