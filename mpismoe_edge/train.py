"""Training of the side network (the backbone stays frozen): AdamW, warmup + linear decay,
eval each epoch, the best epoch kept and early stopping (the rules: ``selection.py``), resumable
from ``last.pt``; writes ``model.pt`` atomically.

Runs on the CPU or a CUDA device, in fp32, bf16 or fp16 (``device.py``), in one process or
data-parallel over the ranks that ``torchrun`` started (``distributed.py``): every rank trains
on its own rows of each global batch, evaluation is summed over the ranks, and only rank 0
writes ``last.pt``, ``model.pt`` and ``metrics.json``. The steps themselves are ``loop.train_epoch``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from . import distributed
from .config import JsonConfig
from .data import Dataset
from .device import DEVICES, PRECISIONS, grad_scaler, peak_memory, reset_peak_memory, resolve_device
from .inference import evaluate, feed, make_tokenizer, targets, token_lengths, tokenize
from .loop import Batch, batch_order, train_epoch
from .memory import release_free_pages, return_freed_memory
from .model import MPISMoEModel, save_checkpoint
from .runtime.spec import CHECKPOINT_FILE, LAST_CHECKPOINT_FILE, METRICS_FILE
from .selection import planned_epochs, selection_key, should_stop, steps_per_epoch
from .skip_fit import SKIP_INITS, fit_skip


@dataclass
class TrainConfig(JsonConfig):
    epochs: int = 3
    batch_size: int = 32  # the global batch: split over the ranks of a distributed run
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    patience: int = 2  # epochs without a better (metric, -loss) on validation before stopping early
    min_steps: int = 200  # optimizer steps at least: small data trains more epochs (selection.py)
    seed: int = 0
    threads: int | None = None
    return_freed_memory: bool = True  # glibc: give freed activations and heap holes back to the system (memory.py)
    device: str = "auto"  # cpu | cuda | auto (CUDA when there is one); a rank uses GPU LOCAL_RANK
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass (device.py)
    skip_init: str = "ridge"  # with SideConfig.skip: ridge (the closed-form probe, frozen; skip_fit.py) | zero

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_init not in SKIP_INITS:
            raise ValueError(f"unknown skip_init {self.skip_init!r}; expected one of {', '.join(SKIP_INITS)}")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0, got {self.min_steps}")


@dataclass
class TrainResult:
    """What a training run did: validation per epoch and of the final (packed) model, the test
    score (once, by the final model) and cost; ``metrics.json`` holds ``to_dict()``."""

    history: list[dict[str, float]]
    final: dict[str, float]
    test: dict[str, float] | None
    train_seconds: float
    trainable_params: int
    world_size: int
    device: str
    peak_rss_mb: float  # this process (rank 0), since it started
    peak_cuda_allocated_mb: float | None  # rank 0's device, over training and evaluation; None on the CPU
    train_config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:  # mapping access, as when train() returned a dict
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def check_compatible(model: MPISMoEModel, data: Dataset) -> None:
    """Raise ValueError before training when data, labels or tokenizer do not fit the model."""
    if len(data) == 0:
        raise ValueError("empty dataset")
    if model.tokenizer_json is None:
        raise ValueError("the model has no tokenizer; text training needs the backbone's tokenizer.json")
    vocab = Tokenizer.from_str(model.tokenizer_json).get_vocab_size()
    emb = int(getattr(model.backbone.config, "vocab_size", vocab))
    if vocab > emb:
        raise ValueError(f"tokenizer vocabulary ({vocab}) does not match the backbone's embeddings ({emb} rows)")
    token_task = model.config.task == "token-classification"
    if token_task != isinstance(data.texts[0], list):
        kind = "texts split into words" if isinstance(data.texts[0], list) else "plain texts"
        raise ValueError(f"a {model.config.task} model cannot train on {kind}")
    if model.config.task != "regression":
        n = len(model.config.labels)
        ids = [t for row in data.targets for t in row] if token_task else data.targets
        bad = [t for t in ids if not 0 <= int(t) < n]
        if bad:
            raise ValueError(f"label id {bad[0]} out of range for {n} labels {model.config.labels}")


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (``cfg.lr``, ``cfg.weight_decay``) with a linear warmup over ``cfg.warmup_ratio`` of
    ``steps``, then a linear decay to zero at ``steps``; call ``sched.step()`` after each step."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    return opt, sched


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train(
    model: MPISMoEModel,
    train_data: Dataset,
    eval_data: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    test_data: Dataset | None = None,
) -> TrainResult:
    """Train the side network; write ``out_dir/model.pt`` (experts packed) and ``metrics.json``.

    ``eval_data`` chooses the best epoch and stops early; ``test_data``, when given, is only
    scored once, by the final model (``result.test``), so that no choice sees it. Under
    ``torchrun`` every rank calls this with the same arguments."""
    for data in (train_data, eval_data, test_data):
        if data is not None:
            check_compatible(model, data)
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    world = distributed.join(device)
    shard = (world.rank, world.size)
    show = progress and world.is_main
    out = Path(out_dir)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.return_freed_memory:
        return_freed_memory()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.to(device)
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    task = model.config.task
    last = out / LAST_CHECKPOINT_FILE
    resuming = resume and last.is_file()
    probe = None
    if cfg.skip_init == "ridge" and model.side.skip is not None:
        if resuming:  # last.pt holds the fitted skip; only its frozen state matters here
            model.side.skip.requires_grad_(False)
        else:
            probe_start = time.perf_counter()
            probe = fit_skip(model, tok, train_data, eval_data, cfg.eval_batch_size, device, progress=show)
            probe_seconds = time.perf_counter() - probe_start
            if show:
                tqdm.write(f"linear skip: ridge probe, strength {probe.alpha:g}, logit scale {probe.scale:g}")
    params = [p for p in model.parameters() if p.requires_grad]
    side = distributed.wrap(model.side, world, device, sparse=bool(model.side.moe_layers()))
    epochs = planned_epochs(cfg.epochs, len(train_data), cfg.batch_size, cfg.min_steps)
    per_epoch = steps_per_epoch(len(train_data), cfg.batch_size)
    if epochs > cfg.epochs and show:
        tqdm.write(
            f"{len(train_data)} rows make {per_epoch} steps an epoch: training {epochs} epochs "
            f"to take at least min_steps={cfg.min_steps} steps"
        )
    opt, sched = make_optimizer(params, cfg, epochs * per_epoch)
    scaler = grad_scaler(device, cfg.precision)
    state = {"epoch": 0, "history": [], "best_key": None, "best_side": None, "bad_epochs": 0}
    if resuming:
        saved = torch.load(last, map_location=device, weights_only=True)
        model.side.load_state_dict(saved["side"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        if "best_key" not in state:  # a last.pt of a version that judged on the metric alone
            state["best_key"] = [state.pop("best_score"), -math.inf]
    distributed.barrier()  # no rank may overwrite last.pt before all have read it

    def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return side(model.backbone_states(**inputs), inputs.get("attention_mask"))

    def batches(epoch: int):
        for idx in batch_order(lengths, cfg.batch_size, cfg.seed * 1000 + epoch):
            rows, weight = distributed.shard(idx, world)
            encs = tokenize(tok, [train_data.texts[j] for j in rows])
            yield Batch(
                feed(tok, encs, model.input_names, device),
                targets(task, encs, [train_data.targets[j] for j in rows]),
                weight,
            )

    def judge(metrics: dict[str, float]) -> None:
        """Record an epoch's validation; keep the side network if it is the best so far."""
        state["history"].append(metrics)
        key = selection_key(metrics)
        if state["best_key"] is None or key > tuple(state["best_key"]):
            state["best_key"], state["bad_epochs"] = list(key), 0
            state["best_side"] = {k: v.detach().clone() for k, v in model.side.state_dict().items()}
        else:
            state["bad_epochs"] += 1

    if probe is not None:  # the probe alone is epoch 0: a side network must beat it on validation to be kept
        metrics = evaluate(model, tok, eval_data, cfg.eval_batch_size, shard, progress="validation" if show else None)
        metrics["epoch"], metrics["seconds"] = 0, probe_seconds
        judge(metrics)
        if show:
            tqdm.write(
                "epoch 0 (ridge probe): "
                + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "seconds"))
            )
    lengths = token_lengths(tok, train_data.texts)
    reset_peak_memory(device)
    start = time.perf_counter()
    for epoch in range(state["epoch"], epochs):
        if should_stop(state["bad_epochs"], cfg.patience, epoch * per_epoch, cfg.min_steps):
            break
        model.train()
        epoch_start = time.perf_counter()
        train_epoch(
            forward,
            batches(epoch),
            opt,
            sched,
            params,
            task,
            aux_loss=model.aux_loss,
            grad_clip=cfg.grad_clip,
            device=device,
            precision=cfg.precision,
            scaler=scaler if scaler.is_enabled() else None,
            world=world,
            after_step=release_free_pages
            if cfg.return_freed_memory
            else None,  # the step's small tensors left holes in the heap
            desc=f"epoch {epoch + 1}/{epochs}",
            progress=show,
        )
        seconds = time.perf_counter() - epoch_start
        metrics = evaluate(model, tok, eval_data, cfg.eval_batch_size, shard, progress="validation" if show else None)
        metrics["epoch"], metrics["seconds"] = epoch + 1, seconds  # seconds: the epoch's training steps
        judge(metrics)
        state["epoch"] = epoch + 1
        if show:
            tqdm.write(
                f"epoch {epoch + 1}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "seconds"))
                + f" ({seconds:.1f} s)"
            )
        if world.is_main:
            saved = {
                "side": model.side.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "state": state,
            }
            if scaler.is_enabled():
                saved["scaler"] = scaler.state_dict()
            _save_state(last, saved)
        distributed.barrier()
    if state["best_side"] is not None:
        model.side.load_state_dict(state["best_side"])
    model.eval()
    if model.config.side.expert_bits is not None:
        if show:
            tqdm.write(
                f"packing the experts ({model.config.quant.method if model.config.quant else 'gnpiq'}, "
                f"{model.config.side.expert_bits} bits)"
            )
        model.to("cpu")  # the quantizers' home; every rank packs the same weights the same way
        model.pack_experts()
        model.to(device)
    final = evaluate(model, tok, eval_data, cfg.eval_batch_size, shard, progress="final validation" if show else None)
    train_seconds = time.perf_counter() - start  # as before: training, packing and the final validation
    test = (
        evaluate(model, tok, test_data, cfg.eval_batch_size, shard, progress="test" if show else None)
        if test_data is not None
        else None
    )
    memory = peak_memory(device)
    result = TrainResult(
        history=state["history"],
        final=final,
        test=test,
        train_seconds=train_seconds,
        trainable_params=sum(p.numel() for p in params),
        world_size=world.size,
        device=str(device),
        peak_rss_mb=memory["peak_rss_mb"],
        peak_cuda_allocated_mb=memory.get("peak_cuda_allocated_mb"),
        train_config=cfg.to_dict(),
    )
    if world.is_main:
        save_checkpoint(model, out / CHECKPOINT_FILE)
        _write_json(out / METRICS_FILE, result.to_dict())
    distributed.barrier()
    return result
