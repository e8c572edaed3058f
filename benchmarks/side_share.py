"""Where an export's time goes: the frozen backbone vs the side network, per side block, by op type.

A node belongs to the side network when it depends, through the graph, on a ``side.*``
initializer (the backbone never reads one); the side network's nodes are then split by the block
whose weights they read last (``side.blocks.N``: a block's nodes read its own weights and the
stream of the blocks before it; the head and the skip are ``head``).
Times are ONNX Runtime's profiler's kernel times (ms per run, 2 threads) at the given shapes, so
the shares hold on a loaded machine even when the milliseconds do not.

    python benchmarks/side_share.py runs/default/onnx [--shapes 1x128 32x64] [--runs 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mpismoe_edge.runtime.manifest import find_model

BLOCK = re.compile(r"^side\.blocks\.(\d+)\.")
TASK = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)/(side\..*)$")  # a multi-task export's "<task>/side..." (export/multitask)
HEAD = {"embed_down": "side input"}  # the side stream's start, before block 0; the other weights outside
# the blocks (final norm, up-projection, head, skip) come after the last block


def node_parts(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> "backbone", "side block N" or "side head" (the last block whose weights it depends on);
    in a multi-task export, "<task>: side block N" and so on."""
    part_of_value: dict[str, str] = {}
    for init in model.graph.initializer:
        t = TASK.match(init.name)
        task, name = (f"{t.group(1)}: ", t.group(2)) if t else ("", init.name)
        if name.startswith("side."):
            m = BLOCK.match(name)
            part_of_value[init.name] = task + (
                f"side block {m.group(1)}" if m else HEAD.get(name.split(".")[1], "side head")
            )
    parts = {}
    for node in model.graph.node:  # graph order is topological
        found = [part_of_value[i] for i in node.input if i in part_of_value]
        part = max(found, key=_order) if found else "backbone"  # the stream runs block 0, 1, ..., then the head
        parts[node.name] = part
        if part != "backbone":
            for out in node.output:
                part_of_value[out] = part
    return parts


def _order(part: str) -> tuple[int, int]:
    part = part.rsplit(": ", 1)[-1]  # a multi-task export's "<task>: " (one task's parts are compared)
    if part.startswith("side block"):
        return 0, int(part.rsplit(" ", 1)[1])
    return (0, -1) if part == "side input" else (1, 0)


def _task(part: str) -> str:
    return part.rsplit(": ", 1)[0] if ": " in part else ""


def profile(path: Path, batch: int, seq: int, runs: int) -> list[tuple[str, str, float]]:
    """(node name, op type, ms per run) from ONNX Runtime's profiler, half the rows padded."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    mask = np.ones((batch, seq), np.int64)
    mask[1::2, seq // 2 :] = 0
    feed = {
        "input_ids": np.random.default_rng(0).integers(1000, 2000, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int64),
    }
    feed = {i.name: feed[i.name] for i in sess.get_inputs()}
    warm = 3  # left out below
    for _ in range(warm + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (warm + runs)  # the graphs have no control flow: the same nodes every run
    times: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in kernels[warm * per_run :]:
        times[(e["name"][: -len("_kernel_time")], e["args"]["op_name"])] += e["dur"] / 1000 / runs
    return [(name, op, ms) for (name, op), ms in times.items()]


def table(folder: Path, shapes: list[tuple[int, int]], runs: int) -> str:
    path = find_model(folder)
    parts = node_parts(onnx.load(str(path), load_external_data=False))
    lines = [f"### {folder}\n", "| shape | part | nodes | ms per run | share |", "|---|---|---|---|---|"]
    ops_lines = []
    for batch, seq in shapes:
        rows = profile(path, batch, seq, runs)
        by_part: dict[str, float] = collections.defaultdict(float)
        nodes: dict[str, set] = collections.defaultdict(set)
        by_op: dict[tuple[str, str], float] = collections.defaultdict(float)
        for name, op, ms in rows:
            part = parts.get(name, "backbone")  # nodes ORT added (fusions) keep the backbone's name space
            by_part[part] += ms
            nodes[part].add(name)
            by_op[("side" if part != "backbone" else "backbone", op)] += ms
        total = sum(by_part.values())
        for part in sorted(by_part, key=lambda p: (p != "backbone", _task(p), _order(p) if p != "backbone" else (0,))):
            share = by_part[part] / total
            lines.append(f"| {batch}x{seq} | {part} | {len(nodes[part])} | {by_part[part]:.2f} | {100 * share:.1f}% |")
        side = sum(v for k, v in by_part.items() if k != "backbone")
        lines.append(f"| {batch}x{seq} | **side network** | {sum(len(v) for k, v in nodes.items() if k != 'backbone')} "
                     f"| {side:.2f} | {100 * side / total:.1f}% |")  # fmt: skip
        top = sorted(((ms, op) for (p, op), ms in by_op.items() if p == "side"), reverse=True)[:8]
        ops_lines.append(
            f"side network's top op types at {batch}x{seq}: " + ", ".join(f"{op} {ms:.2f} ms" for ms, op in top)
        )
    return "\n".join(lines + [""] + ops_lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("exports", nargs="+", type=Path, help="export folders (mpismoe-export -o)")
    p.add_argument("--shapes", nargs="+", default=["1x128", "32x64"], help="batch x sequence (half the rows padded)")
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    for folder in args.exports:
        print(table(folder, shapes, args.runs), "\n", flush=True)


if __name__ == "__main__":
    main()
