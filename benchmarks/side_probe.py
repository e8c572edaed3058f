"""Side-network variants on cached backbone states: a fast probe of what moves accuracy.

The frozen backbone's hidden states do not depend on the side network, so they are computed
once per seed and backbone (``q4``: 4-bit GNP-IQ with the seed's noise, as MP-ISMoE in
benchmarks/train.py; ``fp32``: as LST) and cached in ``--workdir`` (fp16, every layer, ~1.2 GB
per seed and backbone). Each variant then trains only the side network on them, in about a
third of the time of a full run. Same split, batches, optimizer, schedule and epoch choice as
benchmarks/train.py: validation chooses the epoch (``mpismoe_edge.selection``: accuracy, then the
loss), the test split is scored only at it.

Differences from a full run, so its figures are comparable with each other, not with
benchmarks/train.py: the states are stored in fp16; experts in quantization-aware training are
scored fake-quantized (not packed with GNP-IQ); the side network's random init draws from
another point of the RNG stream.

A variant is ``NAME=JSON``: ``SideConfig`` fields (the benchmark's MP-ISMoE side network,
``expert_bits=4``, is the base) plus ``backbone`` (``q4`` | ``fp32``), ``lr`` and ``epochs``.

    python benchmarks/side_probe.py [--seeds 0 1 2] [--variants NAME=JSON ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys

import torch
from tqdm.auto import tqdm

VARIANTS = {
    "mp-ismoe": {},
    "random init": {"init": "random"},
    "router: side token only": {"interactive": False},
    "fp32 backbone": {"backbone": "fp32"},
    "width 96 (r=4)": {"reduction": 4},
    "shared expert": {"shared_expert": True},
    "dropout 0.2": {"dropout": 0.2},
    "4 epochs": {"epochs": 4},
    "lr 2e-3": {"lr": 2e-3},
    "lst (dense FFN, fp32, random init)": {
        "dense_ffn": True,
        "expert_bits": None,
        "init": "random",
        "backbone": "fp32",
    },
}
_RUN_KEYS = ("backbone", "lr", "epochs")


def _splits(args):
    from mpismoe_edge.data import load_default, load_default_validation

    train, test = load_default(args.n_train, args.n_test, seed=args.seed)
    val = load_default_validation(args.n_val, args.n_train, args.n_test, seed=args.seed)
    return {"train": train, "val": val, "test": test}


def _cache(kind: str, args) -> dict:
    """``{split: {"states": [per text [L+1, tokens, H] fp16], "targets": [...]}}``, computed once."""
    from mpismoe_edge.config import ModelConfig, QuantConfig
    from mpismoe_edge.inference import encode, make_tokenizer
    from mpismoe_edge.model import build_model, default_backbone_path, load_backbone

    path = os.path.join(
        args.workdir, f"{kind}-seed{args.seed}-{args.n_train}-{args.n_val}-{args.n_test}-len{args.max_length}.pt"
    )
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    splits = _splits(args)
    backbone, tok_json = load_backbone(default_backbone_path())
    quant = QuantConfig(bits=4, seed=args.seed) if kind == "q4" else None
    cfg = ModelConfig(labels=splits["train"].labels, max_length=args.max_length, quant=quant)
    model = build_model(backbone, cfg, tok_json, progress=False)
    tok = make_tokenizer(tok_json, args.max_length)
    out = {}
    for name, ds in splits.items():
        states = []
        for i in tqdm(range(0, len(ds), 64), desc=f"cache {kind} seed {args.seed} {name}", leave=False):
            feed = encode(tok, ds.texts[i : i + 64], model.input_names)
            hs = torch.stack(model.backbone_states(**feed), 1)  # [B, L+1, T, H]
            for b, n in enumerate(feed["attention_mask"].sum(1).tolist()):
                states.append(hs[b, :, :n].half().clone())
        out[name] = {"states": states, "targets": list(ds.targets)}
    os.makedirs(args.workdir, exist_ok=True)
    torch.save(out, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


def _batch(states: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Right-padded hidden states (one tensor per layer) and the attention mask."""
    t = max(s.shape[1] for s in states)
    x = torch.zeros(len(states), states[0].shape[0], t, states[0].shape[2])
    mask = torch.zeros(len(states), t, dtype=torch.long)
    for i, s in enumerate(states):
        x[i, :, : s.shape[1]] = s.float()
        mask[i, : s.shape[1]] = 1
    return tuple(x.unbind(1)), mask


@torch.no_grad()
def _scores(side, split: dict) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the side network on a cached split."""
    side.eval()
    order = sorted(range(len(split["states"])), key=lambda i: split["states"][i].shape[1])
    right, loss = 0, 0.0
    for i in range(0, len(order), 64):
        idx = order[i : i + 64]
        hs, mask = _batch([split["states"][j] for j in idx])
        logits, target = side(hs, mask), torch.tensor([split["targets"][j] for j in idx])
        right += (logits.argmax(-1) == target).sum().item()
        loss += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
    side.train()
    return {"accuracy": right / len(order), "loss": loss / len(order)}


def _run(name: str, spec: dict, cache: dict, labels: list[str], backbone, args) -> dict:
    """Train one variant's side network on the cached states; (validation, test) at the chosen epoch.
    ``backbone`` is the float one: the pruned init reads it, as build_model does; it is not trained."""
    from mpismoe_edge.config import ModelConfig, SideConfig
    from mpismoe_edge.loop import Batch, batch_order, train_epoch
    from mpismoe_edge.model import build_model
    from mpismoe_edge.selection import EpochLog
    from mpismoe_edge.train import TrainConfig, make_optimizer

    side_fields = {k: v for k, v in spec.items() if k not in _RUN_KEYS}
    side_cfg = SideConfig.from_dict({"expert_bits": 4, **side_fields})
    tcfg = TrainConfig(
        epochs=spec.get("epochs", args.epochs), seed=args.seed, **({"lr": spec["lr"]} if "lr" in spec else {})
    )
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = build_model(
        backbone,
        ModelConfig(labels=labels, max_length=args.max_length, side=side_cfg, quant=None),
        None,
        progress=False,
    )
    side = model.side.train()
    params = [p for p in side.parameters() if p.requires_grad]
    train = cache["train"]
    opt, sched = make_optimizer(params, tcfg, tcfg.epochs * math.ceil(len(train["states"]) / tcfg.batch_size))
    lengths = [s.shape[1] for s in train["states"]]
    log = EpochLog("classification")
    for epoch in range(tcfg.epochs):
        batches = (
            Batch(_batch([train["states"][j] for j in idx]), torch.tensor([train["targets"][j] for j in idx]))
            for idx in batch_order(lengths, tcfg.batch_size, tcfg.seed * 1000 + epoch)
        )
        train_epoch(
            lambda inputs: side(*inputs),
            batches,
            opt,
            sched,
            params,
            "classification",
            aux_loss=model.aux_loss,
            grad_clip=tcfg.grad_clip,
            desc=f"{name} seed {args.seed} epoch {epoch + 1}",
        )
        # the test split is scored only at an epoch validation chooses
        log.judge(_scores(side, cache["val"]), lambda: _scores(side, cache["test"])["accuracy"])
    return {"val": 100 * log.best_metrics["accuracy"], "test": 100 * log.best}


def _parse_variant(text: str) -> tuple[str, dict]:
    if text in VARIANTS:
        return text, VARIANTS[text]
    name, sep, spec = text.partition("=")
    if not sep:
        raise SystemExit(f"side_probe: variant {text!r} is neither a known name {sorted(VARIANTS)} nor NAME=JSON")
    try:
        value = json.loads(spec)
    except json.JSONDecodeError as e:
        raise SystemExit(f"side_probe: variant {name!r}: bad JSON ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"side_probe: variant {name!r}: JSON must be an object")
    return name, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="known names or NAME=JSON")
    p.add_argument("--workdir", default="/tmp/mpismoe-side-probe", help="where the backbone states are cached")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    variants = dict(_parse_variant(v) for v in args.variants)
    from mpismoe_edge.config import SIDE_INITS, SideConfig

    for name, spec in variants.items():  # a typo fails now, not after an hour of runs
        try:
            cfg = SideConfig.from_dict({k: v for k, v in spec.items() if k not in _RUN_KEYS})
        except (TypeError, ValueError) as e:
            raise SystemExit(f"side_probe: variant {name!r}: {e}") from None
        if cfg.init not in SIDE_INITS:
            raise SystemExit(f"side_probe: variant {name!r}: init must be one of {SIDE_INITS}")
        if spec.get("backbone", "q4") not in ("q4", "fp32"):
            raise SystemExit(f"side_probe: variant {name!r}: backbone must be 'q4' or 'fp32'")
    torch.set_num_threads(args.threads)
    from mpismoe_edge.model import default_backbone_path, load_backbone

    backbone, _ = load_backbone(default_backbone_path())  # loaded once (it draws nothing from the RNG)
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        args.seed = seed
        labels = _splits(args)["train"].labels
        for kind in sorted({spec.get("backbone", "q4") for spec in variants.values()}):
            cache = _cache(kind, args)
            for name, spec in variants.items():
                if spec.get("backbone", "q4") == kind:
                    results[name].append(_run(name, spec, cache, labels, backbone, args))
                    print(f"seed {seed} {name}: " + json.dumps(results[name][-1]), file=sys.stderr, flush=True)
            del cache
    _print_table(results, args.seeds, next(iter(variants)))


def _print_table(results: dict[str, list[dict]], seeds: list[int], base: str) -> None:
    seed_list = ", ".join(map(str, seeds))
    print(
        f"| variant | test accuracy (mean of seeds {seed_list}) | per seed | vs {base} (test) | "
        f"validation accuracy (mean) | vs {base} (validation) |"
    )
    print("|---|---|---|---|---|---|")
    ref_test = statistics.mean(r["test"] for r in results[base])
    ref_val = statistics.mean(r["val"] for r in results[base])
    for name, runs in results.items():
        test, val = statistics.mean(r["test"] for r in runs), statistics.mean(r["val"] for r in runs)
        per_seed = " / ".join(f"{r['test']:.2f}" for r in runs)
        print(f"| {name} | {test:.2f} | {per_seed} | {test - ref_test:+.2f} | {val:.2f} | {val - ref_val:+.2f} |")


if __name__ == "__main__":
    main()
