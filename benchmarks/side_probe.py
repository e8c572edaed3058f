"""Side-network variants on cached backbone states: a fast probe of what moves accuracy.

The frozen backbone's hidden states do not depend on the side network, so they are computed
once per task, seed and backbone (``q4``: 4-bit GNP-IQ with the seed's noise, as MP-ISMoE;
``fp32``: as LST) and cached in ``--workdir`` (fp16, every layer). Each variant then trains only
the side network on them, in a fraction of the time of a full run. The rules are
``mpismoe-train``'s: at least ``--min-steps`` optimizer steps, the epoch chosen on validation
by the task kind's metric then the loss (``mpismoe_edge.selection``), patience 2; the test
split is scored only at the chosen epoch.

Data: without ``--tasks``, the bundled tweets split (4,000 / 1,000 / 2,000 rows, as
benchmarks/train.py); with ``--tasks``, the fetched tasks of ``benchmarks/tasks.py``
(``scripts/fetch_tasks.py``), ``--train-rows`` seeded training rows, the first ``--val-rows``
validation rows, the whole test split. Test metrics: accuracy, entity F1 (at each word's first
sub-token, words past ``max_length`` unscored), Pearson.

Differences from a full run, so its figures are comparable with each other, not with
benchmarks/tasks.py: the states are stored in fp16; experts in quantization-aware training are
scored fake-quantized (not packed); the side network's random init draws from another point of
the RNG stream.

A variant is ``NAME=JSON``: ``SideConfig`` fields (the MP-ISMoE side network, ``expert_bits=4``,
is the base) plus ``backbone`` (``q4`` | ``fp32``), ``lr``, ``weight_decay`` and ``epochs``.
With ``--results FILE`` every run is appended as it ends and a run already there is skipped
(an interrupted sweep resumes); ``--report`` prints the tables from that file, with
``--leave-one-out`` the choice of each held-out task's variant by the other tasks, with
``--pick-by-validation NAME`` one more row: per run, the base variant or NAME, whichever
validated higher (a rule each task applies on its own, at the price of two trainings).

    python benchmarks/side_probe.py [--tasks T ...] [--seeds 0 1 2] [--variants NAME=JSON ...] [--results F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from tqdm.auto import tqdm

from benchmarks.variants import parse_variant

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
    # sizing the side network to its data (issue 32 item 3)
    "4 experts": {"num_experts": 4},
    "expert ratio 2": {"expert_ratio": 2},
    "weight decay 0.1": {"weight_decay": 0.1},
    "ridge skip": {"skip": True},
    "router noise 1": {"router_noise": 1.0},
}
_RUN_KEYS = ("backbone", "lr", "weight_decay", "epochs")
DEFAULT_TASK = "default"  # the bundled tweets split


def _splits(task: str, seed: int, args) -> tuple[str, list[str], dict]:
    """(task kind, labels, ``{"train", "val", "test"}`` datasets) of ``task`` at ``seed``."""
    if task == DEFAULT_TASK:
        from mpismoe_edge.data import load_default, load_default_validation

        train, test = load_default(args.n_train, args.n_test, seed=seed)
        val = load_default_validation(args.n_val, args.n_train, args.n_test, seed=seed)
        return "classification", train.labels, {"train": train, "val": val, "test": test}
    from benchmarks.task_data import load_task

    info, train, val, test = load_task(args.data, task, seed, args.train_rows, args.val_rows)
    return info["task"], train.labels, {"train": train, "val": val, "test": test}


def _backbone_dir(args) -> str:
    from benchmarks.task_data import backbone_path

    return backbone_path(args.backbone, args.data)


def _cache_path(task: str, kind: str, seed: int, args, test: bool = True) -> Path:
    """The cache of ``task``'s splits (without ``test``: of its training and validation splits)."""
    rows = (
        f"{args.n_train}-{args.n_val}-{args.n_test}"
        if task == DEFAULT_TASK
        else f"{args.train_rows or 'all'}-{args.val_rows or 'all'}"
    )
    splits = "" if test else "-train-val"
    return Path(args.workdir) / f"{task}-{args.backbone}-{kind}-seed{seed}-{rows}-len{args.max_length}{splits}.pt"


def _cache(tasks: list[str], kind: str, seed: int, args, test: bool = True) -> None:
    """Compute and store the states of every task not cached yet at ``seed`` (the backbone
    quantized once for all of them): per split, one ``[L+1, tokens, H]`` fp16 tensor per text
    and one target per text (per token for token-level kinds); without ``test``, not the test split."""
    todo = [t for t in tasks if not _cache_path(t, kind, seed, args, test).exists()]
    if not todo:
        return
    from mpismoe_edge.config import ModelConfig, QuantConfig
    from mpismoe_edge.inference import feed, make_tokenizer, tokenize
    from mpismoe_edge.model import build_model, load_backbone
    from mpismoe_edge.runtime.tasks import kind as task_kind

    backbone, tok_json = load_backbone(_backbone_dir(args))
    quant = QuantConfig(bits=4, seed=seed) if kind == "q4" else None
    model = build_model(backbone, ModelConfig(labels=["a", "b"], max_length=args.max_length, quant=quant), tok_json)
    tok = make_tokenizer(tok_json, args.max_length)
    for task in todo:
        task_name, labels, splits = _splits(task, seed, args)
        record = task_kind(task_name)
        out = {}
        for name, ds in (splits if test else {n: splits[n] for n in ("train", "val")}).items():
            states, targets = [], []
            for i in tqdm(range(0, len(ds), 64), desc=f"cache {task} {kind} seed {seed} {name}", leave=False):
                encs = tokenize(tok, ds.texts[i : i + 64])
                hs = torch.stack(model.backbone_states(**feed(tok, encs, model.input_names)), 1)  # [B, L+1, T, H]
                for b, enc in enumerate(encs):
                    n = len(enc.ids)
                    states.append(hs[b, :, :n].half().clone())
                    target = record.targets([enc], [ds.targets[i + b]], labels)[0]
                    targets.append(target[:n] if record.token_level else target)
            out[name] = {"states": states, "targets": targets}
        path = _cache_path(task, kind, seed, args, test)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)


def states(task: str, kind: str, seed: int, args, test: bool = True) -> dict:
    """The cached states of ``task`` (computed and stored first where missing): per split
    (``train``, ``val``, and ``test`` unless told not), ``states`` and ``targets`` as
    :func:`_cache` stores them; memory-mapped, so the file's pages stay the page cache's."""
    test = test or _cache_path(task, kind, seed, args).exists()  # a cache with the test split serves either
    _cache([task], kind, seed, args, test)
    return torch.load(_cache_path(task, kind, seed, args, test), weights_only=True, mmap=True)


def _batch(states: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Right-padded hidden states (one tensor per layer) and the attention mask."""
    t = max(s.shape[1] for s in states)
    x = torch.zeros(len(states), states[0].shape[0], t, states[0].shape[2])
    mask = torch.zeros(len(states), t, dtype=torch.long)
    for i, s in enumerate(states):
        x[i, :, : s.shape[1]] = s.float()
        mask[i, : s.shape[1]] = 1
    return tuple(x.unbind(1)), mask


def _targets(targets: list[torch.Tensor], token_level: bool) -> torch.Tensor:
    """A batch's targets: stacked, or per token right-padded with the ignored target."""
    if not token_level:
        return torch.stack(targets)
    from mpismoe_edge.runtime.tasks import IGNORE

    out = torch.full((len(targets), max(len(t) for t in targets)), IGNORE, dtype=torch.long)
    for i, t in enumerate(targets):
        out[i, : len(t)] = t
    return out


@torch.no_grad()
def _scores(side, split: dict, task: str, labels: list[str]) -> dict[str, float]:
    """The task kind's metrics of the side network on a cached split (regression: Pearson too)."""
    from mpismoe_edge import metrics
    from mpismoe_edge.runtime.tasks import kind

    record = kind(task)
    side.eval()
    order = sorted(range(len(split["states"])), key=lambda i: split["states"][i].shape[1])
    sums = torch.zeros(2 + len(record.count_names), dtype=torch.float64)
    preds: list[float] = []
    for i in range(0, len(order), 64):
        idx = order[i : i + 64]
        hs, mask = _batch([split["states"][j] for j in idx])
        logits = side(hs, mask)
        target = _targets([split["targets"][j] for j in idx], record.token_level)
        loss, count = record.loss_sum(logits, target)
        sums += torch.tensor([loss.item(), count.item(), *record.counts(logits, target, labels)], dtype=torch.float64)
        if task == "regression":
            preds += logits[:, 0].tolist()
    side.train()
    loss, scored, *counts = sums.tolist()
    out = record.metrics(loss / max(scored, 1), scored, dict(zip(record.count_names, counts)), labels)
    if task == "regression":
        truth = [float(split["targets"][j]) for j in order]
        out["pearson"] = metrics.pearson(preds, truth)
    return out


def _test_metric(task: str, m: dict[str, float]) -> float:
    """The figure a table reports, x 100: accuracy, entity F1 (BIO tags) or Pearson."""
    from mpismoe_edge.runtime.tasks import kind

    return 100 * (m["pearson"] if task == "regression" else kind(task).score(m))


def _fit_skip(side, cache: dict, task: str, num_outputs: int) -> dict[str, float]:
    """The ridge-fitted skip of ``TrainConfig.skip_init="ridge"`` (``skip_fit.py``) from cached
    states: fit on train, strength chosen on validation (``side/ridge.py``)."""
    from mpismoe_edge.runtime.tasks import kind
    from mpismoe_edge.side.ridge import fit_probe
    from mpismoe_edge.skip_fit import install_probe

    record = kind(task)

    @torch.no_grad()
    def features(split):
        side.eval()
        xs, ys = [], []
        for i in range(0, len(split["states"]), 64):
            states, targets = split["states"][i : i + 64], split["targets"][i : i + 64]
            hs, mask = _batch(states)
            x, y = side.skip_features(hs, mask), _targets(targets, record.token_level)
            if record.token_level:
                keep = (y != -100) & mask.bool()
                x, y = x[keep], y[keep]
            xs.append(x)
            ys.append(y)
        side.train()
        return torch.cat(xs), torch.cat(ys)

    probe = fit_probe(record.probe, *features(cache["train"]), *features(cache["val"]), num_outputs)
    install_probe(side, probe)
    return probe.val


def _run(name: str, spec: dict, cache: dict, task: str, labels: list[str], backbone, seed: int, args) -> dict:
    """Train one variant's side network on the cached states; its row (validation and test at
    the chosen epoch). ``backbone`` is the float one: the pruned init reads it, as build_model
    does; it is not trained."""
    from mpismoe_edge.config import SideConfig
    from mpismoe_edge.train import TrainConfig

    side_fields = {k: v for k, v in spec.items() if k not in _RUN_KEYS}
    side_cfg = SideConfig.from_dict({"expert_bits": 4, **side_fields})
    tcfg = TrainConfig(
        epochs=spec.get("epochs", args.epochs),
        seed=seed,
        min_steps=args.min_steps,
        **{k: spec[k] for k in ("lr", "weight_decay") if k in spec},
    )
    _, run = train_on_states(side_cfg, tcfg, cache, task, labels, backbone, args.max_length, name, args.progress)
    return {k: run[k] for k in ("val_score", "test", "epoch", "epochs", "trainable_params")}


def train_on_states(
    side_cfg,
    tcfg,
    cache: dict,
    task: str,
    labels: list[str],
    backbone,
    max_length: int,
    name: str,
    progress: bool,
    test: bool = True,
    state: Path | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train a side network of ``side_cfg`` on the cached states by ``tcfg``'s rules; (the model,
    its side network at the chosen epoch's weights; its run: ``val_score``, ``test`` (the test
    figure of :func:`_test_metric` on the cached test split; None without ``test``), ``epoch``
    chosen, ``epochs`` trained, ``trainable_params``, ``resumed``: epochs an earlier call
    trained). ``state``: the file each epoch's state is written to and a run continues from
    (``benchmarks/run_state.py``)."""
    from benchmarks.run_state import read_state, write_state
    from mpismoe_edge.config import ModelConfig
    from mpismoe_edge.loop import Batch, batch_order, train_epoch
    from mpismoe_edge.model import build_model
    from mpismoe_edge.resume import run_settings
    from mpismoe_edge.selection import EpochLog, planned_epochs
    from mpismoe_edge.train import make_optimizer

    random.seed(tcfg.seed)
    torch.manual_seed(tcfg.seed)
    cfg = ModelConfig(task=task, labels=labels, max_length=max_length, side=side_cfg, quant=None)
    model = build_model(backbone, cfg, None, progress=False)
    side = model.side.train()
    train = cache["train"]
    log = EpochLog(task)
    token_level = side.token_level
    chosen = None

    def keep() -> tuple[dict | None, dict]:  # the test split is scored only at an epoch validation chooses
        weights = {k: v.detach().clone() for k, v in side.state_dict().items()}
        return (_scores(side, cache["test"], task, labels) if test else None), weights

    settings = {**run_settings(cfg, tcfg), "rows": len(train["states"])}
    saved = read_state(state, settings) if state is not None else None
    ridge = side.skip is not None and tcfg.skip_init == "ridge"
    if ridge and saved is not None:  # the saved side network holds the fitted skip
        side.skip.requires_grad_(False)
    elif ridge:  # the probe alone is epoch 0, as in train()
        _fit_skip(side, cache, task, cfg.num_outputs)
        if log.judge(_scores(side, cache["val"], task, labels), keep):
            chosen = 0
    params = [p for p in side.parameters() if p.requires_grad]
    rows = len(train["states"])
    epochs = planned_epochs(tcfg.epochs, rows, tcfg.batch_size, tcfg.min_steps)
    opt, sched = make_optimizer(params, tcfg, epochs * math.ceil(rows / tcfg.batch_size))
    lengths = [s.shape[1] for s in train["states"]]
    steps, first = 0, 0
    if saved is not None:
        side.load_state_dict(saved["side"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.random.set_rng_state(saved["rng"])
        log, chosen, steps, first = saved["log"], saved["chosen"], saved["steps"], saved["epochs"]
        del saved
    trained = first
    for epoch in range(first, epochs):
        if log.should_stop(tcfg.patience, steps, tcfg.min_steps):  # patience >= 1: never before the first epoch
            break
        order = batch_order(lengths, tcfg.batch_size, tcfg.seed * 1000 + epoch)
        batches = (
            Batch(_batch([train["states"][j] for j in idx]), _targets([train["targets"][j] for j in idx], token_level))
            for idx in order
        )
        train_epoch(
            lambda inputs: side(*inputs),
            batches,
            opt,
            sched,
            params,
            task,
            aux_loss=model.aux_loss,
            grad_clip=tcfg.grad_clip,
            desc=f"{name} seed {tcfg.seed} epoch {epoch + 1}",
            progress=progress,
        )
        steps, trained = steps + len(order), epoch + 1
        if log.judge(_scores(side, cache["val"], task, labels), keep):
            chosen = epoch + 1
        if state is not None:
            write_state(
                state, settings, log, side=side.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                rng=torch.random.get_rng_state(), chosen=chosen, steps=steps, epochs=trained,
            )  # fmt: skip
    scores, weights = log.best
    side.load_state_dict(weights)
    return model, {
        "val_score": log.best_key[0],  # the kind's selection metric (regression: -MSE)
        "test": _test_metric(task, scores) if scores is not None else None,
        "epoch": chosen,
        "epochs": trained,
        "trainable_params": sum(p.numel() for p in params),
        "resumed": first,
    }


def _check_variants(variants: dict[str, dict]) -> None:
    """A typo fails now, not after an hour of runs."""
    from mpismoe_edge.config import SIDE_INITS, SideConfig

    for name, spec in variants.items():
        try:
            cfg = SideConfig.from_dict({k: v for k, v in spec.items() if k not in _RUN_KEYS})
        except (TypeError, ValueError) as e:
            raise SystemExit(f"side_probe: variant {name!r}: {e}") from None
        if cfg.init not in SIDE_INITS:
            raise SystemExit(f"side_probe: variant {name!r}: init must be one of {SIDE_INITS}")
        if spec.get("backbone", "q4") not in ("q4", "fp32"):
            raise SystemExit(f"side_probe: variant {name!r}: backbone must be 'q4' or 'fp32'")


def _row_key(row: dict) -> tuple:
    return row["task"], row["backbone"], row["seed"], row["variant"], row.get("train_rows"), row.get("val_rows")


def _read_rows(path: str | None) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=[DEFAULT_TASK], help="fetched tasks, or 'default' (bundled tweets)")
    p.add_argument("--backbone", default="minilm", choices=("minilm", "mpnet"))
    p.add_argument("--data", default="runs/tasks", help="where scripts/fetch_tasks.py put the tasks")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None, help="known names or NAME=JSON (default: the first ten)")
    p.add_argument("--workdir", default="/tmp/mpismoe-side-probe", help="where the backbone states are cached")
    p.add_argument("--results", default=None, help="JSONL: each run appended as it ends; runs already there skipped")
    p.add_argument("--report", action="store_true", help="print the tables of --results and run nothing")
    p.add_argument("--leave-one-out", action="store_true", help="with --report: each task judged by the others")
    p.add_argument(
        "--pick-by-validation",
        metavar="NAME",
        help="with --report: a row of each run's better-validating of base, NAME",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=0, help="optimizer steps at least (mpismoe-train: 200)")
    p.add_argument("--n-train", type=int, default=4000, help="bundled split's rows (task 'default')")
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--train-rows", type=int, default=None, help="fetched tasks: seeded training rows (default all)")
    p.add_argument("--val-rows", type=int, default=None, help="fetched tasks: first validation rows (default all)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args()
    names = args.variants or list(VARIANTS)[:10]
    variants = dict(parse_variant(v, "side_probe", VARIANTS) for v in names)
    if args.report:
        rows = _read_rows(args.results)
        if not rows:
            raise SystemExit(f"side_probe: no runs in {args.results!r}")
        if args.pick_by_validation:
            if args.pick_by_validation not in variants:
                raise SystemExit(f"side_probe: --pick-by-validation {args.pick_by_validation!r} is not in --variants")
            picked = pick_by_validation(rows, next(iter(variants)), args.pick_by_validation)
            rows = rows + picked
            variants |= {r["variant"]: {} for r in picked[:1]}
        _report(rows, args.tasks, args.seeds, variants, args.leave_one_out)
        return
    _check_variants(variants)
    torch.set_num_threads(args.threads)
    from mpismoe_edge.model import load_backbone

    backbone, _ = load_backbone(_backbone_dir(args))  # float, loaded once (it draws nothing from the RNG)
    rows: list[dict] = []
    for seed in args.seeds:
        for kind in sorted({spec.get("backbone", "q4") for spec in variants.values()}):
            _cache(args.tasks, kind, seed, args)
            for task in args.tasks:
                cache = None
                for name, spec in variants.items():
                    base = {"task": task, "backbone": args.backbone, "seed": seed, "variant": name}
                    base |= {"train_rows": args.train_rows, "val_rows": args.val_rows} if task != DEFAULT_TASK else {}
                    done = {_row_key(r) for r in _read_rows(args.results)}  # another process may share the file
                    if spec.get("backbone", "q4") != kind or _row_key(base) in done:
                        continue
                    if cache is None:
                        cache = torch.load(_cache_path(task, kind, seed, args), weights_only=True)
                    task_name, labels, _ = _splits(task, seed, args)
                    row = base | {"spec": spec} | _run(name, spec, cache, task_name, labels, backbone, seed, args)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    if args.results:
                        with open(args.results, "a") as f:
                            f.write(json.dumps(row) + "\n")
    _report(_read_rows(args.results) if args.results else rows, args.tasks, args.seeds, variants, False)


def group_runs(
    rows: list[dict], tasks: list[str], seeds: list[int], variants: dict
) -> dict[tuple[str, str], list[dict]]:
    """Each (task, variant)'s runs at ``seeds``, in seed order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["task"] in tasks and r["variant"] in variants and r["seed"] in seeds:
            out.setdefault((r["task"], r["variant"]), []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    return out


def pick_by_validation(rows: list[dict], base: str, other: str) -> list[dict]:
    """Per (task, backbone, seed) that ran both: the run of ``base`` or ``other`` with the higher
    validation score (``base`` on a tie), as variant ``"<base> or <other>, by validation"``."""
    name = f"{base} or {other}, by validation"
    runs = {(r["task"], r["backbone"], r["seed"], r["variant"]): r for r in rows}
    out = []
    for (task, backbone, seed, variant), b in runs.items():
        o = runs.get((task, backbone, seed, other))
        if variant == base and o is not None:
            out.append((o if o["val_score"] > b["val_score"] else b) | {"variant": name})
    return out


def _report(rows: list[dict], tasks: list[str], seeds: list[int], variants: dict, leave_one_out: bool) -> None:
    runs = group_runs(rows, tasks, seeds, variants)
    base = next(iter(variants))
    for task in tasks:
        if (task, base) not in runs:
            continue
        ref = runs[task, base]
        print(f"\n#### {task}\n")
        print(
            f"| variant | test (mean) | per seed | vs {base} (test) | paired by seed | validation score (mean) "
            "| epoch chosen / trained | trainable params |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name in variants:
            got = runs.get((task, name))
            if not got:
                continue
            test = statistics.mean(r["test"] for r in got)
            by_seed = {r["seed"]: r["test"] for r in ref}
            per_seed = " / ".join(f"{r['test']:.2f}" for r in got)
            paired = " / ".join(f"{r['test'] - by_seed[r['seed']]:+.2f}" for r in got if r["seed"] in by_seed)
            epochs = ", ".join(f"{r['epoch']}/{r['epochs']}" for r in got)
            val = statistics.mean(r["val_score"] for r in got)
            print(
                f"| {name} | {test:.2f} | {per_seed} | {_gain(runs, task, name, base):+.2f} | {paired} "
                f"| {val:.4f} | {epochs} | {got[0]['trainable_params']:,} |"
            )
    if leave_one_out:
        _leave_one_out(runs, tasks, variants, base)


def _gain(runs: dict, task: str, name: str, base: str) -> float | None:
    """A variant's mean test gain over ``base`` on ``task``, over the seeds both ran."""
    ref = {r["seed"]: r["test"] for r in runs.get((task, base), [])}
    got = [r["test"] - ref[r["seed"]] for r in runs.get((task, name), []) if r["seed"] in ref]
    return statistics.mean(got) if got else None


def leave_one_out(runs: dict, tasks: list[str], variants: dict, base: str) -> dict[str, str]:
    """For each task, the variant (``base`` included) with the largest mean gain over ``base``
    on the *other* tasks: what a rule picked without that task would pick for it."""
    out = {}
    for task in tasks:
        scores = {}
        for name in variants:
            gains = [_gain(runs, t, name, base) for t in tasks if t != task]
            if gains and all(g is not None for g in gains):
                scores[name] = statistics.mean(gains)
        if scores and _gain(runs, task, base, base) is not None:
            out[task] = max(scores, key=lambda n: scores[n])
    return out


def _leave_one_out(runs: dict, tasks: list[str], variants: dict, base: str) -> None:
    print("\n#### Leave one task out: each task's variant chosen by the mean gain on the other tasks\n")
    print("| held-out task | chosen on the others | its mean gain there | its gain on the held-out task | best there |")
    print("|---|---|---|---|---|")
    held_gains = []
    for task, pick in leave_one_out(runs, tasks, variants, base).items():
        there = statistics.mean(_gain(runs, t, pick, base) for t in tasks if t != task)
        held = _gain(runs, task, pick, base)
        ran = [n for n in variants if _gain(runs, task, n, base) is not None]
        best = max(ran, key=lambda n: _gain(runs, task, n, base))
        held_gains.append(held)
        print(f"| {task} | {pick} | {there:+.2f} | {held:+.2f} | {best} ({_gain(runs, task, best, base):+.2f}) |")
    if held_gains:
        print(f"\nMean held-out gain of the leave-one-out choice over {base}: {statistics.mean(held_gains):+.2f}")


if __name__ == "__main__":
    main()
