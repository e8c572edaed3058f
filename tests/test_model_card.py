"""Every export carries README.md, a Hugging Face model card: YAML front matter (library_name,
pipeline_tag, base_model, license, tags), then the task and labels, the run's metrics (or "not
recorded"), the backbone's bit map, the target's runtimes, the export's own parity result and
snippets; a pure function of the export's files and metrics.json, so re-exports are byte-identical."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import tiny_model

from mpismoe_edge.export import cli, lower, pipeline
from mpismoe_edge.export.model_card import NOT_RECORDED, base_model, bits_summary, model_card, read_metrics
from mpismoe_edge.runtime.spec import CONFIG_FILE, EXPORT_FILES, MANIFEST_FILE, METRICS_FILE, README_FILE

METRICS = {
    "history": [
        {"loss": 1.01, "accuracy": 0.5, "epoch": 1, "seconds": 3.0},
        {"loss": 0.93, "accuracy": 0.625, "epoch": 2, "seconds": 3.0},
    ],
    "final": {"loss": 0.93, "accuracy": 0.625},
    "test": {"loss": 0.97, "accuracy": 0.5875},
    "train_seconds": 6.4,
    "trainable_params": 12345,
    "world_size": 1,
    "device": "cpu",
    "peak_rss_mb": 321.0,
    "peak_cuda_allocated_mb": None,
    "train_config": {"epochs": 3},
}


def front_matter(card: str) -> dict:
    """The card's YAML front matter read as ``key: value`` lines and ``- item`` lists."""
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    meta, key = {}, None
    for line in lines[1:end]:
        if line.startswith("- "):
            meta[key].append(line[2:])
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            meta[key] = value if value else []
    return meta


@pytest.fixture(scope="module")
def model():
    m = tiny_model().eval()
    m.pack_experts()
    return m


@pytest.fixture(scope="module")
def proto(model):
    return lower.to_onnx(model)


@pytest.fixture
def export(model, proto, monkeypatch, tmp_path):
    """export_model with the module's traced graph (validation still runs)."""
    monkeypatch.setattr(pipeline, "to_onnx", lambda m, opset=18: copy.deepcopy(proto))

    def run(out=tmp_path / "out", **options):
        pipeline.export_model(model, out, log=None, **options)
        return out

    return run


@pytest.fixture(scope="module")
def exported(model, proto, tmp_path_factory):
    """One validated export with the run's metrics, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("card") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "to_onnx", lambda m, opset=18: copy.deepcopy(proto))
        pipeline.export_model(model, out, log=None, metrics=METRICS)
    return out


def _manifest(task="classification", labels=("neg", "neu", "pos"), **extra) -> dict:
    return {
        "task": task,
        "labels": list(labels) if labels else None,
        "max_length": 16,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "target": "portable",
        "runtimes": ["onnxruntime", "onnxruntime-node", "onnxruntime-web", "transformers.js"],
        "model": "onnx/model.onnx",
        "opset": 18,
        "bits": {"backbone.encoder.layer.0.output.dense": 4},
        "sizes": {"onnx/model.onnx": 200_000},
        "parity": None,
        **extra,
    }


def test_export_writes_the_card_as_readme(exported):
    out = exported
    assert README_FILE == "README.md" and (out / README_FILE).is_file()
    assert README_FILE in EXPORT_FILES  # an export holding it can be replaced


def test_front_matter_holds_the_hub_fields(exported):
    meta = front_matter((exported / README_FILE).read_text())
    assert meta["library_name"] == "transformers.js"
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "unknown"  # the tiny random backbone's config names no model or folder
    assert meta["license"] == "other"  # not in the backbone's config: never invented
    assert meta["tags"][:3] == ["onnx", "mpismoe-edge", "portable"]
    assert {"low-bit", "4-bit"} <= set(meta["tags"])


def test_card_lists_the_task_and_labels_in_logit_order(exported):
    card = (exported / README_FILE).read_text()
    assert "Task: **classification**" in card
    assert "Labels (3, in logit order): `neg`, `neu`, `pos`." in card


def test_card_shows_the_runs_validation_and_test_scores(exported):
    card = (exported / README_FILE).read_text()
    assert "| accuracy | 0.6250 | 0.5875 |" in card
    assert "| loss | 0.9300 | 0.9700 |" in card
    assert "epochs run: 2 (planned 3)" in card
    assert f"training rows: {NOT_RECORDED}" in card  # metrics.json does not record them


def test_card_without_metrics_says_they_are_not_recorded(exported):
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    card = model_card(manifest, json.loads((exported / CONFIG_FILE).read_text()), None)
    assert f"Training data and metrics: {NOT_RECORDED}" in card
    assert "| accuracy |" not in card


def test_card_states_the_exports_own_parity_result(exported):
    out = exported
    parity = json.loads((out / MANIFEST_FILE).read_text())["parity"]
    card = (out / README_FILE).read_text()
    assert parity["passed"]
    assert f"max abs logit difference {parity['max_abs_diff']:.2g}, tolerance 0.0001: **passed**" in card


def test_card_of_an_unvalidated_export_says_so():
    card = model_card(_manifest(parity=None), {})
    assert "Not validated at export" in card and "**passed**" not in card


def test_card_lists_the_targets_runtimes_and_bit_map(exported):
    out = exported
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    card = (out / README_FILE).read_text()
    assert "Runs in: " + ", ".join(f"`{r}`" for r in manifest["runtimes"]) in card
    assert f"Packed layers: {len(manifest['bits'])} ({len(manifest['bits'])} at 4 bits)" in card
    assert "| `backbone.encoder.layer.*.output.dense` | 2 | 4 (x2) |" in card


def test_card_holds_snippets_for_python_node_and_the_browser_page(exported):
    card = (exported / README_FILE).read_text()
    assert 'Predictor.from_dir("EXPORT")' in card
    assert 'pipeline("text-classification", "EXPORT_NAME", { dtype: "fp32" })' in card
    assert "python examples/browser/serve.py EXPORT" in card


@pytest.mark.slow
def test_reexport_writes_a_byte_identical_card(exported, export, tmp_path):
    first = (exported / README_FILE).read_bytes()
    again = export(tmp_path / "elsewhere" / "named-otherwise", metrics=METRICS)  # another folder: no path in the card
    assert (again / README_FILE).read_bytes() == first
    assert (export(again, metrics=METRICS) / README_FILE).read_bytes() == first  # over the previous export


def test_card_holds_no_absolute_path_of_a_local_backbone():
    config = {"_name_or_path": "/home/someone/models/all-MiniLM-L6-v2", "model_type": "bert"}
    card = model_card(_manifest(), config)
    assert front_matter(card)["base_model"] == "all-MiniLM-L6-v2"
    assert "/home/someone" not in card


@pytest.mark.parametrize(
    "name_or_path,expected",
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),  # a Hub id
        ("bert-base-uncased", "bert-base-uncased"),
        ("/opt/models/my-encoder", "my-encoder"),  # a local folder: its name
        ("runs/tasks/backbones/all-mpnet-base-v2/", "all-mpnet-base-v2"),
        ("./encoder", "encoder"),
        ("C:\\models\\encoder", "encoder"),
        ("", "unknown"),
    ],
)
def test_base_model_is_the_hub_id_or_the_folder_name(name_or_path, expected):
    assert base_model({"_name_or_path": name_or_path}) == expected


def test_license_comes_from_the_backbones_config_when_it_has_one():
    card = model_card(_manifest(), {"license": "apache-2.0"})
    assert front_matter(card)["license"] == "apache-2.0"
    assert "License: `apache-2.0` (the backbone's config)." in card


@pytest.mark.parametrize(
    "task,labels,pipeline_tag,shown",
    [
        ("classification", ("neg", "pos"), "text-classification", "Labels (2, in logit order): `neg`, `pos`."),
        ("regression", ("score",), "text-classification", "one number per text"),
        ("token-classification", ("O", "B-X", "I-X"), "token-classification", "`O`, `B-X`, `I-X`"),
    ],
)
def test_card_names_each_tasks_pipeline(task, labels, pipeline_tag, shown):
    card = model_card(_manifest(task, labels), {})
    assert front_matter(card)["pipeline_tag"] == pipeline_tag
    assert shown in card


def test_an_int8_export_points_node_users_at_onnxruntime_web():
    manifest = _manifest(target="ort-int8", runtimes=["onnxruntime", "onnxruntime-web"])
    card = model_card(manifest, {})
    assert front_matter(card)["library_name"] == "onnx"
    assert 'import * as ort from "onnxruntime-web"' in card and "@huggingface/transformers" not in card


def test_bit_map_is_summarized_per_layer_kind_with_each_width_counted():
    bits = {
        "backbone.encoder.layer.0.output.dense": 4,
        "backbone.encoder.layer.1.output.dense": 8,
        "backbone.encoder.layer.2.output.dense": 4,
        "backbone.embeddings.word_embeddings": 3,
    }
    assert bits_summary(bits) == [
        ("backbone.encoder.layer.*.output.dense", 3, {4: 2, 8: 1}),
        ("backbone.embeddings.word_embeddings", 1, {3: 1}),
    ]


def test_read_metrics_takes_the_runs_metrics_json_next_to_model_pt(tmp_path):
    (tmp_path / METRICS_FILE).write_text(json.dumps(METRICS))
    assert read_metrics(tmp_path / "model.pt") == METRICS


@pytest.mark.parametrize(
    "checkpoint,content",
    [
        ("model.pt", None),  # no metrics.json
        ("model.pt", "{not json"),
        ("model.pt", "[1, 2]"),  # not an object
        ("model.calibrated.pt", json.dumps(METRICS)),  # metrics.json describes model.pt, not this checkpoint
    ],
)
def test_read_metrics_gives_none_when_the_run_recorded_nothing_for_this_checkpoint(tmp_path, checkpoint, content):
    if content is not None:
        (tmp_path / METRICS_FILE).write_text(content)
    assert read_metrics(tmp_path / checkpoint) is None


@pytest.mark.slow
def test_export_cli_puts_the_runs_metrics_in_the_card(tiny_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "model.pt")
    (run / METRICS_FILE).write_text(json.dumps(METRICS))
    assert cli.main([str(run / "model.pt"), "-o", str(run / "onnx"), "--no-validate", "-q"]) == 0
    card = (run / "onnx" / README_FILE).read_text()
    assert "| accuracy | 0.6250 | 0.5875 |" in card
    assert json.loads((run / "onnx" / CONFIG_FILE).read_text())["id2label"]["0"] in card
