"""One run of ``benchmarks/tasks.py``: one method on one task, backbone and seed, in a process of its own.

:func:`run_one` builds and trains the method (``benchmarks/peers.py``) and returns the row the
sweep appends to its results file: validation and test metrics at the epoch chosen on
validation (the test split is scored once, by that epoch's model: ``benchmarks/scoring.py``),
peak RSS of the process over build and training, trainable parameters, seconds, training rows,
epochs, learning rate and (side methods) weight decay. :func:`probe_one` measures the method's
peak live tensors (``benchmarks/measure.py``).

With ``--cached-states DIR`` the side methods train on the frozen backbone's states cached in
DIR (``benchmarks/side_probe.py``'s cache: fp16, per task, backbone kind and seed), not on a
backbone forward per step, several times faster on a large backbone; the chosen epoch's side
network then goes into the method's real model, which is scored like every other method. Such a
run's peak RSS holds the cache, so it is not reported.
Every run first gives freed memory back to the system and caps oneDNN's kernel cache, as
``mpismoe-train`` does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.measure import PeakRSS, rss, tensor_peak
from benchmarks.peers import (
    CLI_METHOD,
    RIDGE_METHOD,
    SIDE_METHODS,
    fine_tuned,
    run_mpismoe_train,
    side_config,
    side_model,
)
from benchmarks.run_state import STATE_FILE
from benchmarks.scoring import score
from benchmarks.task_data import backbone_path, load_task, write_split_files


def _setup(args):
    import torch

    from mpismoe_edge.memory import bound_kernel_cache, return_freed_memory

    bound_kernel_cache()
    return_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info, train, val, test = load_task(args.data, args.task, args.seed, args.train_rows, args.val_rows)
    import peft  # noqa: F401  (code, not training memory: imported before the baseline)

    return info, train, val, test


def build(method: str, info: dict, args):
    """(model, tokenizer) of ``method`` on ``args.backbone``."""
    from mpismoe_edge.config import SideConfig
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import load_backbone

    path = backbone_path(args.backbone, args.data)
    backbone, tok_json = load_backbone(path)
    tok = make_tokenizer(tok_json, args.max_length)
    if method in SIDE_METHODS:
        model = side_model(
            method, backbone, tok_json, path, info["task"], info["labels"], max_length=args.max_length,
            expert_bits=args.expert_bits, bits=args.bits, seed=args.seed, lst_ffn_bits=SideConfig.expert_bits,
        )  # fmt: skip
        return model, tok
    outputs = 1 if info["task"] == "regression" else len(info["labels"])
    return fine_tuned(backbone, outputs, info["task"] == "token-classification", lora=method == "lora"), tok


def lr_option(method: str) -> str:
    """The sweep's option holding ``method``'s learning rate (an ``args`` attribute)."""
    return {"full-ft": "full_lr", "lora": "lora_lr"}.get(method, "side_lr")


def learning_rate(method: str, args) -> float:
    """The learning rate ``method`` trains with: ``--full-lr``, ``--lora-lr`` or ``--side-lr``."""
    return getattr(args, lr_option(method))


def _side_train_config(method: str, args):
    """The ``TrainConfig`` of a side method's run in the sweep."""
    from mpismoe_edge.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.side_lr, weight_decay=args.side_wd, seed=args.seed,
        patience=args.patience, min_steps=args.min_steps, skip_init="ridge" if method == RIDGE_METHOD else "zero",
    )  # fmt: skip


def _run_dir(method: str, args, lr: float) -> Path:
    """The run's own folder under ``--workdir`` (its training state, and a side method's files)."""
    from mpismoe_edge.train import TrainConfig

    wd = "" if method not in SIDE_METHODS or args.side_wd == TrainConfig.weight_decay else f"-wd{args.side_wd:g}"
    return Path(args.workdir) / f"{args.task}-{args.backbone}-{method}-{args.seed}-lr{lr:g}{wd}"


def _train_side(method: str, model, train_ds, val_ds, args) -> tuple[int, int, int]:
    """``mpismoe_edge.train`` with the sweep's settings, continuing an interrupted run of the same
    settings; (chosen epoch, epochs trained, epochs of them an earlier process trained)."""
    from mpismoe_edge.resume import read_last, run_settings
    from mpismoe_edge.runtime.spec import LAST_CHECKPOINT_FILE
    from mpismoe_edge.selection import EpochLog
    from mpismoe_edge.train import train

    tcfg = _side_train_config(method, args)
    out = _run_dir(method, args, args.side_lr)
    try:
        saved = read_last(out / LAST_CHECKPOINT_FILE, run_settings(model.config, tcfg))
    except ValueError as exc:  # another version's state: this run starts over
        print(f"starting over: {exc}", file=sys.stderr)
        (out / LAST_CHECKPOINT_FILE).unlink()
        saved = None
    del saved  # only read to drop another version's state; train() reads it again
    res = train(model, train_ds, val_ds, tcfg, out, resume=True, progress=False)
    return EpochLog(model.config.task, res.history).best_metrics["epoch"], res.history[-1]["epoch"], res.resumed_epochs


def _train_side_on_states(method: str, info: dict, args):
    """:func:`_train_side` on the states cached in ``args.cached_states``, continuing an
    interrupted run (its state is deleted once the run is trained); (the method's model holding
    the chosen epoch's side network, its experts packed as ``mpismoe-train`` packs them,
    tokenizer, chosen epoch, epochs trained, trainable parameters, epochs an earlier process trained)."""
    from benchmarks.side_probe import states, train_on_states
    from mpismoe_edge.config import SideConfig
    from mpismoe_edge.model import load_backbone

    side_cfg, quant = side_config(method, args.expert_bits, args.bits, args.seed, SideConfig.expert_bits)
    if quant is not None and quant.bits != 4:
        raise ValueError(f"--cached-states holds 4-bit backbone states, not {quant.bits}-bit ones")
    where = argparse.Namespace(**{**vars(args), "workdir": args.cached_states})
    cache = states(args.task, "q4" if quant is not None else "fp32", args.seed, where, test=False)
    float_backbone, _ = load_backbone(backbone_path(args.backbone, args.data))  # the pruned init reads it
    state = _run_dir(method, args, args.side_lr) / STATE_FILE
    trained, run = train_on_states(
        side_cfg, _side_train_config(method, args), cache, info["task"], info["labels"], float_backbone,
        args.max_length, method, progress=False, test=False,  # the real model is scored on the live test split
        state=state,
    )  # fmt: skip
    state.unlink(missing_ok=True)
    side = trained.side.state_dict()
    del cache, float_backbone, trained  # before the real model is built: the float backbone and the states
    model, tok = build(method, info, args)
    model.side.load_state_dict(side)
    model.pack_experts()
    return model, tok, run["epoch"], run["epochs"], run["trainable_params"], run["resumed"]


def _train_plain(method: str, model, tok, info, train_ds, val_ds, args, lr: float) -> tuple[int, dict, int, int]:
    """Full fine-tuning / LoRA by ``benchmarks/peer_training.py``, continuing an interrupted run
    (its state is deleted once the run is trained); (chosen epoch, its validation metrics, epochs
    trained, epochs of them an earlier process trained), the model left at the chosen epoch's weights."""
    from benchmarks.peer_training import fit, trainable_state

    state = _run_dir(method, args, lr) / STATE_FILE
    run = fit(
        model, tok, info["task"], train_ds, lambda: score(model, tok, val_ds, info, model.input_names),
        lambda: trainable_state(model), lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        patience=args.patience, min_steps=args.min_steps, state=state,
    )  # fmt: skip
    model.load_state_dict(run.log.best, strict=False)
    state.unlink(missing_ok=True)
    return run.epoch, run.log.best_metrics, run.epochs, run.resumed


def run_one(method: str, args) -> dict:
    """Build and train ``method``; test metrics at the epoch chosen on validation, peak RSS, params, seconds."""
    info, train_ds, val_ds, test_ds = _setup(args)
    cached = bool(args.cached_states) and method in SIDE_METHODS
    resumed = 0
    base = rss()
    with PeakRSS() as mem:
        start = time.perf_counter()
        lr = None if method == CLI_METHOD else learning_rate(method, args)
        if method == CLI_METHOD:
            out = Path(args.workdir) / f"{args.task}-{args.backbone}-{CLI_METHOD}-{args.seed}"
            files = write_split_files(args.data, args.task, args.seed, args.train_rows, args.val_rows, out / "data")
            path = backbone_path(args.backbone, args.data) if args.backbone != "minilm" else None
            # params: as trained (the saved experts are packed)
            model, tok, epoch, trained, params = run_mpismoe_train(
                files, info["task"], path, args.seed, args.threads, out
            )
            val_ds, test_ds = (d.relabel(model.config.labels) for d in (val_ds, test_ds))  # the CLI sorts label names
            val = score(model, tok, val_ds, info, model.input_names)
        elif cached:
            model, tok, epoch, trained, params, resumed = _train_side_on_states(method, info, args)
            val = score(model, tok, val_ds, info, model.input_names)
        elif method in SIDE_METHODS:
            model, tok = build(method, info, args)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            epoch, trained, resumed = _train_side(method, model, train_ds, val_ds, args)
            val = score(model, tok, val_ds, info, model.input_names)
        else:
            model, tok = build(method, info, args)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            epoch, val, trained, resumed = _train_plain(
                method, model, tok, info, train_ds, val_ds, args, learning_rate(method, args)
            )
        test = score(model, tok, test_ds, info, model.input_names)  # once, by the chosen epoch's model
        seconds = time.perf_counter() - start
    return {
        "task": args.task,
        "backbone": args.backbone,
        "method": method,
        "seed": args.seed,
        "epoch": epoch,
        "val": val,
        "test": test,
        "peak_rss_mb": None if cached else (mem.peak - base) / 2**20,
        "trainable_params": params,
        "seconds": seconds,
        "train_rows": len(train_ds),
        "epochs": trained,
        "lr": lr,
        "weight_decay": args.side_wd if method in SIDE_METHODS else None,
        **({"cached_states": True} if cached else {}),
        **({"resumed_epochs": resumed} if resumed else {}),  # an interrupted run's: its time and RSS are not one run's
    }


def probe_one(method: str, args) -> dict:
    """Model tensor bytes and peak live tensor bytes (MB) over ``args.probe_steps`` training steps
    on the longest batches, with a fresh AdamW (its state is allocated inside the window)."""
    info, train_ds, _, _ = _setup(args)
    model, tok = build(method, info, args)
    return tensor_peak(
        model, tok, train_ds, info["task"], batch_size=args.batch_size, seed=args.seed, steps=args.probe_steps,
        aux=method in SIDE_METHODS,
    )  # fmt: skip
