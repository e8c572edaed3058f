"""One run of ``benchmarks/tasks.py``: one method on one task, backbone and seed, in a process of its own.

:func:`run_one` builds and trains the method (``benchmarks/peers.py``) and returns the row the
sweep appends to its results file: validation and test metrics at the epoch chosen on
validation (the test split is scored once, by that epoch's model: ``benchmarks/scoring.py``),
peak RSS of the process over build and training, trainable parameters, seconds, training rows,
epochs, learning rate and (side methods) weight decay. :func:`probe_one` measures the method's
peak live tensors (``benchmarks/measure.py``).
Every run first gives freed memory back to the system and caps oneDNN's kernel cache, as
``mpismoe-train`` does.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.measure import PeakRSS, rss, tensor_peak
from benchmarks.peers import CLI_METHOD, RIDGE_METHOD, SIDE_METHODS, fine_tuned, run_mpismoe_train, side_model
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


def _train_side(method: str, model, train_ds, val_ds, args) -> tuple[int, int]:
    """``mpismoe_edge.train`` with the sweep's settings; (chosen epoch, epochs trained)."""
    from mpismoe_edge.selection import EpochLog
    from mpismoe_edge.train import TrainConfig, train

    tcfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.side_lr, weight_decay=args.side_wd, seed=args.seed,
        patience=args.patience, min_steps=args.min_steps, skip_init="ridge" if method == RIDGE_METHOD else "zero",
    )  # fmt: skip
    wd = "" if args.side_wd == TrainConfig.weight_decay else f"-wd{args.side_wd:g}"
    out = os.path.join(args.workdir, f"{args.task}-{args.backbone}-{method}-{args.seed}-lr{args.side_lr:g}{wd}")
    res = train(model, train_ds, val_ds, tcfg, out, progress=False)
    return EpochLog(model.config.task, res.history).best_metrics["epoch"], res.history[-1]["epoch"]


def _train_plain(model, tok, info, train_ds, val_ds, args, lr: float) -> tuple[int, dict, int]:
    """Full fine-tuning / LoRA by ``benchmarks/peer_training.py``; (chosen epoch, its validation
    metrics, epochs trained), the model left at the chosen epoch's weights."""
    from benchmarks.peer_training import fit, trainable_state

    run = fit(
        model, tok, info["task"], train_ds, lambda: score(model, tok, val_ds, info, model.input_names),
        lambda: trainable_state(model), lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        patience=args.patience, min_steps=args.min_steps,
    )  # fmt: skip
    model.load_state_dict(run.log.best, strict=False)
    return run.epoch, run.log.best_metrics, run.epochs


def run_one(method: str, args) -> dict:
    """Build and train ``method``; test metrics at the epoch chosen on validation, peak RSS, params, seconds."""
    info, train_ds, val_ds, test_ds = _setup(args)
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
        elif method in SIDE_METHODS:
            model, tok = build(method, info, args)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            epoch, trained = _train_side(method, model, train_ds, val_ds, args)
            val = score(model, tok, val_ds, info, model.input_names)
        else:
            model, tok = build(method, info, args)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            epoch, val, trained = _train_plain(model, tok, info, train_ds, val_ds, args, learning_rate(method, args))
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
        "peak_rss_mb": (mem.peak - base) / 2**20,
        "trainable_params": params,
        "seconds": seconds,
        "train_rows": len(train_ds),
        "epochs": trained,
        "lr": lr,
        "weight_decay": args.side_wd if method in SIDE_METHODS else None,
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
