"""Several tasks on one backbone: the multi-task export (merged and split), its runtime and its CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TEXTS, tiny_model

from mpismoe_edge.export.cli import main as export_main
from mpismoe_edge.export.cli import task_checkpoints
from mpismoe_edge.export.multitask import check_task_names, export_tasks
from mpismoe_edge.model import save_checkpoint
from mpismoe_edge.runtime import Predictor
from mpismoe_edge.runtime.manifest import parse_manifest

KINDS = {
    "sentiment": {},
    "ner": {"task": "token-classification", "labels": ("O", "B-X", "I-X")},
    "rating": {"task": "regression", "labels": ("score",)},
}


def _models(**changes):
    models = {}
    for name, kw in KINDS.items():
        m = tiny_model(**{**kw, **changes.get(name, {})}).eval()
        m.pack_experts()
        models[name] = m
    return models


@pytest.fixture(scope="module")
def models():
    return _models()


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "merged"
    return out, export_tasks(models, out, log=None)


@pytest.fixture(scope="module")
def split(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("mt") / "split"
    return out, export_tasks(models, out, layout="split", log=None)


def test_models_on_different_backbones_are_one_error_naming_both():
    models = {"a": tiny_model(bits=4), "b": tiny_model(bits=8)}
    with pytest.raises(ValueError, match=r"a and b are trained on different backbones \(fingerprints sha256:"):
        export_tasks(models, "/nonexistent/never-written", log=None)


@pytest.mark.parametrize("names", [["a b"], ["1st"], ["ok", "ok"], ["a-b"], [""]])
def test_bad_task_names_are_refused(names):
    with pytest.raises(ValueError, match="task name"):
        check_task_names(names)


def test_a_task_is_named_after_its_run_folder_unless_named(tmp_path):
    (tmp_path / "sentiment").mkdir()
    (tmp_path / "sentiment" / "model.pt").write_bytes(b"")
    got = task_checkpoints([str(tmp_path / "sentiment" / "model.pt"), f"topic={tmp_path / 'x.pt'}"])
    assert list(got) == ["sentiment", "topic"]


def test_the_export_cli_names_both_checkpoints_whose_backbones_differ(tmp_path, capsys):
    for name, bits in (("a", 4), ("b", 8)):
        save_checkpoint(tiny_model(bits=bits), tmp_path / name / "model.pt")
    code = export_main(
        [str(tmp_path / "a" / "model.pt"), str(tmp_path / "b" / "model.pt"), "-o", str(tmp_path / "o"), "-q"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "a/model.pt and" in err and "b/model.pt are trained on different backbones" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": []}, "non-empty list"),
        ({"tasks": [{"name": "a", "task": "poetry", "output": "a_logits"}]}, "'task' must be one of"),
        ({"tasks": [{"name": "a", "task": "regression", "output": "b_logits"}]}, "is not among 'outputs'"),
        ({"layout": "split"}, "needs 'model'"),
        ({"layout": "zigzag"}, "'layout' must be one of"),
    ],
)
def test_a_broken_multi_task_manifest_names_what_is_wrong(change, message):
    raw = {
        "format": "mpismoe-edge-onnx/1",
        "task": "multi-task",
        "outputs": ["a_logits"],
        "tasks": [{"name": "a", "task": "regression", "output": "a_logits"}],
        **change,
    }
    with pytest.raises(ValueError, match=message):
        parse_manifest(raw)


@pytest.mark.slow
def test_the_manifest_lists_each_tasks_kind_labels_and_output(merged, models):
    _, manifest = merged
    assert manifest["task"] == "multi-task"
    assert [(t["name"], t["task"], t["labels"], t["output"]) for t in manifest["tasks"]] == [
        ("sentiment", "classification", ["neg", "neu", "pos"], "sentiment_logits"),
        ("ner", "token-classification", ["O", "B-X", "I-X"], "ner_logits"),
        ("rating", "regression", None, "rating_logits"),
    ]
    assert manifest["backbone_fingerprint"] == models["sentiment"].backbone_fingerprint


@pytest.mark.slow
def test_the_merged_graph_has_one_backbone_and_one_output_per_task(merged):
    import onnx

    out, _ = merged
    proto = onnx.load(str(out / "onnx" / "model.onnx"))
    assert [o.name for o in proto.graph.output] == ["sentiment_logits", "ner_logits", "rating_logits"]
    gathers = [n for n in proto.graph.node if n.op_type == "QGather"]
    assert len(gathers) == 3  # word, position, token type embeddings: once, not once per task


@pytest.mark.slow
def test_every_task_passes_validation_against_its_own_pytorch_model(merged, split):
    for _, manifest in (merged, split):
        assert manifest["parity"]["passed"]
        assert set(manifest["parity"]["tasks"]) == set(KINDS)
        assert max(manifest["parity"]["tasks"].values()) <= 1e-4


@pytest.mark.slow
def test_each_tasks_logits_equal_its_own_pytorch_models(merged, models):
    out, _ = merged
    got = Predictor.from_dir(out).predict_logits(TEXTS)
    for name, model in models.items():
        ref = model.predict_logits(TEXTS)
        if isinstance(ref, list):
            assert max(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref, got[name])) <= 1e-4
        else:
            assert float(np.abs(ref.numpy() - got[name]).max()) <= 1e-4


@pytest.mark.slow
def test_the_split_layout_gives_the_merged_graphs_logits(merged, split):
    a, b = Predictor.from_dir(merged[0]).predict_logits(TEXTS), Predictor.from_dir(split[0]).predict_logits(TEXTS)
    for name in KINDS:
        pairs = zip(a[name], b[name]) if isinstance(a[name], list) else [(a[name], b[name])]
        assert max(float(np.abs(x - y).max()) for x, y in pairs) <= 1e-5


@pytest.mark.slow
def test_the_split_layout_is_a_backbone_graph_and_one_small_graph_per_task(split):
    out, manifest = split
    files = sorted(p.name for p in (out / "onnx").iterdir())
    assert files == ["backbone.onnx", "side_ner.onnx", "side_rating.onnx", "side_sentiment.onnx"]
    assert [t["model"] for t in manifest["tasks"]] == [f"onnx/side_{n}.onnx" for n in KINDS]
    backbone = manifest["sizes"]["onnx/backbone.onnx"]
    assert all(t["bytes"] < backbone for t in manifest["tasks"])


@pytest.mark.slow
def test_predict_gives_each_task_its_own_kind_of_result(merged):
    (result,) = Predictor.from_dir(merged[0]).predict(["i love this movie"])
    assert set(result) == {"sentiment", "ner", "rating", "truncated"}
    assert result["sentiment"]["label"] in ("neg", "neu", "pos")
    assert [w["word"] for w in result["ner"]["words"]] == ["i", "love", "this", "movie"]
    assert isinstance(result["rating"]["score"], float)


@pytest.mark.slow
def test_a_split_predictor_of_some_tasks_loads_only_their_graphs(split):
    p = Predictor.from_dir(split[0], tasks=["rating"])
    assert p.tasks == ["rating"] and list(p.session.sides) == ["rating_logits"]
    assert set(p.predict(["it is ok"])[0]) == {"rating", "truncated"}


@pytest.mark.slow
@pytest.mark.parametrize("tasks", [["nope"], []])
def test_unknown_tasks_are_refused_naming_the_exports_tasks(merged, tasks):
    with pytest.raises(ValueError, match=r"this export has \['sentiment', 'ner', 'rating'\]"):
        Predictor.from_dir(merged[0], tasks=tasks)


@pytest.mark.slow
def test_mpismoe_run_tasks_prints_the_chosen_tasks_per_line(merged, capsys):
    from mpismoe_edge.runtime.cli import run_main

    assert run_main([str(merged[0]), "--text", "very happy", "--tasks", "sentiment,rating"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert set(line) == {"index", "sentiment", "rating", "truncated"}


@pytest.mark.slow
def test_mpismoe_parity_checks_every_task(merged, models, tmp_path, capsys, tiny_jsonl):
    from mpismoe_edge.parity import main as parity_main

    paths = []
    for name, model in models.items():
        save_checkpoint(model, tmp_path / name / "model.pt")
        paths.append(str(tmp_path / name / "model.pt"))
    code = parity_main([*paths, str(merged[0]), "--data", str(tiny_jsonl), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(report["tasks"]) == set(KINDS) and report["passed"]


@pytest.mark.slow
@pytest.mark.parametrize("client", ["onnxruntime-node", "onnxruntime-web"])
def test_a_js_client_runs_the_merged_graph_with_python_onnxruntimes_logits(merged, client, tmp_path):
    from clients import array, require, run_js

    from mpismoe_edge.export.lower import make_inputs

    require(client)
    out, manifest = merged
    model = out / "onnx" / "model.onnx"
    feed = {k: v.numpy() for k, v in make_inputs(tiny_model(), 2, 9, lengths=[9, 4], seed=3).items()}
    request = {
        "client": client,
        "model": str(model),
        "feed": {k: {"dims": list(v.shape), "data": v.ravel().tolist()} for k, v in feed.items()},
    }
    got = run_js(request, tmp_path)["outputs"]
    import onnxruntime as ort

    want = dict(zip(manifest["outputs"], ort.InferenceSession(str(model)).run(manifest["outputs"], feed)))
    assert set(got) == set(want)
    for name, ref in want.items():
        assert float(np.abs(array(got[name]) - ref).max()) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort-cpu", "ort-int8"])
def test_every_target_exports_several_tasks_that_pass_its_validation(models, target, tmp_path):
    manifest = export_tasks(models, tmp_path / target, target=target, log=None)
    assert manifest["parity"]["passed"] and set(manifest["parity"]["tasks"]) == set(KINDS)
