"""``export_model``: torch model -> validated ``out/`` in Hugging Face's ONNX layout
(onnx/model.onnx, config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json)
plus manifest.json for our runtime and README.md (the model card, :mod:`.model_card`);
optionally the functions inlined, and onnx/model.ort."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path

import onnx
from torch import nn

from mpismoe_edge.runtime.spec import (
    CONFIG_FILE,
    DATA_FILE,
    FORMAT,
    MANIFEST_FILE,
    MODEL_DIR,
    MODEL_FILE,
    README_FILE,
    SPECIAL_TOKENS_FILE,
    TARGET_SPECS,
    TARGETS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)

from . import functions as F
from . import hf_layout as HF
from .fuse import INT8_TARGET, default_atol, fuse
from .lower import OUTPUT_NAME, input_names, to_onnx
from .model_card import model_card
from .output import commit, staging_dir
from .rules.qmatmul_nbits import ACCURACY_LEVELS
from .runtimes import TARGET_RUNTIMES
from .validate import check_parity

# protobuf refuses messages over 2 GiB; stay clear of it with the weights in a side file
EXTERNAL_DATA_BYTES = 1_800_000_000


class ParityError(RuntimeError):
    """The exported model does not match PyTorch within the tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quant_bits(model: nn.Module, proto: onnx.ModelProto | None = None) -> dict[str, int]:
    """Layer name -> bits of every packed layer (QuantLinear, QuantEmbedding) in ``model`` (and in
    ``proto``'s graph: layers the output does not depend on, like an unused pooler, are not exported)."""
    from mpismoe_edge.quant.embedding import QuantEmbedding
    from mpismoe_edge.quant.linear import QuantLinear

    names = None if proto is None else {t.name for t in proto.graph.initializer}

    def in_graph(name: str) -> bool:
        if names is None or f"{name}.qweight" in names:
            return True
        moe, sep, rest = name.partition(".experts.")  # experts stacked by ISMoE.prepare_export
        return bool(sep) and f"{moe}.stacked_{rest.rpartition('.')[2]}_qweight" in names

    return {
        name: int(m.bits)
        for name, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantEmbedding)) and in_graph(name)
    }


def weight_sizes(proto: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the initializers by role: packed codes, quantization params, int8 weights, float weights."""
    role: dict[str, str] = {}
    for node in proto.graph.node:
        if (node.domain, node.op_type) in (
            (F.DOMAIN, "QMatMul"),
            (F.DOMAIN, "QGather"),
            ("com.microsoft", "MatMulNBits"),
        ):
            role[node.input[1]] = "packed_codes"
            for name in node.input[2:4]:
                role.setdefault(name, "quant_params")
        elif (node.domain, node.op_type) in (("com.microsoft", "QAttention"), ("", "MatMulInteger")):
            role[node.input[1]] = "int8_weights"  # ort-int8: quantize_dynamic's weights
    sizes = Counter()
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        sizes[role.get(t.name, "float_weights")] += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return {k: int(sizes[k]) for k in ("packed_codes", "quant_params", "int8_weights", "float_weights")}


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def inline_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every model-local function replaced by its body (for runtimes that do not
    read functions, e.g. OpenVINO); ONNX Runtime inlines them at load anyway."""
    from onnx.inliner import inline_local_functions

    inlined = inline_local_functions(proto)
    inlined.ir_version = proto.ir_version
    _cast_like_to_cast(inlined)
    used = {n.domain for n in inlined.graph.node}
    keep = [imp for imp in inlined.opset_import if imp.domain in used or imp.domain in ("", "ai.onnx")]
    del inlined.opset_import[:]
    inlined.opset_import.extend(keep)
    return inlined


def _cast_like_to_cast(proto: onnx.ModelProto) -> None:
    """CastLike(x, like) -> Cast(x, to=like's type) where the type is known (in place): inside a
    function CastLike keeps the body generic; in the graph ONNX Runtime has no CastLike kernel (it
    expands the op, and warns at load that it cannot constant-fold it)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {t.name: t.data_type for t in proto.graph.initializer}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in proto.graph.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and types.get(node.input[1]):
            to = types[node.input[1]]
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "Cast"
            node.attribute.append(onnx.helper.make_attribute("to", to))


def save_model(proto: onnx.ModelProto, folder: Path, external: bool | None = None) -> list[str]:
    """Write ``model.onnx`` (and ``model.onnx.data`` when large) into ``folder``; returns the file names."""
    if external is None:
        external = _initializer_bytes(proto) > EXTERNAL_DATA_BYTES
    path = folder / MODEL_FILE
    if external:
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
        )
        return [MODEL_FILE, DATA_FILE]
    path.write_bytes(proto.SerializeToString())
    return [MODEL_FILE]


def write_hf_files(model: nn.Module, folder: Path) -> list[str]:
    """config.json, and with a tokenizer tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    config = getattr(model, "config", None)
    task = getattr(config, "task", "classification")
    labels = list(getattr(config, "labels", []) or [])
    num_outputs = int(getattr(config, "num_outputs", len(labels) or 1))
    names = input_names(model)
    backbone_config = dict(getattr(config, "backbone_config", None) or {})
    files = [CONFIG_FILE]
    HF.write_json(
        folder / CONFIG_FILE, HF.hf_config(backbone_config, task, labels, num_outputs, image="pixel_values" in names)
    )
    tokenizer_json = getattr(model, "tokenizer_json", None)
    if tokenizer_json:
        (folder / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        max_length = int(getattr(config, "max_length", 128) or 128)
        tok_config = HF.tokenizer_config(tokenizer_json, max_length, names)
        HF.write_json(folder / TOKENIZER_CONFIG_FILE, tok_config)
        HF.write_json(folder / SPECIAL_TOKENS_FILE, {k: v for k, v in tok_config.items() if k.endswith("_token")})
        files += [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE]
    return files


def build_manifest(
    model: nn.Module,
    proto: onnx.ModelProto,
    target: str,
    opset: int,
    folder: Path,
    files: list[str],
    stats: dict,
    parity: dict | None,
    accuracy_level: int = 0,
    inlined: bool = False,
) -> dict:
    config = getattr(model, "config", None)
    task = getattr(config, "task", "classification")
    labels = list(getattr(config, "labels", []) or []) or None
    ops = Counter(
        f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in proto.graph.node if n.domain in (F.DOMAIN, "com.microsoft")
    )
    sizes = {name: (folder / name).stat().st_size for name in files}
    sizes.update(weight_sizes(proto))
    return {
        "format": FORMAT,
        "task": task,
        "labels": labels,
        "max_length": int(getattr(config, "max_length", 128) or 128),
        "inputs": input_names(model),
        "outputs": [OUTPUT_NAME],
        "target": target,
        "runtimes": list(TARGET_RUNTIMES[target]),
        "model": f"{MODEL_DIR}/{MODEL_FILE}",
        "inlined_functions": inlined,
        "opset": opset,
        "ir_version": proto.ir_version,
        "custom_ops": dict(sorted(ops.items())),
        "fusion": stats,
        "accuracy_level": accuracy_level,
        "bits": quant_bits(model, proto),
        "backbone_fingerprint": getattr(model, "backbone_fingerprint", None),
        "sizes": sizes,
        "parity": parity,
    }


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    target: str = "portable",
    opset: int = F.MIN_OPSET,
    atol: float | None = None,
    validate: bool = True,
    external_data: bool | None = None,
    zero_points: str = "auto",
    accuracy_level: int = 0,
    inline: bool = False,
    ort_format: bool = False,
    metrics: dict | None = None,
    float_layers: Collection[str] = (),
    log: Callable[[str], None] | None = _stderr,
) -> dict:
    """Export, validate and atomically write ``out_dir``; returns the manifest.

    ``inline``: write the graph with the functions inlined (runtimes that do not read model-local
    functions, e.g. OpenVINO). ``ort_format``: also write ``onnx/model.ort`` and its
    ``required_operators.config`` for ONNX Runtime Mobile (:mod:`.ort_format`). ``metrics``: the
    training run's ``metrics.json`` (:func:`.model_card.read_metrics`), for the model card's scores.
    ``float_layers`` (``ort-int8`` only): backbone MatMul layers to compute in float from their
    packed codes instead of in int8 (:func:`.int8.float_layer_candidates` names them).

    ``atol`` defaults to the target's (:func:`.fuse.default_atol`: 1e-4 for the float-exact
    targets, looser for ``ort-int8``'s int8 activations).
    Raises ValueError for bad arguments or an unusable ``out_dir`` (before any work), and
    :class:`ParityError` when validation fails; either way nothing is written.
    """
    log = log or (lambda _msg: None)
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < F.MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: the exported graph needs opset >= {F.MIN_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is newer than this onnx supports ({onnx.defs.onnx_opset_version()})")
    atol = default_atol(target) if atol is None else atol
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"unknown accuracy level {accuracy_level!r}; expected one of {ACCURACY_LEVELS}")
    if float_layers and not TARGET_SPECS[target].int8:
        raise ValueError(f"float layers are an {INT8_TARGET} option; target {target} computes every layer in float")
    out_dir = Path(out_dir)
    model.eval()
    with staging_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        log(f"exporting {type(model).__name__} with torch.onnx (dynamo, opset {opset})...")
        stats: dict = {}
        if TARGET_SPECS[target].int8:
            from .int8_target import int8_model

            proto, stats = int8_model(model, opset=opset, zero_points=zero_points, float_layers=float_layers)
        else:
            proto = to_onnx(model, opset=opset)
        log(
            f"  traced and converted in {time.perf_counter() - t0:.1f}s: {len(proto.graph.node)} nodes, "
            f"{len(proto.graph.initializer)} initializers"
        )
        if TARGET_SPECS[target].int8:
            log("  int8 backbone, packed side network: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        else:
            proto, stats = fuse(proto, target, zero_points=zero_points, accuracy_level=accuracy_level)
            if stats:
                log(f"  fused for {target}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        if inline:
            proto = inline_functions(proto)
            log(f"  functions inlined: {len(proto.graph.node)} nodes")
        (tmp / MODEL_DIR).mkdir()
        files = [f"{MODEL_DIR}/{name}" for name in save_model(proto, tmp / MODEL_DIR, external_data)]
        model_path = tmp / MODEL_DIR / MODEL_FILE
        onnx.checker.check_model(str(model_path))
        files += write_hf_files(model, tmp)
        parity = None
        if validate:
            t1 = time.perf_counter()
            log(f"validating against PyTorch on ONNX Runtime (atol {atol:g})...")
            parity = check_parity(model, model_path, atol=atol, log=log)
            log(f"  max abs diff {parity['max_abs_diff']:.3g} in {time.perf_counter() - t1:.1f}s")
            if not parity["passed"]:
                raise ParityError(
                    f"parity check failed: max abs diff {parity['max_abs_diff']:.3g} > atol {atol:g}", parity
                )
        if ort_format:
            from .ort_format import write_ort

            files += [str(p.relative_to(tmp)) for p in write_ort(model_path)]
            log(f"  wrote {MODEL_DIR}/model.ort for ONNX Runtime Mobile")
        manifest = build_manifest(model, proto, target, opset, tmp, files, stats, parity, accuracy_level, inline)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        hf_config = json.loads((tmp / CONFIG_FILE).read_text(encoding="utf-8"))
        (tmp / README_FILE).write_text(model_card(manifest, hf_config, metrics), encoding="utf-8")
        commit(tmp, out_dir)
    log(f"wrote {out_dir} ({', '.join(files + [MANIFEST_FILE, README_FILE])}) in {time.perf_counter() - t0:.1f}s")
    return manifest
