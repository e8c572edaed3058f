"""Training of the side network (the backbone stays frozen): AdamW, warmup + linear decay,
eval each epoch, early stopping, resumable from ``last.pt``; writes ``model.pt`` atomically."""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .config import JsonConfig
from .data import Dataset
from .memory import release_free_pages, return_freed_memory
from .model import MPISMoEModel, save_checkpoint
from .runtime.spec import CHECKPOINT_FILE, LAST_CHECKPOINT_FILE, METRICS_FILE
from .runtime.text import TextEncoder


@dataclass
class TrainConfig(JsonConfig):
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    patience: int = 2         # epochs without improvement before stopping early
    seed: int = 0
    threads: int | None = None
    return_freed_memory: bool = True  # glibc: give freed activations and heap holes back to the system (memory.py)


def make_tokenizer(tokenizer_json: str, max_length: int) -> TextEncoder:
    """The model's own tokenizer (the same JSON the exporter ships and the runtime reads)."""
    return TextEncoder(Tokenizer.from_str(tokenizer_json), max_length)


def _tokenize(tok: TextEncoder, texts: list[str] | list[list[str]]) -> list:
    return tok.tokenize_words(texts) if texts and isinstance(texts[0], list) else tok.tokenize(texts)


def _feed(tok: TextEncoder, encs: list, input_names: list[str]) -> dict[str, torch.Tensor]:
    arrays = tok.pad(encs).arrays()
    return {k: torch.from_numpy(arrays[k]) for k in input_names if k in arrays}


def encode(tok: TextEncoder, texts: list[str] | list[list[str]], input_names: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize and right-pad a batch to its longest text; only the tensors the model takes.
    Texts may be strings or lists of words (token classification)."""
    return _feed(tok, _tokenize(tok, texts), input_names)


def word_targets(encs: list, tags: list[list[int]]) -> torch.Tensor:
    """``[batch, seq]`` token targets from word tags: each word's tag on its first sub-token,
    -100 (ignored by the loss) on its other sub-tokens, special tokens and padding. Words cut
    off by truncation are not scored."""
    out = torch.full((len(encs), max(1, max(len(e.ids) for e in encs))), -100, dtype=torch.long)
    for b, (enc, word_tags) in enumerate(zip(encs, tags)):
        prev = None
        for t, w in enumerate(enc.word_ids):
            if w is not None and w != prev:
                out[b, t] = word_tags[w]
            prev = w
    return out


def _targets(model: MPISMoEModel, encs: list, targets: list) -> torch.Tensor:
    """The loss's targets for rows tokenized as ``encs``: class ids, regression values, or for
    token classification ``word_targets``."""
    if model.config.task == "token-classification":
        return word_targets(encs, targets)
    return torch.tensor(targets, dtype=torch.float32 if model.config.task == "regression" else torch.long)


def _batch(model: MPISMoEModel, tok: TextEncoder, data: Dataset, idx: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs and targets of rows ``idx``."""
    encs = _tokenize(tok, [data.texts[j] for j in idx])
    return _feed(tok, encs, model.input_names), _targets(model, encs, [data.targets[j] for j in idx])


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


def batch_order(lengths: list[int], size: int, seed: int, window: int = 32) -> list[list[int]]:
    """Shuffled batches of similar-length rows (less padding): shuffle, sort windows of
    ``window`` batches by length, cut into batches, shuffle the batches. Deterministic."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for w in range(0, len(order), size * window):
        chunk = sorted(order[w : w + size * window], key=lambda i: lengths[i])
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(batches)
    return batches


def token_lengths(tok: TextEncoder, texts: list[str] | list[list[str]]) -> list[int]:
    return [len(e.ids) for e in _tokenize(tok, texts)]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (``cfg.lr``, ``cfg.weight_decay``) with a linear warmup over ``cfg.warmup_ratio`` of
    ``steps``, then a linear decay to zero at ``steps``; call ``sched.step()`` after each step."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, int(cfg.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    return opt, sched


def _loss(model: MPISMoEModel, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if model.config.task == "regression":
        return torch.nn.functional.mse_loss(logits.squeeze(-1), targets, reduction=reduction)
    if model.config.task == "token-classification":
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction=reduction)
    return torch.nn.functional.cross_entropy(logits, targets, reduction=reduction)


@torch.no_grad()
def _logits_by_length(model: torch.nn.Module, tok: TextEncoder, texts: list[str] | list[list[str]], input_names: list[str],
                      batch_size: int) -> list[tuple[list[int], list, torch.Tensor]]:
    """``(row indices, their encodings, logits)`` per batch of similar-length texts, in eval mode
    (each text tokenized once)."""
    was = model.training
    model.eval()
    encs = _tokenize(tok, texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = [encs[j] for j in idx]
        out.append((idx, batch, model(**_feed(tok, batch, input_names))))
    model.train(was)
    return out


def predict(model: torch.nn.Module, tok: TextEncoder, texts: list[str], input_names: list[str],
            batch_size: int = 64) -> torch.Tensor | list[torch.Tensor]:
    """Logits for ``texts`` in eval mode (batched by length, returned in input order):
    ``[len(texts), outputs]``, or for token-level logits a list with one ``[tokens, labels]``
    tensor per text (its real tokens, special tokens included)."""
    out = None
    rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for idx, encs, logits in _logits_by_length(model, tok, texts, input_names, batch_size):
        if logits.ndim == 3:
            for b, (j, enc) in enumerate(zip(idx, encs)):
                rows[j] = logits[b, : len(enc.ids)]
            continue
        if out is None:
            out = logits.new_empty(len(texts), logits.shape[-1])
        out[idx] = logits
    return rows if out is None else out


def _evaluate_tokens(model: MPISMoEModel, tok: TextEncoder, data: Dataset, batch_size: int) -> dict[str, float]:
    loss = right = total = 0.0
    for idx, encs, logits in _logits_by_length(model, tok, data.texts, model.input_names, batch_size):
        targets = _targets(model, encs, [data.targets[j] for j in idx])
        scored = targets != -100
        loss += _loss(model, logits, targets, reduction="sum").item()
        right += (logits.argmax(-1)[scored] == targets[scored]).sum().item()
        total += scored.sum().item()
    return {"loss": loss / max(total, 1), "accuracy": right / max(total, 1)}


def evaluate(model: MPISMoEModel, tok: TextEncoder, data: Dataset, batch_size: int = 64) -> dict[str, float]:
    """Accuracy (classification; for token classification over words, each scored at its first
    sub-token) or MSE (regression), plus the loss."""
    if model.config.task == "token-classification":
        return _evaluate_tokens(model, tok, data, batch_size)
    logits = predict(model, tok, data.texts, model.input_names, batch_size)
    loss = _loss(model, logits, _targets(model, [], data.targets)).item()
    if model.config.task == "regression":
        return {"loss": loss, "mse": loss}
    acc = (logits.argmax(-1) == torch.tensor(data.targets)).float().mean().item()
    return {"loss": loss, "accuracy": acc}


def _score(metrics: dict[str, float]) -> float:
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["mse"]


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(model: MPISMoEModel, train_data: Dataset, eval_data: Dataset, cfg: TrainConfig, out_dir: str | Path,
          resume: bool = False, progress: bool = True, test_data: Dataset | None = None) -> dict:
    """Train the side network; write ``out_dir/model.pt`` (experts packed) and ``metrics.json``.

    ``eval_data`` chooses the best epoch and stops early; ``test_data``, when given, is only
    scored once, by the final model (``result["test"]``), so that no choice sees it."""
    for data in (train_data, eval_data, test_data):
        if data is not None:
            check_compatible(model, data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.return_freed_memory:
        return_freed_memory()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg, cfg.epochs * math.ceil(len(train_data) / cfg.batch_size))
    state = {"epoch": 0, "history": [], "best_score": -math.inf, "best_side": None, "bad_epochs": 0}
    last = out / LAST_CHECKPOINT_FILE
    if resume and last.is_file():
        saved = torch.load(last, map_location="cpu", weights_only=True)
        model.side.load_state_dict(saved["side"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = saved["state"]
    lengths = token_lengths(tok, train_data.texts)
    start = time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        model.train()
        batches = batch_order(lengths, cfg.batch_size, cfg.seed * 1000 + epoch)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for idx in bar:
            feed, targets = _batch(model, tok, train_data, idx)
            task_loss = _loss(model, model(**feed), targets)
            loss = task_loss + model.aux_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if cfg.return_freed_memory:
                release_free_pages()  # the step's small tensors left holes in the heap
            bar.set_postfix(loss=f"{task_loss.item():.3f}")
        metrics = evaluate(model, tok, eval_data, cfg.eval_batch_size)
        metrics["epoch"] = epoch + 1
        state["history"].append(metrics)
        if _score(metrics) > state["best_score"]:
            state["best_score"], state["bad_epochs"] = _score(metrics), 0
            state["best_side"] = {k: v.detach().clone() for k, v in model.side.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if progress:
            tqdm.write(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
        _save_state(last, {"side": model.side.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "state": state})
    if state["best_side"] is not None:
        model.side.load_state_dict(state["best_side"])
    model.eval()
    if model.config.side.expert_bits is not None:
        model.pack_experts()
    final = evaluate(model, tok, eval_data, cfg.eval_batch_size)
    save_checkpoint(model, out / CHECKPOINT_FILE)
    result = {"history": state["history"], "final": final, "train_seconds": time.perf_counter() - start,
              "trainable_params": sum(p.numel() for p in params), "train_config": cfg.to_dict()}
    if test_data is not None:
        result["test"] = evaluate(model, tok, test_data, cfg.eval_batch_size)
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / METRICS_FILE)
    return result
