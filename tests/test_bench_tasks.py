"""benchmarks/tasks.py's parts: task loading, the scoring helpers and the summary table, on synthetic rows."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.scoring import baseline, word_predictions
from benchmarks.task_data import load_task, write_split_files
from benchmarks.task_report import SIDE_WEIGHT_DECAY, chosen, run_key, small_data_report, summarize
from mpismoe_edge.data import Dataset


def _write(folder: Path, info: dict, rows: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(info))
    for split, rs in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))


def test_train_rows_subsample_is_seeded_and_val_rows_keep_the_first(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 3 else "b"} for i in range(50)]
    _write(
        tmp_path / "toy",
        {"task": "classification", "labels": ["a", "b"]},
        {"train": rows, "validation": rows, "test": rows},
    )
    info, train, val, test = load_task(str(tmp_path), "toy", seed=1, train_rows=10, val_rows=5)
    assert len(train) == 10 and val.texts == [f"t{i}" for i in range(5)] and len(test) == 50
    assert load_task(str(tmp_path), "toy", seed=1, train_rows=10)[1].texts == train.texts
    assert load_task(str(tmp_path), "toy", seed=2, train_rows=10)[1].texts != train.texts


def test_a_missing_task_folder_says_to_fetch_first(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_tasks.py"):
        load_task(str(tmp_path), "wnut16", seed=0)


def test_each_word_is_labelled_by_its_first_sub_token_and_cut_words_get_the_fill():
    enc = SimpleNamespace(word_ids=[None, 0, 0, 1, None])  # [CLS] w0 w0' w1 [SEP]; word 2 cut off
    logits = torch.tensor([[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [9, 0, 0], [0, 0, 9]])
    assert word_predictions([logits], [enc], [3], fill=2) == [[1, 0, 2]]


def test_baselines_are_the_majority_class_all_o_and_the_training_mean():
    cls = baseline(
        {"task": "classification"},
        Dataset(["x"] * 3, [1, 1, 0], ["a", "b"]),
        Dataset(["x"] * 4, [1, 0, 0, 1], ["a", "b"]),
    )
    assert cls == {"accuracy": 0.5}
    ner_info = {"task": "token-classification", "labels": ["B-x", "O"]}
    test = Dataset([["a", "b"]], [[0, 1]], ner_info["labels"])
    assert baseline(ner_info, test, test) == {"entity_f1": 0.0, "word_accuracy": 0.5}
    reg = baseline({"task": "regression"}, Dataset(["x"] * 2, [1.0, 3.0], []), Dataset(["x"] * 2, [0.0, 4.0], []))
    assert reg["mse"] == 4.0 and reg["pearson"] == 0.0


def _row(task, method, seed, value, rss=100.0):
    return {
        "task": task,
        "backbone": "minilm",
        "method": method,
        "seed": seed,
        "kind": "run",
        "epoch": 1,
        "val": {"accuracy": value},
        "test": {"accuracy": value},
        "peak_rss_mb": rss,
        "trainable_params": 10,
        "seconds": 1.0,
        "train_rows": 500,
        "epochs": 3,
    }


def test_summary_reports_means_and_paired_differences():
    rows = [
        _row("tweets", "lst", 0, 0.70, 200),
        _row("tweets", "lst", 1, 0.72, 200),
        _row("tweets", "mp-ismoe", 0, 0.73, 100),
        _row("tweets", "mp-ismoe", 1, 0.73, 100),
        {"task": "tweets", "backbone": "minilm", "method": "lst", "seed": 0, "kind": "probe", "tensor_peak_mb": 50.0},
    ]
    text = summarize(rows, "minilm", {"tweets": {"task": "classification"}}, {"tweets": {"accuracy": 0.4}})
    assert "| tweets | majority / mean | 40.00 |" in text
    assert "| tweets | mp-ismoe | 73.00 | 73.00 / 73.00 |" in text
    assert "| tweets | lst | 71.00 | 70.00 / 72.00 | - | 71.00 | 1/3, 1/3 | 50 | 200 |" in text
    assert "mp-ismoe vs lst: tweets +2.00 (paired seeds +3.00 / +1.00, RSS 0.50x)" in text


def test_runs_on_cached_states_show_no_rss_and_are_named_under_the_table():
    rows = [_row("tweets", "lst", 0, 0.70, 200), _row("tweets", "mp-ismoe", 0, 0.73, None) | {"cached_states": True}]
    text = summarize(rows, "minilm", {"tweets": {"task": "classification"}}, {"tweets": {"accuracy": 0.4}})
    assert "| tweets | mp-ismoe | 73.00 | 73.00 | - | 73.00 | 1/3 | - | - |" in text
    assert "mp-ismoe vs lst: tweets +3.00 (paired seeds +3.00)" in text
    assert "Trained on cached backbone states (`--cached-states`, RSS not measured): tweets mp-ismoe." in text


def test_a_resumed_run_counts_in_the_score_but_not_in_time_or_rss():
    whole = [_row("tweets", "lst", s, 0.70, 200) | {"seconds": 10.0} for s in (0, 1)]
    resumed = _row("tweets", "lst", 2, 0.76, 900) | {"seconds": 1.0, "resumed_epochs": 2}
    text = summarize([*whole, resumed], "minilm", {"tweets": {"task": "classification"}}, {"tweets": {"accuracy": 0.4}})
    assert "| tweets | lst | 72.00 | 70.00 / 70.00 / 76.00 |" in text and "| 200 | 10 | 10 |" in text
    assert "left out of time and RSS (one process did not train them whole): tweets lst seed 2." in text


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lst", "mp-ismoe"])
def test_a_side_method_on_cached_states_trains_without_the_backbone_and_is_scored_live(tmp_path, method):
    import subprocess
    import sys

    from conftest import save_backbone

    from benchmarks.task_data import MPNET_DIR

    rows = [
        {"text": f"good film {i}" if i % 2 else f"bad film {i}", "label": "pos" if i % 2 else "neg"} for i in range(40)
    ]
    _write(tmp_path / "data" / "toy", {"task": "classification", "labels": ["neg", "pos"]},
           {"train": rows, "validation": rows[:16], "test": rows[:16]})  # fmt: skip
    save_backbone(tmp_path / "data" / MPNET_DIR, hidden=128)  # side width 16: one expert group
    cmd = [sys.executable, "benchmarks/tasks.py", "--one", method, "--task", "toy", "--backbone", "mpnet",
           "--data", str(tmp_path / "data"), "--epochs", "1", "--min-steps", "0", "--patience", "2", "--threads", "1",
           "--workdir", str(tmp_path / "w"), "--cached-states", str(tmp_path / "cache")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    kind = "fp32" if method == "lst" else "q4"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"toy-mpnet-{kind}-seed0-all-all-len64-train-val.pt"]
    assert row["cached_states"] is True and row["peak_rss_mb"] is None
    assert 0.0 <= row["test"]["accuracy"] <= 1.0 and row["epoch"] == 1 and row["trainable_params"] > 0


def test_the_split_files_hold_the_rows_the_benchmark_loads(tmp_path):
    rows = [
        {"text": f"t{i}\u2028line", "label": "a" if i % 3 else "b"} for i in range(50)
    ]  # a line separator inside a string
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "task.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"]}))
    for split in ("train", "validation", "test"):
        (tmp_path / "toy" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    files = write_split_files(str(tmp_path), "toy", 3, 10, 5, tmp_path / "out")
    _, train, val, test = load_task(str(tmp_path), "toy", seed=3, train_rows=10, val_rows=5)
    written = [[json.loads(line)["text"] for line in f.read_text().split("\n") if line] for f in files]
    assert written == [train.texts, val.texts, test.texts]


def test_the_small_data_report_says_whether_each_run_beats_the_baseline():
    info = {"tweets": {"task": "classification"}, "vader-movies": {"task": "regression"}}
    rows = [
        {**_row("tweets", "full-ft", 0, 0.60), "epochs": 3},
        {**_row("tweets", "mpismoe-train", 0, 0.50), "epoch": 9, "epochs": 13},
        {**_row("vader-movies", "full-ft", 0, 0), "test": {"mse": 2.0}},
        {**_row("vader-movies", "mpismoe-train", 0, 0), "test": {"mse": 2.5}, "epochs": 13},
    ]
    base = {("tweets", 0): {"accuracy": 0.55}, ("vader-movies", 0): {"mse": 3.0}}
    text = small_data_report(rows, "minilm", info, base)
    assert "| tweets | 0 | accuracy | 55.00 | 60.00 | 50.00 | 9 / 13 | yes | no |" in text
    assert "| vader-movies | 0 | mse | 3.00 | 2.00 | 2.50 | 1 / 13 | yes | yes |" in text
    assert "beats the baseline in 1 of the 2 runs where full fine-tuning does" in text


def _tuned(seed, lr, val, test, loss=1.0, wd=None):
    row = {**_row("tweets", "lst", seed, test), "lr": lr, "val": {"accuracy": val, "loss": loss}}
    return row if wd is None else {**row, "weight_decay": wd}


def test_the_learning_rate_is_the_best_on_validation_at_the_first_seed_not_on_test():
    rows = [_tuned(0, 1e-3, 0.70, 0.90), _tuned(0, 2.5e-3, 0.72, 0.60), _tuned(0, 4e-4, 0.72, 0.95, loss=2.0)]
    rows.append(_tuned(1, 4e-4, 0.99, 0.99))  # another seed does not vote
    choice = chosen(rows, "tweets", "minilm", "lst", "classification")
    assert (choice.lr, choice.lrs) == (2.5e-3, [4e-4, 1e-3, 2.5e-3])


def test_the_weight_decay_is_chosen_with_the_learning_rate_on_validation():
    rows = [_tuned(0, 1e-3, 0.70, 0.90), _tuned(0, 2.5e-3, 0.72, 0.60), _tuned(0, 2.5e-3, 0.74, 0.50, wd=0.1)]
    choice = chosen(rows, "tweets", "minilm", "lst", "classification")
    assert (choice.lr, choice.weight_decay, choice.weight_decays) == (2.5e-3, 0.1, [SIDE_WEIGHT_DECAY, 0.1])
    assert choice.text() == "0.0025 / 0.1 (lr 0.001 / 0.0025; wd 0.01 / 0.1)"


def test_a_row_without_a_weight_decay_is_the_same_run_as_one_at_the_default():
    assert run_key(_tuned(0, 1e-3, 0.7, 0.7)) == run_key(_tuned(0, 1e-3, 0.7, 0.7, wd=SIDE_WEIGHT_DECAY))
    assert run_key(_tuned(0, 1e-3, 0.7, 0.7)) != run_key(_tuned(0, 1e-3, 0.7, 0.7, wd=0.1))


def test_the_table_holds_the_chosen_learning_rate_runs_and_names_the_grid():
    rows = [_tuned(0, 1e-3, 0.70, 0.90), _tuned(0, 2.5e-3, 0.72, 0.60), _tuned(1, 2.5e-3, 0.70, 0.70)]
    text = summarize(rows, "minilm", {"tweets": {"task": "classification"}}, {})
    assert "| tweets | lst | 65.00 | 60.00 / 70.00 |" in text
    assert text.split("\n")[2].endswith("| 0.0025 / 0.01 (lr 0.001 / 0.0025) |")


def test_runs_at_two_learning_rates_are_two_runs_and_the_same_rate_is_one():
    assert run_key(_tuned(0, 1e-3, 0, 0)) != run_key(_tuned(0, 2.5e-3, 0, 0))
    assert run_key(_tuned(0, 0.001, 0, 0)) == run_key(_tuned(0, 0.0010000000001, 0, 0))
