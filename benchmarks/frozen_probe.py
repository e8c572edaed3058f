"""How much the frozen backbone's features carry: ridge regression on mean-pooled hidden states.

A side network only ever reads the frozen backbone, so a linear model on those states is a
reference for what a frozen-backbone method can reach without adapting the backbone. For each
sequence task of ``benchmarks/tasks.py`` (same rows, seeds and splits as its sweep) this fits
ridge regression (closed form, dual, on standardized features) onto the targets (regression)
or centered one-hot labels (classification: argmax), on the last layer's mean-pooled state or
on all layers' concatenated, the ridge strength chosen on validation by the task's metric; the
test split is scored once. NER (token-level) is left out.

    python benchmarks/frozen_probe.py [--backbones minilm] [--tasks vader-movies ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from tqdm.auto import tqdm

from benchmarks.task_data import BACKBONES, TASKS, backbone_path, load_task
from mpismoe_edge.side.ridge import ALPHAS, ridge_fit

SEQUENCE_TASKS = tuple(t for t in TASKS if t != "wnut16")
FEATURES = ("last layer", "all layers")


@torch.no_grad()
def pooled_states(backbone, tok, texts: list[str], batch: int = 64) -> torch.Tensor:
    """``[texts, layers + 1, hidden]``: each layer's hidden state, mean-pooled over real tokens."""
    out = []
    for i in tqdm(range(0, len(texts), batch), desc="backbone states", leave=False):
        b = tok.encode(texts[i : i + batch])
        mask = torch.from_numpy(b.attention_mask)
        hs = backbone(
            input_ids=torch.from_numpy(b.input_ids), attention_mask=mask, output_hidden_states=True
        ).hidden_states
        m = mask.unsqueeze(-1).float()
        out.append(torch.stack([(h * m).sum(1) / m.sum(1) for h in hs], 1))
    return torch.cat(out)


def _metric(task: str, pred: torch.Tensor, data) -> float:
    from mpismoe_edge import metrics

    if task == "regression":
        return metrics.pearson(pred[:, 0].tolist(), data.targets)
    return metrics.accuracy(data.targets, pred.argmax(-1).tolist())


def probe(task: str, feats: dict[str, torch.Tensor], splits: dict) -> tuple[float, float, float]:
    """(ridge strength, validation metric, test metric) of the strength best on validation."""
    train = splits["train"]
    if task == "regression":
        y = torch.tensor(train.targets, dtype=torch.float64).unsqueeze(1)
    else:
        y = torch.nn.functional.one_hot(torch.tensor(train.targets), len(train.labels)).double()
    offset = y.mean(0)
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    z = {s: ((f - mu) / sd).double() for s, f in feats.items()}
    best = None
    for alpha in ALPHAS:
        w = ridge_fit(z["train"], y - offset, alpha)
        val = _metric(task, z["val"] @ w + offset, splits["val"])
        if best is None or val > best[1]:
            best = (alpha, val, w)
    alpha, val, w = best
    return alpha, val, _metric(task, z["test"] @ w + offset, splits["test"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="runs/tasks")
    p.add_argument("--tasks", nargs="+", choices=SEQUENCE_TASKS, default=list(SEQUENCE_TASKS))
    p.add_argument("--backbones", nargs="+", choices=BACKBONES, default=["minilm"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-rows", type=int, default=500)
    p.add_argument("--val-rows", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64, help="tokens (as benchmarks/tasks.py and mpismoe-train)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import load_backbone

    try:  # the data and backbones first: one line, nothing printed, when a folder is missing
        paths = {name: backbone_path(name, args.data) for name in args.backbones}
        for task_name in args.tasks:
            load_task(args.data, task_name, 0)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(
        f"ridge on frozen mean-pooled states; {args.train_rows} training rows, validation {args.val_rows}, "
        f"seeds {args.seeds}; metrics x 100 (accuracy, Pearson)\n"
    )
    print(
        "| backbone | task | features | test metric (mean) | per seed | validation (mean) | ridge strength per seed |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.backbones:
        backbone, tok_json = load_backbone(paths[name])
        backbone.eval()
        tok = make_tokenizer(tok_json, args.max_length)
        for task_name in args.tasks:
            runs = {f: [] for f in FEATURES}
            cache: dict[str, torch.Tensor] = {}  # text -> pooled states: the seeds share validation, test, some rows
            for seed in args.seeds:
                info, train, val, test = load_task(args.data, task_name, seed, args.train_rows, args.val_rows)
                splits = {"train": train, "val": val, "test": test}
                todo = sorted({t for d in splits.values() for t in d.texts} - cache.keys())
                for t, s in zip(todo, pooled_states(backbone, tok, todo) if todo else []):
                    cache[t] = s
                for feat in FEATURES:
                    pick = (lambda s: s[-1]) if feat == "last layer" else (lambda s: s.flatten())
                    feats = {k: torch.stack([pick(cache[t]) for t in d.texts]) for k, d in splits.items()}
                    runs[feat].append(probe(info["task"], feats, splits))
            for feat, res in runs.items():
                print(
                    f"| {name} | {task_name} | {feat} | {100 * statistics.fmean(r[2] for r in res):.2f} | "
                    f"{' / '.join(f'{100 * r[2]:.2f}' for r in res)} | "
                    f"{100 * statistics.fmean(r[1] for r in res):.2f} | "
                    f"{' / '.join(f'{r[0]:g}' for r in res)} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
