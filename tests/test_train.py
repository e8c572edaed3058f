"""Training: the side network learns, checkpoints are resumable and bad input fails early."""

import json

import pytest
import torch
from conftest import LABELS, TEXTS, TINY_TRAIN_FLAGS, tiny_model

from mpismoe_edge.cli import train_main
from mpismoe_edge.data import Dataset, load_file
from mpismoe_edge.model import load_checkpoint
from mpismoe_edge.train import TrainConfig, make_optimizer, train

DATA = Dataset(TEXTS * 4, LABELS * 4, ["neg", "neu", "pos"])


def _cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1, "min_steps": 0, **kw})


def test_training_writes_a_loadable_checkpoint_with_packed_experts(tmp_path):
    train(tiny_model(), DATA, DATA, _cfg(), tmp_path, progress=False)
    again = load_checkpoint(tmp_path / "model.pt")
    assert again.side.moe_layers()[0].experts[0].fc1.__class__.__name__ == "QuantLinear"


def test_the_final_metrics_are_the_saved_models_and_each_epoch_has_its_own(tmp_path):
    from mpismoe_edge.inference import evaluate, make_tokenizer

    result = train(tiny_model(), DATA, DATA, _cfg(), tmp_path, progress=False)
    saved = load_checkpoint(tmp_path / "model.pt")
    assert result["final"] == pytest.approx(
        evaluate(saved, make_tokenizer(saved.tokenizer_json, saved.config.max_length), DATA)
    )
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] == pytest.approx(result["final"])


def test_training_lowers_the_loss(tmp_path):
    model = tiny_model(expert_bits=None)
    result = train(model, DATA, DATA, _cfg(epochs=4, patience=10), tmp_path, progress=False)
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]


def test_only_side_parameters_are_trained(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train(model, DATA, DATA, _cfg(epochs=1), tmp_path, progress=False)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_continues_from_the_last_epoch(tmp_path):
    train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, progress=False)
    result = train(tiny_model(), DATA, DATA, _cfg(epochs=2), tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result.resumed_epochs == 1


def test_a_run_not_resumed_reports_no_resumed_epochs(tmp_path):
    assert train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, resume=True, progress=False).resumed_epochs == 0


def test_labels_out_of_range_fail_before_training(tmp_path):
    bad = Dataset(["good"], [7], ["neg", "neu", "pos"])
    with pytest.raises(ValueError, match="out of range"):
        train(tiny_model(), bad, DATA, _cfg(), tmp_path, progress=False)
    assert not (tmp_path / "model.pt").exists()


def test_empty_dataset_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train(tiny_model(), Dataset([], [], ["a", "b", "c"]), DATA, _cfg(), tmp_path, progress=False)


def test_mismatched_tokenizer_fails_before_training(tmp_path):
    from tokenizers import Tokenizer, models

    model = tiny_model()
    model.tokenizer_json = Tokenizer(models.WordLevel({f"w{i}": i for i in range(5000)}, unk_token="w0")).to_str()
    with pytest.raises(ValueError, match="tokenizer vocabulary"):
        train(model, DATA, DATA, _cfg(), tmp_path, progress=False)


def test_missing_label_column_names_the_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "hi", "sentiment": "pos"}) + "\n")
    with pytest.raises(ValueError, match="'label' missing"):
        load_file(path)


def test_label_names_map_to_sorted_ids(tiny_jsonl):
    data = load_file(tiny_jsonl)
    assert data.labels == ["neg", "neu", "pos"] and data.targets == LABELS


def test_cli_reports_bad_data_with_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = train_main(
        ["--backbone", str(tmp_path), "--data", str(empty), "--eval-data", str(empty), "-o", str(tmp_path / "o")]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_batch_order_covers_every_row_once_and_groups_similar_lengths():
    from mpismoe_edge.loop import batch_order

    lengths = [i % 50 for i in range(1000)]
    batches = batch_order(lengths, 10, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 10
    assert batches == batch_order(lengths, 10, seed=0) and batches != batch_order(lengths, 10, seed=1)


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    opt, sched = make_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig(lr=1.0, warmup_ratio=0.2), steps=10)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert opt.param_groups[0]["lr"] == 0.0


def test_cli_runs_with_the_same_seed_give_the_same_model(tmp_path, tiny_jsonl, backbone_dir):
    from mpismoe_edge.model import read_checkpoint

    states = []
    for run, global_seed in (("a", 123), ("b", 456)):
        torch.manual_seed(global_seed)  # whatever the process did before must not matter
        code = train_main(
            [
                "--backbone",
                str(backbone_dir),
                "--data",
                str(tiny_jsonl),
                "--eval-data",
                str(tiny_jsonl),
                "-o",
                str(tmp_path / run),
                *TINY_TRAIN_FLAGS,
                "--quiet",
            ]
        )
        assert code == 0
        states.append(read_checkpoint(tmp_path / run / "model.pt")["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_test_data_is_scored_only_by_the_final_model(tmp_path):
    from mpismoe_edge.inference import evaluate, make_tokenizer

    test = Dataset(TEXTS[:6], LABELS[:6], ["neg", "neu", "pos"])
    result = train(tiny_model(), DATA, DATA, _cfg(), tmp_path, progress=False, test_data=test)
    saved = load_checkpoint(tmp_path / "model.pt")
    expected = evaluate(saved, make_tokenizer(saved.tokenizer_json, saved.config.max_length), test)
    assert result["test"] == pytest.approx(expected)
    assert "test" in json.loads((tmp_path / "metrics.json").read_text())


def test_cli_refuses_test_data_without_training_data(tmp_path, tiny_jsonl, capsys):
    code = train_main(["--backbone", str(tmp_path), "--test-data", str(tiny_jsonl), "-o", str(tmp_path / "o")])
    assert code == 2 and "--test-data needs --data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_returns_a_typed_result_that_metrics_json_mirrors(tmp_path):
    from mpismoe_edge.train import TrainResult

    result = train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, progress=False)
    assert isinstance(result, TrainResult)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    assert saved["world_size"] == 1 and saved["device"] == "cpu" and saved["peak_rss_mb"] > 0
    assert result["final"] == result.final  # mapping access, as when train() returned a dict


def test_a_trained_model_predicts_label_names_from_texts(tmp_path):
    train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, progress=False)
    model = load_checkpoint(tmp_path / "model.pt")
    labels = model.predict(TEXTS[:3])
    assert len(labels) == 3 and set(labels) <= {"neg", "neu", "pos"}


def test_a_model_predicts_logits_in_input_order_and_their_argmax_is_its_label():
    model = tiny_model().eval()
    texts = TEXTS[:4]
    logits = model.predict_logits(texts, batch_size=2)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(
        model.predict_logits(texts[::-1], batch_size=3), logits.flip(0), atol=1e-5, rtol=0
    )  # other padding
    assert model.predict(texts) == [model.config.labels[i] for i in logits.argmax(-1).tolist()]


def test_progress_names_the_work_after_the_last_epoch(tmp_path, capsys):
    train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, progress=True, test_data=DATA)
    out = capsys.readouterr()
    assert "packing the experts" in out.out + out.err
    assert "final validation" in out.err and "test" in out.err  # the scoring bars


def test_cli_accepts_q_for_quiet():
    from mpismoe_edge.cli import _parser

    assert _parser().parse_args(["-q"]).quiet is True


def test_non_utf8_training_file_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("text,label\ngood,pos\ncaf\xe9 ok,neu\n".encode("latin-1"))
    code = train_main(
        ["--backbone", str(tmp_path), "--data", str(bad), "--eval-data", str(bad), "-o", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and f"{bad} line 3: not valid UTF-8 (byte 0xe9" in err
    assert not (tmp_path / "o").exists()


def _scripted_validation(monkeypatch, history: list[dict]):
    """Make the per-epoch validation of train() report ``history``; later calls score for real."""
    import mpismoe_edge.train as train_module

    real, script = train_module.evaluate, iter(history)
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **kw: dict(next(script, None) or real(*a, **kw)))


def test_a_tied_accuracy_with_a_falling_loss_does_not_stop_training(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [{"accuracy": 0.4, "loss": loss} for loss in (1.0, 0.9, 0.8, 0.7)])
    result = train(tiny_model(), DATA, DATA, _cfg(epochs=4, patience=1), tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]


def test_patience_stops_when_neither_the_metric_nor_the_loss_improves(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [{"accuracy": 0.4, "loss": loss} for loss in (1.0, 0.9, 0.95, 0.97, 0.5)])
    result = train(tiny_model(), DATA, DATA, _cfg(epochs=5, patience=2), tmp_path, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]


def test_small_data_trains_for_at_least_min_steps(tmp_path):
    steps_per_epoch = -(-len(DATA) // 8)
    result = train(tiny_model(), DATA, DATA, _cfg(epochs=1, min_steps=3 * steps_per_epoch), tmp_path, progress=False)
    assert len(result.history) == 3


def test_early_stopping_waits_for_min_steps(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [{"accuracy": 0.4, "loss": 1.0}] * 4)
    steps_per_epoch = -(-len(DATA) // 8)
    result = train(
        tiny_model(), DATA, DATA, _cfg(epochs=1, patience=1, min_steps=4 * steps_per_epoch), tmp_path, progress=False
    )
    assert len(result.history) == 4


def test_validation_may_hold_labels_the_small_training_file_lacks(tmp_path):
    from mpismoe_edge.data import load_splits

    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": "neg"}\n{"text": "b", "label": "pos"}\n')
    (tmp_path / "val.jsonl").write_text('{"text": "c", "label": "neu"}\n{"text": "d", "label": "pos"}\n')
    train_ds, val_ds, test_ds = load_splits([tmp_path / "train.jsonl", tmp_path / "val.jsonl", None])
    assert train_ds.labels == val_ds.labels == ["neg", "neu", "pos"]
    assert (train_ds.targets, val_ds.targets, test_ds) == ([0, 2], [1, 2], None)


@pytest.mark.parametrize(
    "change, setting",
    [
        ({"bits": None}, "model.quant"),  # the float backbone instead of the 4-bit one
        ({"num_experts": 2}, "model.side.num_experts"),
    ],
)
def test_resume_refuses_a_last_checkpoint_made_with_other_settings(tmp_path, change, setting):
    train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, progress=False)
    other = tiny_model(**change)
    with pytest.raises(ValueError, match=rf"last\.pt was made with {setting}=.*this run has {setting}="):
        train(other, DATA, DATA, _cfg(epochs=2), tmp_path, resume=True, progress=False)


def test_resume_refuses_a_last_checkpoint_of_another_learning_rate(tmp_path):
    train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"made with train\.lr=0\.003, this run has train\.lr=0\.01"):
        train(tiny_model(), DATA, DATA, _cfg(epochs=2, lr=0.01), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint", b"PK\x03\x04 truncated zip"],
    ids=["empty", "text", "truncated"],
)
def test_resume_refuses_a_corrupt_last_checkpoint_with_one_line(tmp_path, content):
    (tmp_path / "last.pt").write_bytes(content)
    with pytest.raises(ValueError, match=r"last\.pt is not a readable training state .*delete it to start over"):
        train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, resume=True, progress=False)


def test_resume_refuses_a_last_checkpoint_that_records_no_settings(tmp_path):
    torch.save({"side": {}, "optimizer": {}, "scheduler": {}, "state": {}}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="not a training state written by this version"):
        train(tiny_model(), DATA, DATA, _cfg(epochs=1), tmp_path, resume=True, progress=False)
