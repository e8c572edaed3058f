"""Several tasks on one backbone: the multi-task graph vs N single-task exports vs N int8 anchors.

For N = 1, 2, 4 of the four fetched tasks (tweets, Rotten Tomatoes, WNUT-16, VADER movies, in
that order; ``scripts/fetch_tasks.py``), all trained on the quickstart's quantized MiniLM-L6
backbone (``--base``, ``mpismoe-train --backbone-from``), per export target:

* the multi-task graph (``export_tasks``, layout ``merged``): one ``session.run`` for all N tasks;
* the N single-task exports (``export_model``) run one after another;
* N copies of ONNX Runtime's int8 anchor (benchmarks/export.py: the same backbone exported the
  Hugging Face way + ORT's transformer optimizer + ``quantize_dynamic``), run one after another.

Latency as benchmarks/export.py measures it (its ``latencies``: ONNX Runtime CPU, 2 intra-op
threads, spinning off, every arm of every N and target interleaved run by run, medians) at
1 x 128 and 32 x 64 (every other row padded to half length); wasm 1 x 128 (onnxruntime-web under
node, 1 thread, its ``wasm_latency``; an arm of several graphs is the sum of their medians);
total graph file MB; resident memory after loading the arm's sessions into one fresh process and
running each once at 1 x 128 (its ``session_memory``). Each task's logits from the multi-task
graph are checked against its single-task export's (max abs diff, same target, both shapes).
Ratios are against N int8 anchors; an added task's cost is (latency(N) - latency(N')) / (N - N')
for the N' before it, as a fraction of one anchor's 1 x 128 latency.

``--prepare`` (also done by a plain run, resumably: what exists is kept) writes under ``--work``:
``data/<task>/`` (the first ``--train-rows`` / ``--val-rows`` of each fetched split), ``train/<task>/``
(one short run each; tweets is ``--base`` itself), ``exports/<target>/{single-<task>,n<N>}/`` and
``anchors/``.

    python scripts/fetch_tasks.py --no-backbone
    python benchmarks/multitask.py --base runs/default/model.pt [--targets portable ort-int8]
                                   [--repeats 15] [--wasm-repeats 5] [--no-wasm] [--prepare]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from benchmarks import export as bench  # the harness: sessions, feeds, interleaved latency, RSS, wasm, anchors
from mpismoe_edge.runtime.manifest import find_model

TASKS = {  # fetched folder -> (task name in the graph, mpismoe-train --task)
    "tweets": ("tweets", "classification"),
    "rotten-tomatoes": ("rotten_tomatoes", "classification"),
    "wnut16": ("wnut16", "token-classification"),
    "vader-movies": ("vader_movies", "regression"),
}
NS = (1, 2, 4)
ARMS = ("multi-task graph", "single-task exports", "int8 anchors")
SHAPE_KEYS = tuple(f"{b}x{s}" for b, s in bench.SHAPES)  # "1x128", "32x64"
VOCAB = 30522
# issue 30, item 6, at N = 4: ratios to four int8 anchors, and one added task vs one anchor at 1 x 128
BARS = {"latency": 0.40, "size": 0.25, "added": 0.15}


# ---- the arithmetic and the table (pure; tests/test_bench_multitask.py) ----


def added_task_cost(multi_ms: dict[int, float], anchor_ms: float) -> dict[int, float]:
    """N -> (latency(N) - latency(N')) / (N - N') / ``anchor_ms``, N' the N before it (sorted)."""
    ns = sorted(multi_ms)
    return {n: (multi_ms[n] - multi_ms[p]) / (n - p) / anchor_ms for p, n in zip(ns, ns[1:])}


def ratios(arm: dict[str, float], anchors: dict[str, float]) -> dict[str, float]:
    """Per measure (a key of both), ``arm`` / ``anchors``."""
    return {k: arm[k] / anchors[k] for k in arm if k in anchors and anchors[k]}


def verdicts(results: dict[int, dict], n: int = 4) -> list[tuple[str, float, float, bool]]:
    """(what, value, bar, met) for item 6's targets at N = ``n``; ``results``: N -> arm -> measure."""
    r = ratios(results[n][ARMS[0]], results[n][ARMS[2]])
    out = [
        (f"latency {k} vs {n} int8 anchors", r[k], BARS["latency"], r[k] <= BARS["latency"])
        for k in (*SHAPE_KEYS, "wasm")
        if k in r
    ]
    out.append((f"graph files vs {n} int8 anchors", r["mb"], BARS["size"], r["mb"] <= BARS["size"]))
    anchor1 = results[1][ARMS[2]][SHAPE_KEYS[0]]
    cost = added_task_cost({k: v[ARMS[0]][SHAPE_KEYS[0]] for k, v in results.items()}, anchor1)
    for k, c in cost.items():
        if k <= n:
            out.append((f"added task's 1x128 latency vs one int8 anchor (N={k})", c, BARS["added"], c <= BARS["added"]))
    return out


def render(target: str, results: dict[int, dict], parity: dict[int, dict[str, float]]) -> str:
    """One target's markdown: the table (N x arm), the ratios to N anchors, the added task's cost,
    the parity and item 6's verdicts."""
    has_wasm = all("wasm" in arm for per in results.values() for arm in per.values())
    cols = ["1x128 ms", "32x64 ms"] + (["wasm 1x128 ms"] if has_wasm else []) + ["MB", "RSS MB"]
    keys = list(SHAPE_KEYS) + (["wasm"] if has_wasm else []) + ["mb", "rss"]
    fmt = {"1x128": "{:.1f}", "32x64": "{:.0f}", "wasm": "{:.0f}", "mb": "{:.1f}", "rss": "{:.0f}"}
    lines = [
        f"#### target `{target}`\n",
        "| N | arm | "
        + " | ".join(cols)
        + " | vs N int8 anchors: "
        + " | ".join(c.replace(" ms", "") for c in cols)
        + " | logits vs single-task, max abs diff |",
        "|---|---|" + "---|" * (2 * len(cols) + 1),
    ]
    anchor1 = results[min(results)][ARMS[2]][SHAPE_KEYS[0]]
    cost = added_task_cost({n: per[ARMS[0]][SHAPE_KEYS[0]] for n, per in results.items()}, anchor1)
    for n, per in sorted(results.items()):
        for arm in ARMS:
            vals = per[arm]
            r = ratios(vals, per[ARMS[2]])
            diff = f"{max(parity[n].values()):.2g}" if arm == ARMS[0] else ""
            lines.append(
                f"| {n} | {arm} | "
                + " | ".join(fmt[k].format(vals[k]) for k in keys)
                + " | "
                + " | ".join(f"{r[k]:.2f}x" for k in keys)
                + f" | {diff} |"
            )
    lines.append("")
    lines.append(
        "Added task (multi-task graph, 1x128), as a fraction of one int8 anchor's 1x128 latency "
        f"({anchor1:.1f} ms): " + ", ".join(f"N={n}: {100 * c:.1f}%" for n, c in cost.items())
    )
    lines.append(
        "Logits vs single-task export, max abs diff per task: "
        + "; ".join(f"N={n}: " + ", ".join(f"{t} {d:.2g}" for t, d in p.items()) for n, p in sorted(parity.items()))
    )
    lines.append("\nIssue 30 item 6 at N = 4:\n")
    for what, value, bar, met in verdicts(results):
        lines.append(
            f"* {what}: {value:.2f}{'x' if 'added' not in what else ''} "
            f"(target <= {bar:.2f}): {'met' if met else f'not met, {value / bar:.2f}x the target'}"
        )
    return "\n".join(lines)


# ---- preparing: data subsets, short training runs, exports, the anchor (resumable) ----


def log(msg: str) -> None:
    bench.log(msg)


def prepare_data(data: Path, work: Path, train_rows: int, val_rows: int) -> None:
    for folder in TASKS:
        out = work / "data" / folder
        if (out / "validation.jsonl").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train_rows), ("validation", val_rows)):
            src = data / folder / f"{split}.jsonl"
            if not src.is_file():
                raise SystemExit(f"error: {src} not found: run python scripts/fetch_tasks.py --no-backbone first")
            lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]  # the splits are shuffled
            (out / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")


def checkpoints(base: Path, work: Path, epochs: int) -> dict[str, Path]:
    """Task name -> model.pt: tweets is ``base``; the others are trained on its backbone."""
    out = {}
    for folder, (name, kind) in TASKS.items():
        if folder == "tweets":
            out[name] = base
            continue
        run = work / "train" / folder
        if not (run / "model.pt").is_file():
            log(f"training {folder} on {base}'s backbone")
            d = work / "data" / folder
            cmd = [
                str(Path(sys.executable).parent / "mpismoe-train"),
                "--backbone-from",
                str(base),
                "--data",
                str(d / "train.jsonl"),
                "--eval-data",
                str(d / "validation.jsonl"),
                "--task",
                kind,
                "--epochs",
                str(epochs),
                "--min-steps",
                "0",
                "--threads",
                "2",
                "-q",
                "-o",
                str(run),
            ]
            subprocess.run(cmd, check=True)
        out[name] = run / "model.pt"
    return out


def exports(
    ckpts: dict[str, Path], work: Path, target: str, atol: float | None = None
) -> tuple[dict[str, Path], dict[int, Path]]:
    """(task -> single-task export folder, N -> multi-task export folder) for ``target``; ``atol``:
    the exports' check against PyTorch (default: the target's)."""
    from mpismoe_edge.export import export_model
    from mpismoe_edge.export.multitask import export_tasks
    from mpismoe_edge.model import load_checkpoint

    models = {}

    def model(name: str):
        if name not in models:
            models[name] = load_checkpoint(str(ckpts[name]))
        return models[name]

    root = work / "exports" / target
    singles, multis = {}, {}
    for name in ckpts:
        singles[name] = root / f"single-{name}"
        if not (singles[name] / "manifest.json").is_file():
            log(f"exporting {name} alone for {target}")
            export_model(model(name), singles[name], target=target, atol=atol, log=None)
    for n in NS:
        multis[n] = root / f"n{n}"
        if not (multis[n] / "manifest.json").is_file():
            log(f"exporting {n} task(s) in one graph for {target}")
            export_tasks({name: model(name) for name in list(ckpts)[:n]}, multis[n], target=target, atol=atol)
    return singles, multis


def anchor(work: Path) -> Path:
    """ONNX Runtime's int8 anchor (benchmarks/export.py's ``build_anchors``), built once."""
    path = work / "anchors" / "int8.onnx"
    if not path.is_file():
        log("building the int8 anchor (benchmarks/export.py)")
        tmp = work / "anchors.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rows, _ = bench.build_anchors(tmp)
        path.parent.mkdir(exist_ok=True)
        shutil.copyfile(rows[bench.INT8_ANCHOR], path)
        shutil.rmtree(tmp)
    return path


# ---- measuring ----


def chain_calls(sessions: list) -> dict:
    """Shape -> one call that runs ``sessions`` one after another (benchmarks/export.py's feeds)."""
    per = [bench.ort_calls(s, VOCAB) for s in sessions]
    return {sh: (lambda sh=sh: [c[sh]() for c in per]) for sh in bench.SHAPES}


def logits_parity(multi, singles: dict[str, object]) -> dict[str, float]:
    """Task -> max abs diff of its ``<task>_logits`` from ``multi`` vs its single-task export's
    ``logits``, at both shapes (every other row padded)."""
    names = [i.name for i in multi.get_inputs()]
    out = {}
    for task, single in singles.items():
        diff = 0.0
        for b, s in bench.SHAPES:
            feed = bench.feed_for(names, b, s, VOCAB)
            got = multi.run([f"{task}_logits"], feed)[0]
            ref = single.run(["logits"], feed)[0]
            diff = max(diff, float(np.abs(got - ref).max()))
        out[task] = diff
    return out


def measure(targets: list[str], paths: dict, anchor_path: Path, repeats: int, wasm_repeats: int | None):
    """target -> (N -> arm -> measure -> value, N -> task -> logits max abs diff)."""
    singles_p, multis_p = paths["singles"], paths["multis"]
    tasks = [t for t, _ in TASKS.values()]
    sessions = {("anchor", i): bench.ort_session(anchor_path)[0] for i in range(max(NS))}
    for tg in targets:
        for t in tasks:
            sessions[(tg, t)] = bench.ort_session(find_model(singles_p[tg][t]))[0]
        for n in NS:
            sessions[(tg, n)] = bench.ort_session(find_model(multis_p[tg][n]))[0]
    log("parity: each task's logits, multi-task graph vs its single-task export")
    parity = {
        tg: {n: logits_parity(sessions[(tg, n)], {t: sessions[(tg, t)] for t in tasks[:n]}) for n in NS}
        for tg in targets
    }
    calls = {}
    for n in NS:
        calls[("anchor", n)] = chain_calls([sessions[("anchor", i)] for i in range(n)])
        for tg in targets:
            calls[(tg, n, ARMS[0])] = chain_calls([sessions[(tg, n)]])
            calls[(tg, n, ARMS[1])] = chain_calls([sessions[(tg, t)] for t in tasks[:n]])
    log(f"latency: {len(calls)} arms interleaved, {repeats} runs")
    lat = bench.latencies(calls, repeats)
    del calls, sessions
    wasm = {}
    if wasm_repeats:
        log("wasm")
        files = {"anchor": anchor_path}
        for tg in targets:
            files.update({(tg, t): find_model(singles_p[tg][t]) for t in tasks})
            files.update({(tg, n): find_model(multis_p[tg][n]) for n in NS})
        wasm = bench.wasm_latency({k: v.resolve() for k, v in files.items()}, wasm_repeats)  # node runs in js/
    log("session memory")
    anchor_rss = {n: bench.session_memory(*[anchor_path] * n) for n in NS}
    mb = anchor_path.stat().st_size / 1e6
    out = {}
    for tg in targets:
        res = {}
        for n in NS:
            multi = find_model(multis_p[tg][n])
            single = [find_model(singles_p[tg][t]) for t in tasks[:n]]
            res[n] = {
                ARMS[0]: {"mb": multi.stat().st_size / 1e6, "rss": bench.session_memory(multi) / 1e6},
                ARMS[1]: {
                    "mb": sum(p.stat().st_size for p in single) / 1e6,
                    "rss": bench.session_memory(*single) / 1e6,
                },
                ARMS[2]: {"mb": n * mb, "rss": anchor_rss[n] / 1e6},
            }
            for (b, s), key in zip(bench.SHAPES, SHAPE_KEYS):
                res[n][ARMS[0]][key] = lat[(tg, n, ARMS[0])][(b, s)]
                res[n][ARMS[1]][key] = lat[(tg, n, ARMS[1])][(b, s)]
                res[n][ARMS[2]][key] = lat[("anchor", n)][(b, s)]
            if wasm:
                res[n][ARMS[0]]["wasm"] = wasm[(tg, n)]
                res[n][ARMS[1]]["wasm"] = sum(wasm[(tg, t)] for t in tasks[:n])
                res[n][ARMS[2]]["wasm"] = n * wasm["anchor"]
        out[tg] = (res, parity[tg])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("runs/default/model.pt"), help="the tweets model.pt (quickstart)")
    p.add_argument("--data", type=Path, default=Path("runs/tasks"), help="scripts/fetch_tasks.py --out")
    p.add_argument("--work", type=Path, default=Path("runs/multitask"), help="subsets, runs, exports, anchor")
    p.add_argument("--targets", nargs="+", default=["portable"], help="export targets (default portable)")
    p.add_argument("--train-rows", type=int, default=300)
    p.add_argument("--val-rows", type=int, default=100)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--wasm-repeats", type=int, default=5)
    p.add_argument("--no-wasm", action="store_true")
    p.add_argument(
        "--atol",
        type=float,
        help="the exports' logits vs PyTorch bar (default: the target's; ort-int8's int8 activations"
        " can miss it on a weakly trained model, and the speed measured here does not depend on it)",
    )
    p.add_argument("--prepare", action="store_true", help="only train and export (resumable), measure nothing")
    args = p.parse_args()

    prepare_data(args.data, args.work, args.train_rows, args.val_rows)
    ckpts = checkpoints(args.base, args.work, args.epochs)
    paths = {"singles": {}, "multis": {}}
    for tg in args.targets:
        paths["singles"][tg], paths["multis"][tg] = exports(ckpts, args.work, tg, args.atol)
    anchor_path = anchor(args.work)
    if args.prepare:
        log(f"prepared under {args.work}")
        return
    results = measure(args.targets, paths, anchor_path, args.repeats, None if args.no_wasm else args.wasm_repeats)
    load = os.getloadavg()
    print(
        f"\n### ONNX Runtime {bench.ort.__version__} CPU, {bench.THREADS} threads, spinning off, median of "
        f"{args.repeats} interleaved runs"
        + (
            ""
            if args.no_wasm
            else f"; wasm: onnxruntime-web under node, 1 thread, 1 x 128, median of {args.wasm_repeats}"
        )
        + f"; load average at the end {load[0]:.1f}\n"
    )
    for tg, (res, parity) in results.items():
        print(render(tg, res, parity), "\n", flush=True)


if __name__ == "__main__":
    main()
