"""model.pt as a file: written with the mode every other file gets, and a file that is not one of
our checkpoints is refused with a message saying what it is not (never torch's advice to load it
with ``weights_only=False``, which would run the file's code)."""

from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch

from mpismoe_edge.model import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_model

    return tiny_model().eval()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)], ids=["022", "027", "077"])
def test_a_checkpoint_gets_the_mode_the_umask_gives_every_file(model, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_checkpoint(model, tmp_path / "model.pt")
        (tmp_path / "metrics.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.pt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.pt"]  # no temp file left


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _write(kind: str, path, tiny_checkpoint):
    if kind == "pickle-with-code":
        path.write_bytes(pickle.dumps({"format": "mpismoe-edge/1", "x": _RunsCode()}))
    elif kind == "torch-save-with-code":
        torch.save({"x": _RunsCode()}, path)
    elif kind == "a-whole-module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "garbage":
        path.write_bytes(b"hello, not a checkpoint")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    elif kind == "foreign-dict":
        torch.save({"weights": torch.zeros(2)}, path)


NOT_CHECKPOINTS = [
    ("pickle-with-code", "holds Python objects other than tensors and plain data"),
    ("torch-save-with-code", "holds Python objects other than tensors and plain data"),
    ("a-whole-module", "holds Python objects other than tensors and plain data"),
    ("garbage", "not a torch.save file, or a truncated or corrupt one"),
    ("empty", "not a torch.save file, or a truncated or corrupt one"),
    ("truncated", "not a torch.save file, or a truncated or corrupt one"),
    ("foreign-dict", "format 'mpismoe-edge/1' expected"),
]


@pytest.mark.parametrize("kind, message", NOT_CHECKPOINTS, ids=[k for k, _ in NOT_CHECKPOINTS])
def test_a_file_that_is_not_our_checkpoint_says_what_it_is_not(tmp_path, tiny_checkpoint, capfd, kind, message):
    path = tmp_path / "x.pt"
    _write(kind, path, tiny_checkpoint)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert text.startswith(f"{path}: not an mpismoe-edge checkpoint") and message in text
    assert "weights_only" not in text and "\n" not in text
    assert "pwned" not in capfd.readouterr().out


def test_a_streamed_save_that_fails_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    from mpismoe_edge.files import save_torch

    save_torch(tmp_path / "state.pt", {"epoch": 1}, buffered=False)
    with pytest.raises(Exception, match="pickle"):
        save_torch(tmp_path / "state.pt", {"epoch": 2, "code": lambda: None}, buffered=False)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"epoch": 1}


def test_the_temp_files_of_a_killed_write_are_removed_and_no_others(tmp_path):
    from mpismoe_edge.files import remove_leftover_temps, save_torch

    save_torch(tmp_path / "state.pt", {"epoch": 1})
    (tmp_path / ".state.pt.4242.0badcafe.tmp").write_bytes(b"half a state")  # as a kill mid-write leaves it
    (tmp_path / ".last.pt.4242.0badcafe.tmp").write_bytes(b"another file's")
    assert remove_leftover_temps(tmp_path / "state.pt") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.pt.4242.0badcafe.tmp", "state.pt"]
