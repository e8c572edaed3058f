"""mpismoe-train's failure paths: bad settings stop before any backbone work, a --resume of other
settings or of a broken last.pt is one error line, and a full disk loses no finished epoch."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import LABELS, TEXTS, TINY_TRAIN_FLAGS, tiny_model

from mpismoe_edge import cli
from mpismoe_edge.data import Dataset
from mpismoe_edge.files import WriteError
from mpismoe_edge.train import TrainConfig, train

DATA = Dataset(TEXTS * 4, LABELS * 4, ["neg", "neu", "pos"])
TINY = [*TINY_TRAIN_FLAGS, "-q"]


@pytest.fixture
def no_backbone(monkeypatch):
    """Loading the backbone fails the test: the checks under test must come before it."""

    def load_backbone(path):
        raise AssertionError("the backbone was loaded before the bad input was found")

    monkeypatch.setattr("mpismoe_edge.model.load_backbone", load_backbone)


def _run(tmp_path, tiny_jsonl, *extra: str) -> int:
    data = ["--data", str(tiny_jsonl), "--eval-data", str(tiny_jsonl), "-o", str(tmp_path / "run")]
    return cli.train_main([*data, *TINY, *extra])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "-1"], "TrainConfig.epochs must be a positive integer, got -1"),
        (["--batch-size", "0"], "TrainConfig.batch_size must be a positive integer, got 0"),
        (["--patience", "0"], "TrainConfig.patience must be a positive integer, got 0"),
        (["--min-steps", "-5"], "TrainConfig.min_steps must be an integer >= 0, got -5"),
        (["--lr", "0"], "TrainConfig.lr must be a number > 0, got 0.0"),
        (["--threads", "0"], "TrainConfig.threads must be a positive integer, got 0"),
        (["--experts", "2", "--top-k", "3"], "SideConfig.top_k (3) must be <= num_experts (2)"),
        (["--bits-map", "{bad"], "--bits-map is not valid JSON"),
        (["--bits-map", "[4]"], "--bits-map must be a JSON object"),
        (["--bits-map", '{"*": 5}'], "QuantConfig.bits_map: unsupported bit width"),
    ],
)
def test_a_bad_setting_is_one_error_line_before_the_backbone_loads(
    tmp_path, tiny_jsonl, capsys, no_backbone, flags, message
):
    assert _run(tmp_path, tiny_jsonl, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_resume_of_other_settings_is_one_error_line_before_the_backbone_loads(
    tmp_path, tiny_jsonl, backbone_dir, capsys, monkeypatch
):
    assert _run(tmp_path, tiny_jsonl, "--backbone", str(backbone_dir)) == 0
    capsys.readouterr()

    def load_backbone(path):
        raise AssertionError("the backbone was loaded before the resume was checked")

    monkeypatch.setattr("mpismoe_edge.model.load_backbone", load_backbone)
    assert _run(tmp_path, tiny_jsonl, "--backbone", str(backbone_dir), "--bits", "0", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "last.pt was made with model.quant=" in err


def test_a_resume_of_a_corrupt_last_checkpoint_is_one_error_line_before_the_backbone_loads(
    tmp_path, tiny_jsonl, capsys, no_backbone
):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert _run(tmp_path, tiny_jsonl, "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "last.pt is not a readable training state" in err


def _full_disk_after(monkeypatch, saves: int) -> None:
    """Files are written ``saves`` times, then the disk is full (after part of the next file)."""
    import os

    real, count = os.fdopen, [0]

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *a, **k):
        count[0] += 1
        f = real(fd, *a, **k)
        return f if count[0] <= saves else FullDisk(f)

    monkeypatch.setattr("mpismoe_edge.files.os.fdopen", fdopen)


def test_a_full_disk_keeps_the_last_finished_epoch_and_leaves_no_temp_file(tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=2, batch_size=8, min_steps=0)
    _full_disk_after(monkeypatch, saves=1)  # epoch 1's last.pt is written, epoch 2's is not
    with pytest.raises(WriteError, match=r"cannot write .*last\.pt: No space left on device"):
        train(tiny_model(), DATA, DATA, cfg, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 1


def test_a_full_disk_is_one_error_line_and_exit_2(tmp_path, tiny_jsonl, backbone_dir, capsys, monkeypatch):
    _full_disk_after(monkeypatch, saves=0)
    assert _run(tmp_path, tiny_jsonl, "--backbone", str(backbone_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "No space left on device" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "run").iterdir()] == []


def test_help_shows_every_default_from_the_configs(capsys):
    import re

    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig

    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    out = capsys.readouterr().out
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n  (?=-)", out) if e.startswith("-")}
    for option, default in [
        ("--max-length", ModelConfig.max_length),
        ("--bits", QuantConfig.bits),
        ("--experts", SideConfig.num_experts),
        ("--top-k", SideConfig.top_k),
        ("--epochs", TrainConfig.epochs),
        ("--lr", TrainConfig.lr),
        ("--n-train", 4000),
    ]:
        assert f"(default: {default})" in entries[option], entries[option]
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "exit codes: 0" in out


def test_quiet_prints_no_progress_bar_not_even_the_backbones_loading_bar(tmp_path, tiny_jsonl, backbone_dir, capfd):
    assert _run(tmp_path, tiny_jsonl, "--backbone", str(backbone_dir)) == 0  # TINY holds -q
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err
