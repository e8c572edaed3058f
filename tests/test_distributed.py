"""Data-parallel training: 2 gloo processes on the CPU train what one process trains on the same
global batches, and a killed 2-process torchrun run resumes from its last epoch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import LABELS, TEXTS, tiny_model

from mpismoe_edge.data import Dataset
from mpismoe_edge.distributed import World, shard
from mpismoe_edge.model import read_checkpoint
from mpismoe_edge.train import TrainConfig, train

pytestmark = pytest.mark.slow  # torchrun processes

# 33 rows in batches of 8: the last global batch has one row, so one rank runs it with weight 0
DATA = Dataset(TEXTS * 4 + TEXTS[:1], LABELS * 4 + LABELS[:1], ["neg", "neu", "pos"])
CFG = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_ratio=0.1, min_steps=0, device="cpu", threads=1)
SIDE = {"dropout": 0.0, "aux_loss_coef": 0.0, "z_loss_coef": 0.0}  # no per-rank randomness or per-rank statistics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from mpismoe_edge.distributed import leave

    train(tiny_model(expert_bits=None, **SIDE), DATA, DATA, CFG, out, progress=False)
    leave()


def test_shard_gives_every_rank_its_own_rows_and_an_empty_rank_weight_zero():
    rows = list(range(7))
    parts = [shard(rows, World(r, 3)) for r in range(3)]
    assert sorted(i for p, _ in parts for i in p) == rows and all(w == 1.0 for _, w in parts)
    assert shard([5], World(1, 2)) == ([5], 0.0)


def _without_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """The attention keys' bias has a gradient of exactly zero (softmax ignores a shift shared by
    all keys), so AdamW turns its rounding noise into full-size steps in either run: left out."""
    if name.endswith("attn.qkv.bias"):
        dim = t.numel() // 3
        return torch.cat([t[:dim], t[2 * dim :]])
    return t


def test_two_gloo_processes_train_the_same_side_network_as_one(tmp_path):
    one = train(tiny_model(expert_bits=None, **SIDE), DATA, DATA, CFG, tmp_path / "one", progress=False)
    mp.start_processes(_rank, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, start_method="spawn")
    a = read_checkpoint(tmp_path / "one" / "model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "two" / "model.pt")["state_dict"]
    side = [k for k in a if k.startswith("side.")]
    assert side and a.keys() == b.keys()
    diff = max((_without_key_bias(k, a[k]) - _without_key_bias(k, b[k])).abs().max().item() for k in side)
    init = tiny_model(expert_bits=None, **SIDE).side.state_dict()
    moved = max((a[k] - init[k.removeprefix("side.")]).abs().max().item() for k in side)
    assert moved > 1e-3 and diff < 1e-6  # trained, and the same to float rounding
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and one.world_size == 1
    assert metrics["final"]["accuracy"] == pytest.approx(one.final["accuracy"])  # evaluation summed over both ranks


def test_a_killed_two_process_torchrun_run_resumes_from_its_last_epoch(tmp_path, backbone_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS * 50, LABELS * 50)))
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mpismoe_edge.cli",
        "--backbone",
        str(backbone_dir),
        "--data",
        str(data),
        "--eval-data",
        str(data),
        "-o",
        str(out),
        "--epochs",
        "3",
        "--min-steps",
        "0",
        "--batch-size",
        "8",
        "--group-size",
        "32",
        "--quant-method",
        "rtn",
        "--reduction",
        "2",
        "--expert-bits",
        "4",
        "--device",
        "cpu",
        "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert run.poll() is None, run.stderr.read().decode()[-3000:]  # still running: the first epoch was just saved
    os.killpg(run.pid, signal.SIGKILL)  # the whole torchrun job
    run.wait()
    assert (out / "last.pt").exists()
    assert not (out / "model.pt").exists()  # killed mid-run
    first = torch.load(out / "last.pt", weights_only=True)["progress"]["history"]
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][: len(first)] == first  # the saved epochs were not trained again
    assert json.loads(done.stdout.strip().splitlines()[-1])["world_size"] == 2  # rank 0 alone prints the summary
