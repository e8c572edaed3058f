"""benchmarks/peers.py and peer_training.py: the peers as built, the loop's epoch rule, the scripts run by path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, tiny_backbone, tiny_tokenizer

from benchmarks.peer_training import fit, trainable_state
from benchmarks.peers import fine_tuned, side_config
from mpismoe_edge.data import Dataset
from mpismoe_edge.inference import encode, make_tokenizer

ROOT = Path(__file__).parents[1]


def _data(n: int) -> Dataset:
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4)) for i in range(n)]
    return Dataset(texts, [i % 2 for i in range(n)], ["a", "b"])


def _tok():
    return make_tokenizer(tiny_tokenizer().to_str(), 16)


def test_full_fine_tuning_trains_the_backbone_and_a_mean_pooled_head():
    full = fine_tuned(tiny_backbone(), 2, token_level=False, lora=False)
    assert full.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(p.requires_grad for p in full.parameters())
    assert full(**encode(_tok(), ["good movie", "the car is fast"], full.input_names)).shape == (2, 2)


@pytest.mark.slow  # importing peft takes ~20 s on the shared machine
def test_lora_trains_only_its_adapters_and_the_head_per_token():
    lora = fine_tuned(tiny_backbone(), 3, token_level=True, lora=True)
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trained and all("lora_" in n or n.startswith("head.") for n in trained)
    feed = encode(_tok(), ["good movie", "the car is fast"], lora.input_names)
    assert lora(**feed).shape == (2, feed["input_ids"].shape[1], 3)


def test_side_configs_name_what_each_method_trains():
    lst, quant = side_config("lst", 4, 4, 0, lst_ffn_bits=4)  # benchmarks/tasks.py's LST: a 4-bit QAT dense FFN
    assert lst.dense_ffn and lst.expert_bits == 4 and lst.init == "random" and quant is None
    pruned, _ = side_config("lst-pruned", 4, 4, 0, lst_ffn_bits=None)  # benchmarks/train.py's: a float one
    assert pruned.expert_bits is None and pruned.init == "pruned"
    router, quant = side_config("mp-ismoe-side-router", 4, 3, 7, lst_ffn_bits=None)
    assert not router.interactive and not router.skip and (quant.bits, quant.seed) == (3, 7)
    assert side_config("mp-ismoe-ridge", 4, 4, 0, None)[0].skip
    assert side_config("mp-ismoe", 4, 4, 0, None)[0].interactive


def _fit(scores: list[dict], **kw):
    model = fine_tuned(tiny_backbone(), 2, False, False)
    judged, kept = iter(scores), []

    def keep():
        kept.append(trainable_state(model))
        return len(kept)

    run = fit(model, _tok(), "classification", _data(16), lambda: dict(next(judged)), keep, lr=1e-3, batch_size=8,
              seed=0, **kw)  # fmt: skip
    return run, kept


def test_the_loop_keeps_the_best_epoch_by_metric_then_loss_and_stops_after_patience():
    scores = [{"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.5, "loss": 0.8}, {"accuracy": 0.4, "loss": 0.1}]
    run, kept = _fit([*scores, {"accuracy": 0.9, "loss": 0.1}], epochs=5, patience=1, min_steps=0)
    assert run.epochs == 3  # epoch 3 was worse: patience 1 stops before epoch 4
    assert run.epoch == 2 and run.log.best == 2 and run.log.best_metrics == scores[1]  # the tie went to the lower loss
    assert set(kept[1]) == {n for n, _ in fine_tuned(tiny_backbone(), 2, False, False).named_parameters()}


def test_small_data_trains_the_minimum_steps_before_patience_counts():
    worse = [{"accuracy": 0.5 - 0.1 * i, "loss": 1.0} for i in range(4)]
    run, _ = _fit(worse, epochs=1, patience=1, min_steps=6)  # 2 steps an epoch: at least 3 epochs
    assert run.epochs == 3 and run.epoch == 1 and len(run.epoch_seconds) == 3


class _Stop(Exception):
    pass


def _fit_to_end(state, stop_at: int | None = None):
    """A 3-epoch run with its state in ``state``; ``stop_at``: the validation of that epoch raises (a kill)."""
    torch.manual_seed(0)
    model = fine_tuned(tiny_backbone(), 2, False, False)
    calls = iter(range(1, 10))

    def validate():  # a score of the weights: the same weights, the same history
        if next(calls) == stop_at:
            raise _Stop
        return {"accuracy": 0.5, "loss": float(model.head.weight.abs().sum())}

    torch.manual_seed(1)  # the dropout's draws
    try:
        run = fit(model, _tok(), "classification", _data(16), validate, lambda: trainable_state(model), lr=1e-3,
                  epochs=3, batch_size=8, seed=0, patience=5, min_steps=0, state=state)  # fmt: skip
    except _Stop:
        return None, model
    return run, model


def test_an_interrupted_run_continues_from_its_state_to_the_same_weights(tmp_path):
    whole, model = _fit_to_end(None)
    assert _fit_to_end(tmp_path / "state.pt", stop_at=3)[0] is None  # killed in epoch 3: epochs 1-2 are saved
    resumed, again = _fit_to_end(tmp_path / "state.pt")
    assert resumed.resumed == 2 and resumed.epochs == whole.epochs == 3 and resumed.epoch == whole.epoch
    assert resumed.log.history == whole.log.history
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_state_of_other_settings_is_refused_by_name(tmp_path):
    _fit_to_end(tmp_path / "state.pt", stop_at=2)
    model = fine_tuned(tiny_backbone(), 2, False, False)
    with pytest.raises(ValueError, match="state.pt was made with .*'lr': 0.001.*delete it to start over"):
        fit(model, _tok(), "classification", _data(16), dict, dict, lr=2e-3, epochs=3, batch_size=8, seed=0,
            patience=5, min_steps=0, state=tmp_path / "state.pt")  # fmt: skip


def test_a_run_starting_clears_what_a_state_write_killed_mid_way_left(tmp_path):
    _fit_to_end(tmp_path / "state.pt", stop_at=2)
    (tmp_path / ".state.pt.4242.0badcafe.tmp").write_bytes(b"half a state")  # the session ended mid-write
    _fit_to_end(tmp_path / "state.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


@pytest.mark.slow  # each imports torch in a fresh process: ~10 s on the shared machine
@pytest.mark.parametrize("script", ["tasks", "train", "frozen_probe", "side_probe"])
def test_a_benchmark_script_runs_by_path_from_anywhere(script, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
