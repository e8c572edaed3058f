"""The tables of ``benchmarks/tasks.py --report``, from the rows of its results file (JSONL).

A row is one run (``kind: "run"``: test and validation metrics at the chosen epoch, peak RSS,
trainable parameters, seconds, training rows, epochs, learning rate) or one live-tensor probe (``kind:
"probe"``); :func:`summarize` prints a backbone's table (means over seeds) and the paired
comparisons, :func:`small_data_report` whether default ``mpismoe-train`` beats the majority class
/ mean predictor wherever full fine-tuning does. Where a method ran at several learning rates
(and, for the side methods, weight decays), the table holds only the setting :func:`chosen`
picks on validation. Nothing here runs a model.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers import CLI_METHOD, METHODS, SIDE_METHODS, SKIP_METHODS
from benchmarks.task_data import TASKS
from mpismoe_edge.config import TrainConfig

SIDE_WEIGHT_DECAY = TrainConfig.weight_decay  # what the side methods train with unless the sweep tunes it

PRIMARY = {"classification": "accuracy", "token-classification": "entity_f1", "regression": "pearson"}
SECONDARY = {"token-classification": "word_accuracy", "regression": "spearman"}


def lr_of(r: dict) -> float | None:
    """A row's learning rate to three significant digits (None: a probe, or the command line's default)."""
    return None if r.get("lr") is None else float(f"{r['lr']:.3g}")


def wd_of(r: dict) -> float | None:
    """A row's weight decay to three significant digits: a side method's (its default where the
    row predates the weight-decay grid), None for the methods that do not tune it."""
    if r["method"] not in SIDE_METHODS or r.get("lr") is None:
        return None
    wd = r.get("weight_decay")
    return float(f"{SIDE_WEIGHT_DECAY if wd is None else wd:.3g}")


def run_key(r: dict) -> tuple:
    """What identifies a row of the results file: a run already there is not run again."""
    return r["task"], r["backbone"], r["method"], r.get("seed"), r.get("kind", "run"), lr_of(r), wd_of(r)


@dataclass(frozen=True)
class Choice:
    """A method's setting on a task, chosen on validation, and the grids it was chosen from."""

    lr: float | None
    weight_decay: float | None
    lrs: list[float]
    weight_decays: list[float]

    def picks(self, r: dict) -> bool:
        """Whether row ``r`` ran at this setting."""
        return (lr_of(r), wd_of(r)) == (self.lr, self.weight_decay)

    def text(self) -> str:
        """``lr / wd (lr grid; wd grid)`` for the table; the grids only where there were several values."""
        if self.lr is None:
            return "-"
        chosen = f"{self.lr:g}" + (f" / {self.weight_decay:g}" if self.weight_decay is not None else "")
        grids = [
            f"{name} {' / '.join(f'{v:g}' for v in vals)}"
            for name, vals in (("lr", self.lrs), ("wd", self.weight_decays))
            if len(vals) > 1
        ]
        return chosen + (f" ({'; '.join(grids)})" if grids else "")


def chosen(rows: list[dict], task: str, backbone: str, method: str, kind: str) -> Choice:
    """``method``'s setting on ``task``: of the runs at the lowest seed that ran (every learning
    rate and weight decay tried), the one with the best validation by the epoch rule's key
    (``selection_key``: metric, then -loss; ``kind``: the task kind). The test split plays no part."""
    from mpismoe_edge.selection import selection_key

    runs = [
        r
        for r in rows
        if (r["task"], r["backbone"], r["method"], r.get("kind", "run")) == (task, backbone, method, "run")
    ]
    if not runs:
        return Choice(None, None, [], [])
    seed = min(r["seed"] for r in runs)
    tuned = [r for r in runs if r["seed"] == seed]
    best = tuned[0] if len(tuned) == 1 else max(tuned, key=lambda r: selection_key(r["val"], kind))
    lrs = sorted({lr for r in tuned if (lr := lr_of(r)) is not None})
    wds = sorted({wd for r in tuned if (wd := wd_of(r)) is not None})
    return Choice(lr_of(best), wd_of(best), lrs, wds)


def _rss(rows: list[dict]) -> float | None:
    """The most RSS any of ``rows`` took (MB); None if one of them was not measured, or there are none."""
    if not rows or any(r["peak_rss_mb"] is None for r in rows):
        return None
    return max(r["peak_rss_mb"] for r in rows)


def summarize(rows: list[dict], backbone: str, infos: dict[str, dict], baselines: dict[str, dict]) -> str:
    """The markdown table of ``backbone`` (mean over seeds) and the comparison lines."""
    runs = [r for r in rows if r["backbone"] == backbone and r.get("kind", "run") == "run"]
    probes = {(r["task"], r["method"]): r for r in rows if r["backbone"] == backbone and r.get("kind") == "probe"}
    lines = [
        "| task | method | test metric (mean) | per seed | second metric (mean) | validation (mean) | "
        "epoch chosen / trained "
        "| peak live tensors (MB) | peak RSS (MB, max) | trainable params | time (s, median) | train rows "
        "| learning rate / weight decay (chosen on validation from) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[tuple[str, str], dict] = {}
    cached: list[str] = []
    resumed: list[str] = []
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
            lines[-1] += " - | - | - | - | 0 | 0 | - | - |"
        for method in (*METHODS, *SKIP_METHODS, CLI_METHOD):
            choice = chosen(runs, task, backbone, method, kind)
            rs = sorted(
                (r for r in runs if r["task"] == task and r["method"] == method and choice.picks(r)),
                key=lambda r: r["seed"],
            )
            if not rs:
                continue
            whole = [r for r in rs if not r.get("resumed_epochs")]  # one process's time and memory
            if len(whole) < len(rs):
                resumed.append(f"{task} {method} seed {', '.join(str(r['seed']) for r in rs if r not in whole)}")
            vals = [r["test"][prim] for r in rs]
            probe = probes.get((task, method), {})
            t = table[(task, method)] = {
                "mean": statistics.mean(vals),
                "seeds": [r["seed"] for r in rs],
                "vals": vals,
                "tensor": probe.get("tensor_peak_mb"),
                "rss": _rss(whole),
            }
            sec_txt = f"{100 * statistics.mean(r['test'][sec] for r in rs):.2f}" if sec else "-"
            epochs = ", ".join(f"{r['epoch']}/{r['epochs']}" for r in rs)
            tensor = f"{t['tensor']:.0f}" if t["tensor"] is not None else "-"
            rss = f"{t['rss']:.0f}" if t["rss"] is not None else "-"
            seconds = f"{statistics.median(r['seconds'] for r in whole):.0f}" if whole else "-"
            if any(r.get("cached_states") for r in rs):
                cached.append(f"{task} {method}")
            lines.append(
                f"| {task} | {method} | {100 * t['mean']:.2f} | "
                f"{' / '.join(f'{100 * v:.2f}' for v in vals)} | {sec_txt} "
                f"| {100 * statistics.mean(r['val'][prim] for r in rs):.2f} | {epochs} "
                f"| {tensor} | {rss} | {rs[0]['trainable_params']:,} | "
                f"{seconds} "
                f"| {rs[0]['train_rows']:,} | {choice.text()} |"
            )
    lines.append("")
    lines.append("Metrics x 100: accuracy, entity F1 (second: word accuracy), Pearson (second: Spearman).")
    if cached:
        lines.append(f"\nTrained on cached backbone states (`--cached-states`, RSS not measured): {', '.join(cached)}.")
    if resumed:
        lines.append(
            "\nResumed after an interruption, left out of time and RSS (one process did not train them whole): "
            f"{'; '.join(resumed)}."
        )

    def diff(a: str, b: str, task: str) -> str | None:
        if (task, a) not in table or (task, b) not in table:
            return None
        x, y = table[(task, a)], table[(task, b)]
        paired = [
            100 * (u - v) for s, u in zip(x["seeds"], x["vals"]) for s2, v in zip(y["seeds"], y["vals"]) if s == s2
        ]
        mem = f", live tensors {x['tensor'] / y['tensor']:.2f}x" if x["tensor"] and y["tensor"] else ""
        mem += f", RSS {x['rss'] / y['rss']:.2f}x" if x["rss"] and y["rss"] else ""
        return f"{100 * (x['mean'] - y['mean']):+.2f} (paired seeds {' / '.join(f'{p:+.2f}' for p in paired)}{mem})"

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


def read_results(path: Path) -> list[dict]:
    """The rows of a results file; none when it is not there yet."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
