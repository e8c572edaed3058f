"""Token classification: word tags from JSONL, scored on each word's first sub-token."""

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from mpismoe_edge.cli import train_main
from mpismoe_edge.data import Dataset, load_file
from mpismoe_edge.inference import evaluate, make_tokenizer, predict
from mpismoe_edge.model import load_checkpoint
from mpismoe_edge.runtime.tasks import kind
from mpismoe_edge.train import TrainConfig, train

TAGS = ["O", "NEG", "POS"]
POLARITY = {"good": 2, "great": 2, "love": 2, "happy": 2, "bad": 1, "awful": 1, "hate": 1, "sad": 1}
SENTENCES = [
    "i love this movie",
    "this car is awful",
    "we hate slow cars",
    "a great film",
    "they think it was bad",
    "very happy",
    "really sad film",
    "the good car was fast",
]
WORDS = [s.split() for s in SENTENCES]
DATA = Dataset(WORDS * 4, [[POLARITY.get(w, 0) for w in ws] for ws in WORDS] * 4, TAGS)


def _model(**kw):
    return tiny_model(task="token-classification", labels=TAGS, **kw)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_word_tags_land_on_the_first_sub_token_only():
    tok = make_tokenizer(tiny_tokenizer().to_str(), 16)
    encs = tok.tokenize_words([["i", "zzq", "love"]])
    assert encs[0].tokens == ["[CLS]", "i", "z", "##z", "##q", "love", "[SEP]"]
    assert kind("token-classification").targets(encs, [[0, 1, 2]], TAGS).tolist() == [[-100, 0, 1, -100, -100, 2, -100]]


def test_truncated_words_are_not_scored():
    tok = make_tokenizer(tiny_tokenizer().to_str(), 4)
    encs = tok.tokenize_words([["i", "love", "this", "movie"]])
    assert kind("token-classification").targets(encs, [[1, 2, 1, 2]], TAGS).tolist() == [[-100, 1, 2, -100]]


def test_jsonl_words_and_tag_names_load_as_ids(tmp_path):
    path = _write_jsonl(
        tmp_path / "ner.jsonl",
        [{"tokens": ["i", "love", "it"], "tags": ["O", "POS", "O"]}, {"tokens": ["bad"], "tags": ["NEG"]}],
    )
    ds = load_file(path, task="token-classification")
    assert ds.texts == [["i", "love", "it"], ["bad"]]
    assert ds.labels == ["NEG", "O", "POS"] and ds.targets == [[1, 2, 1], [0]]


def test_a_tag_count_that_differs_from_the_word_count_is_refused(tmp_path):
    path = _write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["i", "love"], "tags": ["O"]}])
    with pytest.raises(ValueError, match="ner.jsonl line 1: 'tags' must be a list with one tag per word"):
        load_file(path, task="token-classification")


def test_an_unknown_tag_names_its_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "ner.jsonl", [{"tokens": ["i"], "tags": ["O"]}, {"tokens": ["a", "b"], "tags": ["O", "X"]}]
    )
    with pytest.raises(
        ValueError, match=r"ner.jsonl line 2: label 'X' is neither one of \['O', 'POS'\] nor a class id in \[0, 2\)"
    ):
        load_file(path, task="token-classification", labels=["O", "POS"])


def test_token_classification_csv_is_refused(tmp_path):
    path = tmp_path / "ner.csv"
    path.write_text("tokens,tags\ni love,O POS\n")
    with pytest.raises(ValueError, match="must be JSONL"):
        load_file(path, task="token-classification")


def test_plain_texts_are_refused_by_a_token_model(tmp_path):
    with pytest.raises(ValueError, match="cannot train on plain texts"):
        train(_model(), Dataset(SENTENCES, [0] * 8, TAGS), DATA, TrainConfig(epochs=1), tmp_path, progress=False)


def test_words_are_refused_by_a_sequence_model(tmp_path):
    with pytest.raises(ValueError, match="cannot train on texts split into words"):
        train(tiny_model(), DATA, DATA, TrainConfig(epochs=1), tmp_path, progress=False)


def test_the_side_network_learns_word_tags(tmp_path):
    model = _model(expert_bits=None)
    tok = make_tokenizer(model.tokenizer_json, 16)
    before = evaluate(model, tok, DATA)["accuracy"]
    cfg = TrainConfig(epochs=15, batch_size=8, lr=5e-3, warmup_ratio=0.1, patience=20, min_steps=0)
    result = train(model, DATA, DATA, cfg, tmp_path, progress=False)
    assert before < 0.9 and result["final"]["accuracy"] >= 0.95


def test_predict_gives_one_logit_row_per_real_token():
    model = _model().eval()
    tok = make_tokenizer(model.tokenizer_json, 16)
    out = predict(model, tok, ["i love it", "bad"], model.input_names)
    assert [t.shape for t in out] == [(5, 3), (3, 3)]


def test_cli_trains_a_token_model_from_jsonl(tmp_path, capsys, backbone_dir):
    rows = [{"tokens": ws, "tags": [TAGS[POLARITY.get(w, 0)] for w in ws]} for ws in WORDS]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    code = train_main(
        [
            "--backbone",
            str(backbone_dir),
            "--data",
            str(data),
            "--eval-data",
            str(data),
            "--task",
            "token-classification",
            "--epochs",
            "1",
            "--min-steps",
            "0",
            "--bits",
            "4",
            "--quant-method",
            "rtn",
            "--group-size",
            "32",
            "--reduction",
            "4",
            "--experts",
            "2",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert code == 0
    model = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model.config.task == "token-classification" and model.config.labels == sorted(TAGS)
    ids = torch.tensor([[2, 10, 11, 3]])
    assert model(ids, torch.ones_like(ids)).shape == (1, 4, 3)


def test_cli_token_task_without_data_exits_2(capsys):
    assert train_main(["--task", "token-classification", "--quiet"]) == 2
    assert "needs --data" in capsys.readouterr().err


def test_cli_reads_the_columns_it_is_told(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "conll.jsonl", [{"tokens": ["i", "love", "it"], "ner_tags": [0, 2, 0]}])
    args = [
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "--task",
        "token-classification",
        "--quiet",
        "--backbone",
        str(tmp_path / "missing"),
    ]
    assert train_main(args) == 2
    assert "conll.jsonl line 1: 'tags' missing (the row has ['ner_tags', 'tokens'])" in capsys.readouterr().err
    assert train_main(args + ["--label-column", "ner_tags"]) == 2
    assert "no Hugging Face model at" in capsys.readouterr().err  # the data was read; the backbone is next


def test_the_real_minilm_tokenizer_tags_each_given_word_once():
    from pathlib import Path

    from mpismoe_edge.model import default_backbone_path
    from mpismoe_edge.runtime.text import TextEncoder

    try:
        path = Path(default_backbone_path()) / "tokenizer.json"
    except FileNotFoundError:
        pytest.skip("the bundled MiniLM is not installed")
    (enc,) = TextEncoder(path, 64).tokenize_words([["@united", "flights", "#DeflateGate"]])
    targets = kind("token-classification").targets([enc], [[1, 0, 2]], TAGS)[0].tolist()
    # the pre-tokenizer splits '@united' and '#DeflateGate' further; each given word is still one word
    assert [(enc.tokens[i], t) for i, t in enumerate(targets) if t != -100] == [("@", 1), ("flights", 0), ("#", 2)]


def test_validation_of_bio_tags_reports_the_entity_f1_of_the_words():
    from mpismoe_edge.metrics import entity_f1

    bio = ["B-x", "I-x", "O"]
    data = Dataset(WORDS, [[i % 3 for i in range(len(ws))] for ws in WORDS], bio)
    model = tiny_model(task="token-classification", labels=bio).eval()
    tok = make_tokenizer(model.tokenizer_json, 16)
    encs = tok.tokenize_words(data.texts)
    first = [
        [t for t, w in enumerate(e.word_ids) if w is not None and (t == 0 or e.word_ids[t - 1] != w)] for e in encs
    ]
    pred = [
        [bio[int(lg[t].argmax())] for t in ts]
        for lg, ts in zip(predict(model, tok, data.texts, model.input_names), first)
    ]
    true = [[bio[t] for t in row] for row in data.targets]
    assert evaluate(model, tok, data)["entity_f1"] == pytest.approx(entity_f1(true, pred)["f1"])


def test_tags_without_entities_are_judged_on_accuracy_alone():
    assert "entity_f1" not in evaluate(_model().eval(), make_tokenizer(_model().tokenizer_json, 16), DATA)
