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
from .config import TrainConfig
from .data import Dataset
from .device import grad_scaler, peak_memory, reset_peak_memory, resolve_device
from .files import write_json
from .inference import evaluate, feed, make_tokenizer, token_lengths, tokenize
from .loop import Batch, batch_order, train_epoch
from .memory import release_free_pages, return_freed_memory
from .model import MPISMoEModel, save_checkpoint
from .resume import read_last, run_settings, write_last
from .runtime.spec import CHECKPOINT_FILE, LAST_CHECKPOINT_FILE, METRICS_FILE
from .runtime.tasks import kind
from .runtime.text import TextEncoder
from .selection import EpochLog, planned_epochs, steps_per_epoch
from .skip_fit import fit_skip

__all__ = ["TrainConfig", "TrainResult", "check_compatible", "make_optimizer", "train"]


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
    resumed_epochs: int = 0  # epochs an earlier process trained (``resume``): time and RSS are this process's

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
    task = kind(model.config.task)
    if task.token_level != isinstance(data.texts[0], list):
        given = "texts split into words" if isinstance(data.texts[0], list) else "plain texts"
        raise ValueError(f"a {task.name} model cannot train on {given}")
    if task.has_labels:
        n = len(model.config.labels)
        ids = [t for row in data.targets for t in row] if isinstance(data.targets[0], list) else data.targets
        bad = [t for t in ids if not 0 <= int(t) < n]
        if bad:
            raise ValueError(f"label id {bad[0]} out of range for {n} labels {model.config.labels}")


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what torch's fused AdamW updates


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (``cfg.lr``, ``cfg.weight_decay``) with a linear warmup over ``cfg.warmup_ratio`` of
    ``steps``, then a linear decay to zero at ``steps``; call ``sched.step()`` after each step.
    The fused kernel where torch has one for every parameter (CPU, CUDA): one pass over all
    parameters instead of a dozen small ops per tensor (the same update to ~1e-8)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    warm = max(1, int(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    return opt, sched


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _show(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "seconds"))


@dataclass
class _Run:
    """Where and how a run happens: its device, ranks, output folder and tokenizer."""

    model: MPISMoEModel
    cfg: TrainConfig
    out: Path
    device: torch.device
    world: distributed.World
    tok: TextEncoder
    show: bool  # progress bars and per-epoch lines (rank 0 only)

    @property
    def shard(self) -> tuple[int, int]:
        return self.world.rank, self.world.size

    def validate(self, data: Dataset, name: str = "validation") -> dict[str, float]:
        return evaluate(self.model, self.tok, data, self.cfg.eval_batch_size, self.shard, name if self.show else None)


def _start(model: MPISMoEModel, cfg: TrainConfig, out_dir: str | Path, progress: bool) -> _Run:
    """Join the ranks, place the model, seed, and make the output folder (rank 0)."""
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    world = distributed.join(device)
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
    return _Run(model, cfg, out, device, world, tok, progress and world.is_main)


def _fit_probe(run: _Run, train_data: Dataset, eval_data: Dataset, log: EpochLog, resumed: bool) -> None:
    """With a ridge-initialised skip: fit and freeze it (skip_fit.py), and score the probe alone
    as epoch 0, which a side network must beat on validation to be kept. A resumed run's
    ``last.pt`` already holds the fitted skip."""
    model, skip = run.model, run.model.side.skip
    if run.cfg.skip_init != "ridge" or skip is None:
        return
    if resumed:
        skip.requires_grad_(False)
        return
    start = time.perf_counter()
    probe = fit_skip(model, run.tok, train_data, eval_data, run.cfg.eval_batch_size, run.device, progress=run.show)
    seconds = time.perf_counter() - start
    if run.show:
        tqdm.write(f"linear skip: ridge probe, strength {probe.alpha:g}, logit scale {probe.scale:g}")
    metrics = run.validate(eval_data)
    metrics["epoch"], metrics["seconds"] = 0, seconds
    log.judge(metrics, lambda: _snapshot(model.side))
    if run.show:
        tqdm.write(f"epoch 0 (ridge probe): {_show(metrics)}")


def _epochs(run: _Run, train_data: Dataset, eval_data: Dataset, log: EpochLog, saved: dict | None) -> None:
    """Train epoch after epoch, judging each on validation, until the planned epochs are done
    or early stopping ends the run; after each epoch rank 0 writes ``last.pt``."""
    model, cfg, world = run.model, run.cfg, run.world
    params = [p for p in model.parameters() if p.requires_grad]
    side = distributed.wrap(model.side, world, run.device)
    epochs = planned_epochs(cfg.epochs, len(train_data), cfg.batch_size, cfg.min_steps)
    per_epoch = steps_per_epoch(len(train_data), cfg.batch_size)
    if epochs > cfg.epochs and run.show:
        tqdm.write(
            f"{len(train_data)} rows make {per_epoch} steps an epoch: training {epochs} epochs "
            f"to take at least min_steps={cfg.min_steps} steps"
        )
    opt, sched = make_optimizer(params, cfg, epochs * per_epoch)
    scaler = grad_scaler(run.device, cfg.precision)
    first = 0
    if saved is not None:
        model.side.load_state_dict(saved["side"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        first = saved["progress"]["epoch"]
    distributed.barrier()  # no rank may overwrite last.pt before all have read it
    task, settings = model.config.task, run_settings(model.config, cfg)
    lengths = token_lengths(run.tok, train_data.texts)

    def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return side(model.backbone_states(**inputs), inputs.get("attention_mask"))

    def batches(epoch: int):
        for idx in batch_order(lengths, cfg.batch_size, cfg.seed * 1000 + epoch):
            rows, weight = distributed.shard(idx, world)
            encs = tokenize(run.tok, [train_data.texts[j] for j in rows])
            targ = kind(task).targets(encs, [train_data.targets[j] for j in rows], model.config.labels)
            yield Batch(feed(run.tok, encs, model.input_names, run.device), targ, weight)

    reset_peak_memory(run.device)
    for epoch in range(first, epochs):
        if log.should_stop(cfg.patience, epoch * per_epoch, cfg.min_steps):
            break
        model.train()
        start = time.perf_counter()
        train_epoch(
            forward, batches(epoch), opt, sched, params, task,
            aux_loss=model.aux_loss, grad_clip=cfg.grad_clip, device=run.device, precision=cfg.precision,
            scaler=scaler if scaler.is_enabled() else None, world=world,
            after_step=release_free_pages if cfg.return_freed_memory else None,  # the step's small tensors left holes
            desc=f"epoch {epoch + 1}/{epochs}", progress=run.show,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        metrics = run.validate(eval_data)
        metrics["epoch"], metrics["seconds"] = epoch + 1, seconds  # seconds: the epoch's training steps
        log.judge(metrics, lambda: _snapshot(model.side))
        if run.show:
            tqdm.write(f"epoch {epoch + 1}: {_show(metrics)} ({seconds:.1f} s)")
        if world.is_main:
            progress = {"epoch": epoch + 1, **_log_state(log)}
            write_last(
                run.out / LAST_CHECKPOINT_FILE, settings, model.side.state_dict(), opt.state_dict(),
                sched.state_dict(), progress, scaler.state_dict() if scaler.is_enabled() else None,
            )  # fmt: skip
        distributed.barrier()


def _log_state(log: EpochLog) -> dict[str, Any]:
    return {"history": log.history, "best_key": list(log.best_key or ()), "best_side": log.best,
            "bad_epochs": log.bad_epochs}  # fmt: skip


def _restore_log(task: str, progress: dict[str, Any]) -> EpochLog:
    key = progress["best_key"]
    return EpochLog(
        task, progress["history"], tuple(key) if key else None, progress["best_side"], progress["bad_epochs"]
    )


def _pack(run: _Run) -> None:
    """Keep the best epoch's side network and pack its experts (quantization-aware until now)."""
    model = run.model
    model.eval()
    if model.config.side.expert_bits is None:
        return
    if run.show:
        tqdm.write(f"packing the experts ({model.config.side.expert_bits} bits, on their training grid)")
    model.to("cpu")  # the quantizers' home; every rank packs the same weights the same way
    model.pack_experts()
    model.to(run.device)


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
    scored once, by the final model (``result.test``), so that no choice sees it. ``resume``
    continues from ``out_dir/last.pt`` when it is there (made with the same settings:
    ``resume.py``). Under ``torchrun`` every rank calls this with the same arguments."""
    for data in (train_data, eval_data, test_data):
        if data is not None:
            check_compatible(model, data)
    settings = run_settings(model.config, cfg)
    saved = read_last(Path(out_dir) / LAST_CHECKPOINT_FILE, settings) if resume else None
    run = _start(model, cfg, out_dir, progress)
    task = model.config.task
    log = _restore_log(task, saved["progress"]) if saved is not None else EpochLog(task)
    resumed = saved["progress"]["epoch"] if saved is not None else 0
    _fit_probe(run, train_data, eval_data, log, resumed=saved is not None)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    _epochs(run, train_data, eval_data, log, saved)
    del saved  # its side network and optimizer state, no longer needed
    if log.best is not None:
        model.side.load_state_dict(log.best)
    _pack(run)
    final = run.validate(eval_data, "final validation")
    train_seconds = time.perf_counter() - start  # training, packing and the final validation
    test = run.validate(test_data, "test") if test_data is not None else None
    memory = peak_memory(run.device)
    result = TrainResult(
        history=log.history, final=final, test=test, train_seconds=train_seconds, trainable_params=params,
        world_size=run.world.size, device=str(run.device), peak_rss_mb=memory["peak_rss_mb"],
        peak_cuda_allocated_mb=memory.get("peak_cuda_allocated_mb"), train_config=cfg.to_dict(),
        resumed_epochs=resumed,
    )  # fmt: skip
    if run.world.is_main:
        save_checkpoint(model, run.out / CHECKPOINT_FILE)
        write_json(run.out / METRICS_FILE, result.to_dict())
    distributed.barrier()
    return result
