"""Several tasks on one backbone: one backbone pass, each task's side network on its hidden states.

The backbone is frozen, so tasks trained on one quantized backbone (equal fingerprints,
``quant/fingerprint.py``) compute the same hidden states. The graph is built from parts joined
by tensor name, as the ``ort-int8`` target joins its two (:mod:`.int8_target`):

* the backbone with every hidden state as an output (``backbone_hidden_0..L``): torch.onnx
  (dynamo) lowered like the single-task graph for the target (:func:`.fuse.fuse`), or, for
  ``ort-int8``, ORT's fused BERT backbone with int8 compute;
* per task, its side network (ladder, ISMoE, head) from ``attention_mask`` and those hidden
  states (:func:`.int8_target.side_graph`), lowered as its single-task export lowers it, every
  internal name prefixed with the task's and its output renamed ``<task>_logits``.

Layouts: ``merged``, one graph (``onnx/model.onnx``) with one output per task; ``split``,
``onnx/backbone.onnx`` and one ``onnx/side_<task>.onnx`` per task, which the runtime chains
(``runtime/chain.py``), so that an app adds or updates a task by shipping its side graph only.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mpismoe_edge.quant.fingerprint import check_same
from mpismoe_edge.runtime.parity import abs_diff
from mpismoe_edge.runtime.spec import (
    BACKBONE_MODEL_FILE,
    FORMAT,
    LAYOUTS,
    MANIFEST_FILE,
    MODEL_DIR,
    MODEL_FILE,
    MULTI_TASK,
    OUTPUT_NAME,
    README_FILE,
    TARGET_SPECS,
    TARGETS,
    side_model_file,
    task_output,
)
from mpismoe_edge.runtime.tasks import kind

from . import functions as F
from .backbone_graph import hidden_name
from .fuse import default_atol, fuse
from .lower import input_names, to_onnx
from .output import commit, staging_dir
from .rules.qmatmul_nbits import ACCURACY_LEVELS
from .runtimes import TARGET_RUNTIMES
from .validate import _feed, _real_tokens, default_cases

TASK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def check_task_names(names: list[str]) -> None:
    """ValueError unless every name is an identifier-like word (it names a graph output and a
    file) and no two are equal."""
    for name in names:
        if not TASK_NAME.fullmatch(name):
            raise ValueError(f"task name {name!r} must be a letter then letters, digits or '_'")
    seen = [n for n, c in Counter(names).items() if c > 1]
    if seen:
        raise ValueError(f"task names must differ; {seen[0]!r} is given twice (name them: NAME=CHECKPOINT)")


class _Backbone(nn.Module):
    """The frozen backbone of an MP-ISMoE model: its inputs -> every hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.backbone = model.backbone  # make_inputs reads its config (vocabulary, image size)
        self.input_names = list(input_names(model))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None):
        return self.model.backbone_states(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, pixel_values=pixel_values
        )


def backbone_graph(
    model: nn.Module, target: str, opset: int, zero_points: str = "auto", accuracy_level: int = 0
) -> tuple[onnx.ModelProto, dict]:
    """The backbone of ``model`` lowered for ``target``; outputs ``backbone_hidden_0..L``."""
    if TARGET_SPECS[target].int8:
        from .int8_target import int8_backbone

        return int8_backbone(model, opset, zero_points=zero_points)
    layers = int(model.backbone.config.num_hidden_layers)
    proto = to_onnx(_Backbone(model), opset=opset, output_names=[hidden_name(i) for i in range(layers + 1)])
    return fuse(proto, target, zero_points=zero_points, accuracy_level=accuracy_level)


def side_graph(
    model: nn.Module, name: str, target: str, opset: int, zero_points: str = "auto", accuracy_level: int = 0
) -> tuple[onnx.ModelProto, dict]:
    """Task ``name``'s side network lowered as its single-task export lowers it, its internal
    names prefixed ``<name>/`` and its output renamed :func:`task_output` ``(name)``."""
    from .int8_target import side_graph as traced_side

    proto = traced_side(model, opset)
    if TARGET_SPECS[target].int8:
        from .int8_target import int8_side

        proto, stats = int8_side(proto)
    else:
        proto, stats = fuse(proto, target, zero_points=zero_points, accuracy_level=accuracy_level)
    _prefix(proto.graph, f"{name}/", keep={i.name for i in proto.graph.input}, rename={OUTPUT_NAME: task_output(name)})
    return proto, stats


def _prefix(graph: onnx.GraphProto, prefix: str, keep: set[str], rename: dict[str, str]) -> None:
    """Rename every tensor of ``graph`` but ``keep`` (in place): ``rename``'s to theirs, the others
    ``prefix + name``, so that several side graphs can share one graph."""

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        return rename.get(name, prefix + name)

    for node in graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.name = prefix + node.name if node.name else node.name
        if any(a.HasField("g") or a.graphs for a in node.attribute):
            raise ValueError(f"side graph node {node.name} has a subgraph; renaming it is not supported")
    for coll in (graph.initializer, graph.sparse_initializer):
        for t in coll:
            if hasattr(t, "values"):  # SparseTensorProto
                t.values.name = new(t.values.name)
            else:
                t.name = new(t.name)
    for coll in (graph.value_info, graph.output, graph.input):
        for v in coll:
            v.name = new(v.name)


def _imports(*protos: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    found: dict[str, int] = {}
    for proto in protos:
        for imp in proto.opset_import:
            found[imp.domain] = max(found.get(imp.domain, 0), imp.version)
    return [onnx.helper.make_opsetid(d, v) for d, v in sorted(found.items())]


def _functions(*protos: onnx.ModelProto) -> list[onnx.FunctionProto]:
    seen: dict[tuple[str, str], onnx.FunctionProto] = {}
    for proto in protos:
        for f in proto.functions:
            seen.setdefault((f.domain, f.name), f)
    return list(seen.values())


def merge(backbone: onnx.ModelProto, sides: list[onnx.ModelProto]) -> onnx.ModelProto:
    """One graph: the backbone's nodes, then each side's, wired by tensor name; outputs: the sides'."""
    bg = backbone.graph
    produced = {o for n in bg.node for o in n.output} | {i.name for i in bg.input} | {t.name for t in bg.initializer}
    nodes, inits, outputs = list(bg.node), list(bg.initializer), []
    for side in sides:
        sg = side.graph
        missing = {i.name for i in sg.input} - produced
        if missing:
            raise ValueError(f"the backbone graph produces none of the side network's inputs {sorted(missing)}")
        names = {o for n in sg.node for o in n.output} | {t.name for t in sg.initializer}
        clash = names & produced
        if clash:
            raise ValueError(f"graphs share tensor names: {sorted(clash)[:5]}")
        produced |= names
        nodes += list(sg.node)
        inits += list(sg.initializer)
        outputs += list(sg.output)
    graph = onnx.helper.make_graph(
        nodes, "mpismoe_multitask", inputs=list(bg.input), outputs=outputs, initializer=inits
    )
    model = onnx.helper.make_model(
        graph, opset_imports=_imports(backbone, *sides), functions=_functions(backbone, *sides)
    )
    model.ir_version = max(p.ir_version for p in (backbone, *sides))
    return model


def _standalone(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A side graph as its own file: only the opset imports and functions it uses."""
    used = {n.domain or "" for n in proto.graph.node}
    keep = [i for i in proto.opset_import if i.domain in used or i.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


class MultiTask(nn.Module):
    """The PyTorch reference: the first model's backbone once, each model's side network on it."""

    def __init__(self, models: dict[str, nn.Module]):
        super().__init__()
        self.models = models
        first = next(iter(models.values()))
        self.backbone = first.backbone

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        first = next(iter(self.models.values()))
        states = first.backbone_states(**inputs)
        mask = inputs.get("attention_mask")
        return {task_output(name): m.side(states, mask) for name, m in self.models.items()}


def check_compatible(models: dict[str, nn.Module], sources: dict[str, str] | None = None) -> str:
    """The fingerprint the models share; ValueError naming two that differ, or if their inputs or
    tokenizers differ (they are fed one tokenization)."""
    sources = sources or {n: n for n in models}
    prints = check_same({sources[n]: m.backbone_fingerprint for n, m in models.items()})
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        m = models[name]
        if list(input_names(m)) != list(input_names(first)):
            raise ValueError(f"{sources[names[0]]} and {sources[name]} take different inputs")
        if getattr(m, "tokenizer_json", None) != getattr(first, "tokenizer_json", None):
            raise ValueError(f"{sources[names[0]]} and {sources[name]} have different tokenizers")
    return prints


def validate(
    models: dict[str, nn.Module], run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], atol: float, log
) -> dict:
    """Each task's logits from ``run`` (the export) against its own PyTorch model, on the single-task
    cases (batches 1, 2, 7; short and long, padded and unpadded rows); per-token logits on real
    tokens only."""
    first = next(iter(models.values()))
    max_length = max(int(m.config.max_length) for m in models.values())
    per_task = {name: 0.0 for name in models}
    cases = []
    for i, case in enumerate(default_cases(first, max_length)):
        feed = _feed(first, case, seed=1000 + i)
        outs = run({k: v.numpy() for k, v in feed.items()})
        diffs = {}
        for name, m in models.items():
            with torch.no_grad():
                ref = m(**feed).float().numpy()
            got = outs[task_output(name)]
            diffs[name] = (
                float("inf")
                if ref.shape != got.shape
                else abs_diff(_real_tokens(ref, feed), _real_tokens(got, feed))[0]
            )
            per_task[name] = max(per_task[name], diffs[name])
        cases.append({"batch": case.batch, "seq": case.seq, "padded": case.padded, "max_abs_diff": diffs})
        if log:
            log(f"  parity {case.label}: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    worst = max(per_task.values())
    return {
        "atol": atol,
        "max_abs_diff": worst,
        "passed": bool(worst <= atol),
        "provider": "CPUExecutionProvider",
        "tasks": per_task,
        "cases": cases,
    }


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _runner(folder: Path, layout: str, names: list[str]):
    if layout == "merged":
        sess = _session(folder / MODEL_FILE)
        outs = [o.name for o in sess.get_outputs()]
        return lambda feed: dict(zip(outs, sess.run(outs, {i.name: feed[i.name] for i in sess.get_inputs()})))
    from mpismoe_edge.runtime.chain import ChainedSession

    chain = ChainedSession(
        _session(folder / BACKBONE_MODEL_FILE),
        {task_output(n): _session(folder / side_model_file(n)) for n in names},
    )
    return lambda feed: dict(
        zip(chain.output_names, chain.run(None, {i.name: feed[i.name] for i in chain.get_inputs()}))
    )


def _task_entry(name: str, model: nn.Module, layout: str, sizes: dict[str, int]) -> dict:
    cfg = model.config
    entry = {
        "name": name,
        "task": cfg.task,
        "labels": list(cfg.labels) if kind(cfg.task).has_labels else None,
        "output": task_output(name),
        "max_length": int(cfg.max_length),
    }
    if layout == "split":
        entry["model"] = f"{MODEL_DIR}/{side_model_file(name)}"
        entry["bytes"] = sizes[entry["model"]]
    return entry


def _bits(models: dict[str, nn.Module], quant_bits) -> dict[str, int]:
    """Layer -> bits: the shared backbone's layers once, each task's side layers as ``<task>/side...``."""
    names = list(models)
    found = {k: v for k, v in quant_bits(models[names[0]]).items() if k.startswith("backbone.")}
    for name in names:
        found.update({f"{name}/{k}": v for k, v in quant_bits(models[name]).items() if not k.startswith("backbone.")})
    return found


def _model_card(manifest: dict) -> str:
    rows = "\n".join(
        f"| {t['name']} | {t['task']} | {', '.join(t['labels'] or []) or '-'} | `{t['output']}` |"
        for t in manifest["tasks"]
    )
    mb = sum(v for k, v in manifest["sizes"].items() if k.startswith(f"{MODEL_DIR}/")) / 1e6
    return (
        f"# {len(manifest['tasks'])} tasks on one backbone\n\n"
        f"One backbone pass (fingerprint `{manifest['backbone_fingerprint']}`), then each task's side network. "
        f"Target `{manifest['target']}`, layout `{manifest['layout']}`, {mb:.1f} MB of files.\n\n"
        "| task | kind | labels | output |\n|---|---|---|---|\n" + rows + "\n\n"
        "```python\nfrom mpismoe_edge.runtime import Predictor\n\n"
        'p = Predictor.from_dir(".")\np.predict(["some text"])  # {task: result, ..., "truncated": ...} per text\n```\n'
    )


def export_tasks(
    models: dict[str, nn.Module],
    out_dir: str | Path,
    *,
    target: str = "portable",
    layout: str = "merged",
    opset: int = F.MIN_OPSET,
    atol: float | None = None,
    validate_export: bool = True,
    zero_points: str = "auto",
    accuracy_level: int = 0,
    sources: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Export several task models that share one backbone into ``out_dir`` (atomically, as
    :func:`.pipeline.export_model`); returns the manifest. ``models``: task name -> model (the
    name names its output, ``<name>_logits``); ``sources``: task name -> where it came from, for
    messages. ValueError for bad arguments or models on different backbones (before any work);
    :class:`.pipeline.ParityError` when a task's logits are past ``atol``; nothing is written then."""
    from .pipeline import ParityError, quant_bits, weight_sizes, write_hf_files

    log = log or (lambda _msg: None)
    names = list(models)
    if not names:
        raise ValueError("no task to export")
    check_task_names(names)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < F.MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the exported graph needs opset >= {F.MIN_OPSET}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"unknown accuracy level {accuracy_level!r}; expected one of {ACCURACY_LEVELS}")
    atol = default_atol(target) if atol is None else atol
    fingerprint = check_compatible(models, sources)
    first = models[names[0]]
    for m in models.values():
        m.eval()
    out_dir = Path(out_dir)
    with staging_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        log(f"exporting the shared backbone for {target}...")
        backbone, stats = backbone_graph(first, target, opset, zero_points, accuracy_level)
        sides = []
        for name in names:
            log(f"exporting task {name}'s side network...")
            side, sstats = side_graph(models[name], name, target, opset, zero_points, accuracy_level)
            sides.append(side)
            stats.update({f"{name}_{k}": v for k, v in sstats.items()})
        (tmp / MODEL_DIR).mkdir()
        files: list[str] = []
        if layout == "merged":
            graphs = {MODEL_FILE: merge(backbone, sides)}
        else:
            graphs = {BACKBONE_MODEL_FILE: backbone}
            graphs.update({side_model_file(n): _standalone(s) for n, s in zip(names, sides)})
        for file, proto in graphs.items():
            (tmp / MODEL_DIR / file).write_bytes(proto.SerializeToString())
            onnx.checker.check_model(str(tmp / MODEL_DIR / file))
            files.append(f"{MODEL_DIR}/{file}")
        log(f"  built in {time.perf_counter() - t0:.1f}s: " + ", ".join(files))
        files += write_hf_files(first, tmp)  # config.json: the first task's head, for Hugging Face loaders
        parity = None
        if validate_export:
            log(f"validating each task against PyTorch on ONNX Runtime (atol {atol:g})...")
            parity = validate(models, _runner(tmp / MODEL_DIR, layout, names), atol, log)
            log("  max abs diff " + ", ".join(f"{k} {v:.3g}" for k, v in parity["tasks"].items()))
            if not parity["passed"]:
                bad = {k: v for k, v in parity["tasks"].items() if not v <= atol}
                raise ParityError(
                    "parity check failed: "
                    + ", ".join(f"{k} max abs diff {v:.3g}" for k, v in bad.items())
                    + f" > atol {atol:g}",
                    parity,
                )
        sizes = {f: (tmp / f).stat().st_size for f in files}
        all_protos = list(graphs.values())
        weights = Counter()
        for proto in all_protos:
            weights.update(weight_sizes(proto))
        ops = Counter(
            f"{n.domain or 'ai.onnx'}.{n.op_type}"
            for proto in all_protos
            for n in proto.graph.node
            if n.domain in (F.DOMAIN, "com.microsoft")
        )
        manifest = {
            "format": FORMAT,
            "task": MULTI_TASK,
            "tasks": [_task_entry(n, models[n], layout, sizes) for n in names],
            "labels": None,
            "max_length": max(int(m.config.max_length) for m in models.values()),
            "inputs": input_names(first),
            "outputs": [task_output(n) for n in names],
            "target": target,
            "runtimes": list(TARGET_RUNTIMES[target]),
            "layout": layout,
            "model": f"{MODEL_DIR}/{MODEL_FILE}" if layout == "merged" else None,
            "backbone": {
                "model": f"{MODEL_DIR}/{BACKBONE_MODEL_FILE}" if layout == "split" else None,
                "outputs": [o.name for o in backbone.graph.output],
            },
            "backbone_fingerprint": fingerprint,
            "inlined_functions": False,
            "opset": opset,
            "ir_version": max(p.ir_version for p in all_protos),
            "custom_ops": dict(sorted(ops.items())),
            "fusion": stats,
            "accuracy_level": accuracy_level,
            "bits": _bits(models, quant_bits),
            "sizes": {**sizes, **{k: int(v) for k, v in weights.items()}},
            "parity": parity,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / README_FILE).write_text(_model_card(manifest), encoding="utf-8")
        commit(tmp, out_dir)
    log(f"wrote {out_dir} ({len(names)} tasks, layout {layout}) in {time.perf_counter() - t0:.1f}s")
    return manifest
