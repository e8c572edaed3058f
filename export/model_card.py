"""The model card every export carries: ``README.md`` in Hugging Face's form (YAML front matter,
then Markdown), so the folder documents itself wherever it goes (a Hub repository, a device).

:func:`model_card` is a pure function of what the export folder itself holds (``manifest.json``,
``config.json``) and the training run's ``metrics.json`` (:func:`read_metrics`), so a re-export
writes the same bytes: no dates, no absolute paths (a backbone loaded from a local folder is
named by the folder's name). Facts the inputs do not hold are written as "not recorded", never
guessed: the backbone's license is taken from its config (Hugging Face configs rarely carry
one: then ``license: other`` and a pointer to the backbone's own card). Stdlib only.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mpismoe_edge.runtime.spec import CHECKPOINT_FILE, IMAGE_INPUTS, METRICS_FILE
from mpismoe_edge.runtime.tasks import kind

NOT_RECORDED = "not recorded"
SAMPLE_TEXT = "I love my new self-driving car"
BROWSER_PAGE = "examples/browser/serve.py"
# a Hugging Face Hub model id: NAME or OWNER/NAME (a local path has more parts, or starts with / . ~)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_metrics(checkpoint: str | Path) -> dict[str, Any] | None:
    """The run's ``metrics.json`` when it sits next to ``checkpoint`` and describes it (the
    checkpoint is the run's ``model.pt``), else None (also when the file is not a JSON object)."""
    checkpoint = Path(checkpoint)
    path = checkpoint.with_name(METRICS_FILE)
    if checkpoint.name != CHECKPOINT_FILE or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def base_model(config: dict[str, Any]) -> str:
    """The backbone's Hub id when its config records one (``_name_or_path``), else the name of
    the folder it was loaded from; ``unknown`` when the config says nothing."""
    name = str(config.get("_name_or_path") or "").strip().rstrip("/\\")
    if not name:
        return "unknown"
    if _HUB_ID.match(name) and not name.startswith("."):
        return name
    return re.split(r"[/\\]", name)[-1] or "unknown"


def pipeline_tag(manifest: dict[str, Any]) -> str:
    """The Hugging Face pipeline the export loads as (``image-classification`` for image inputs)."""
    if any(name in IMAGE_INPUTS for name in manifest.get("inputs") or ()):
        return "image-classification"
    return kind(manifest["task"]).pipeline


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML plain scalar when that is safe, else double-quoted (JSON escaping)."""
    if re.fullmatch(r"[A-Za-z0-9][\w./+-]*", value) and value.lower() not in ("yes", "no", "true", "false", "null"):
        return value
    return json.dumps(value)


def front_matter(manifest: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata: ``library_name``, ``pipeline_tag``, ``base_model``, ``license``, ``tags``."""
    runtimes = list(manifest.get("runtimes") or ())
    widths = sorted(set((manifest.get("bits") or {}).values()))
    tags = ["onnx", "mpismoe-edge", manifest.get("target", "portable")]
    if widths and min(widths) < 16:
        tags += ["low-bit"] + [f"{b}-bit" for b in widths]
    tags += [r for r in runtimes if r == "transformers.js"]
    license_ = str(config.get("license") or "").strip()
    return {
        "library_name": "transformers.js" if "transformers.js" in runtimes else "onnx",
        "pipeline_tag": pipeline_tag(manifest),
        "base_model": base_model(config),
        "license": license_ or "other",
        "tags": list(dict.fromkeys(tags)),
    }


def _yaml(meta: dict[str, Any]) -> str:
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {_yaml_scalar(str(v))}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(str(value))}")
    return "\n".join(lines + ["---"])


def _code(lang: str, body: str) -> str:
    return f"```{lang}\n{body.strip()}\n```"


def _num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def task_section(manifest: dict[str, Any], config: dict[str, Any]) -> str:
    task, labels = manifest["task"], list(manifest.get("labels") or [])
    if not labels:  # older manifests: the head's names in config.json
        id2label = config.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
    what = kind(task).answers
    out = [
        "## Task and labels",
        "",
        f"Task: **{task}** ({what}); Hugging Face pipeline `{pipeline_tag(manifest)}`.",
        f"Inputs: {', '.join(f'`{n}`' for n in manifest.get('inputs') or [])}; output `logits`; "
        f"texts are cut at {manifest.get('max_length', NOT_RECORDED)} tokens.",
    ]
    if not kind(task).has_labels:
        out.append(f"Output name: {', '.join(f'`{n}`' for n in labels) or NOT_RECORDED}.")
    else:
        out.append(f"Labels ({len(labels)}, in logit order): {', '.join(f'`{n}`' for n in labels)}.")
    return "\n".join(out)


def training_section(metrics: dict[str, Any] | None) -> str:
    out = ["## Training data and metrics", ""]
    if not metrics:
        out.append(
            f"Training data and metrics: {NOT_RECORDED} (no `{METRICS_FILE}` of the training run was next to the "
            "exported checkpoint)."
        )
        return "\n".join(out)
    final, test = metrics.get("final") or {}, metrics.get("test") or {}
    names = [k for k in dict.fromkeys([*final, *test]) if k not in ("epoch", "seconds")]
    out.append(
        f"From the training run's `{METRICS_FILE}`; validation is the final (packed) model's, test was scored once."
    )
    out.append("")
    if names:
        out += ["| metric | validation | test |", "|---|---|---|"]
        cell = lambda scores, n: _num(scores[n]) if n in scores else NOT_RECORDED  # noqa: E731
        out += [f"| {n} | {cell(final, n)} | {cell(test, n)} |" for n in names]
    else:
        out.append(f"Scores: {NOT_RECORDED}.")
    out.append("")
    history = [h for h in metrics.get("history") or [] if isinstance(h, dict)]
    epochs = max((int(h.get("epoch", 0)) for h in history), default=0)
    planned = (metrics.get("train_config") or {}).get("epochs")
    facts = [
        f"epochs run: {epochs if history else NOT_RECORDED}" + (f" (planned {planned})" if planned else ""),
        f"training rows: {metrics['train_rows'] if 'train_rows' in metrics else NOT_RECORDED}",
        f"training data: {metrics['data'] if 'data' in metrics else NOT_RECORDED}",
    ]
    if isinstance(metrics.get("train_seconds"), (int, float)):
        facts.append(f"training time: {metrics['train_seconds']:.0f} s on {metrics.get('device', NOT_RECORDED)}")
    if "trainable_params" in metrics:
        facts.append(f"trainable parameters: {metrics['trainable_params']:,}")
    out += [f"* {fact}" for fact in facts]
    return "\n".join(out)


def bits_summary(bits: dict[str, int]) -> list[tuple[str, int, dict[int, int]]]:
    """``(pattern, layers, {bits: count})`` with layer numbers replaced by ``*``, in first-seen order."""
    groups: dict[str, Counter] = defaultdict(Counter)
    for name, width in bits.items():
        groups[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)][int(width)] += 1
    return [(pattern, sum(c.values()), dict(sorted(c.items()))) for pattern, c in groups.items()]


def backbone_section(manifest: dict[str, Any], config: dict[str, Any]) -> str:
    shape = ", ".join(
        f"{label} {config[key]}"
        for key, label in (("model_type", "type"), ("num_hidden_layers", "layers"), ("hidden_size", "hidden"))
        if key in config
    )
    out = [
        "## Backbone and bit map",
        "",
        f"Backbone: `{base_model(config)}`" + (f" ({shape})" if shape else "") + ", frozen; a ladder side network "
        "with a mixture of experts (MP-ISMoE) was trained beside it.",
    ]
    license_ = config.get("license")
    out.append(
        f"License: `{license_}` (the backbone's config)."
        if license_
        else "License: not recorded in the backbone's config; this export derives from the backbone's weights, so "
        "its license is the backbone's (see the backbone's own model card)."
    )
    bits = manifest.get("bits") or {}
    if not bits:
        out += ["", "Packed layers: none (float weights)."]
        return "\n".join(out)
    total = Counter(bits.values())
    out += [
        "",
        f"Packed layers: {len(bits)} ("
        + ", ".join(f"{n} at {b} bits" for b, n in sorted(total.items()))
        + "); the rest of the weights are float.",
        "",
        "| layers | count | bits |",
        "|---|---|---|",
    ]
    for pattern, count, widths in bits_summary(bits):
        out.append(f"| `{pattern}` | {count} | {', '.join(f'{b} (x{n})' for b, n in widths.items())} |")
    return "\n".join(out)


def export_section(manifest: dict[str, Any]) -> str:
    sizes = manifest.get("sizes") or {}
    graph = manifest.get("model", "onnx/model.onnx")
    out = [
        "## Export",
        "",
        f"Target `{manifest.get('target')}`, ONNX opset {manifest.get('opset')}, graph `{graph}`"
        + (f" ({sizes[graph] / 1e6:.1f} MB)" if isinstance(sizes.get(graph), int) else "")
        + (", functions inlined" if manifest.get("inlined_functions") else "")
        + ".",
        f"Runs in: {', '.join(f'`{r}`' for r in manifest.get('runtimes') or []) or NOT_RECORDED} "
        "(each target's list is what mpismoe-edge's deploy tests run it in).",
    ]
    return "\n".join(out)


def validation_section(manifest: dict[str, Any]) -> str:
    parity = manifest.get("parity")
    out = ["## Validation", ""]
    if not parity:
        out.append(
            "Not validated at export (`--no-validate`): `mpismoe-parity model.pt EXPORT` compares it with PyTorch."
        )
        return "\n".join(out)
    cases = parity.get("cases") or []
    padded = sum(1 for c in cases if c.get("padded"))
    verdict = "passed" if parity.get("passed") else "FAILED"
    out.append(
        f"At export, ONNX Runtime ({parity.get('provider')}) ran this graph against the PyTorch model on {len(cases)} "
        f"input shapes ({padded} padded): max abs logit difference {parity['max_abs_diff']:.2g}, "
        f"tolerance {parity['atol']:.2g}: **{verdict}**."
    )
    return "\n".join(out)


def _python_snippet(manifest: dict[str, Any]) -> str:
    if pipeline_tag(manifest) == "image-classification":
        return _code(
            "python",
            """
from mpismoe_edge.runtime import Predictor

predictor = Predictor.from_dir("EXPORT")
logits = predictor.run_arrays({"pixel_values": pixels})  # float32 [batch, channels, height, width]
""",
        )
    return (
        _code(
            "python",
            f"""
from mpismoe_edge.runtime import Predictor  # torch-free: numpy, onnxruntime, tokenizers

predictor = Predictor.from_dir("EXPORT")
print(predictor.predict([{json.dumps(SAMPLE_TEXT)}]))
""",
        )
        + "\n\nor on the command line: `mpismoe-run EXPORT --text "
        + json.dumps(SAMPLE_TEXT)
        + "`."
    )


def _node_snippet(manifest: dict[str, Any]) -> str:
    runtimes = manifest.get("runtimes") or []
    text = pipeline_tag(manifest) != "image-classification"
    if text and "transformers.js" in runtimes:
        task = pipeline_tag(manifest)
        read = (
            "const { logits } = await pipe.model(pipe.tokenizer([text], { padding: true }));  // score: logits[0][0]"
            if not kind(manifest["task"]).has_labels  # a raw score: the pipeline would softmax it
            else f"console.log(await pipe(text{', { top_k: null }' if task == 'text-classification' else ''}));"
        )
        return "transformers.js (`npm install @huggingface/transformers@4.3.1`):\n\n" + _code(
            "js",
            f"""
import {{ env, pipeline }} from "@huggingface/transformers";
env.allowRemoteModels = false;
env.localModelPath = "PARENT_OF_EXPORT/";
const pipe = await pipeline("{task}", "EXPORT_NAME", {{ dtype: "fp32" }});
const text = {json.dumps(SAMPLE_TEXT)};
{read}
""",
        )
    package = next((p for p in ("onnxruntime-node", "onnxruntime-web") if p in runtimes), None)
    if package is None:
        return f"No JavaScript runtime is listed for target `{manifest.get('target')}`."
    names = manifest.get("inputs") or []
    load = (
        'import ort from "onnxruntime-node";'
        if package == "onnxruntime-node"
        else 'import * as ort from "onnxruntime-web";'
    )
    provider = "cpu" if package == "onnxruntime-node" else "wasm"
    feed = ", ".join(f"{n}: t({n}, dims)" for n in names)
    graph = manifest.get("model", "onnx/model.onnx")
    intro = f"{package} (`npm install {package}@1.30.0`), int64 inputs from the tokenizer in `tokenizer.json`:"
    return f"{intro}\n\n" + _code(
        "js",
        f"""
{load}
const options = {{ executionProviders: ["{provider}"] }};
const session = await ort.InferenceSession.create("EXPORT/{graph}", options);
const t = (data, dims) => new ort.Tensor("int64", BigInt64Array.from(data.map(BigInt)), dims);
const {{ logits }} = await session.run({{ {feed} }});
""",
    )


def _browser_snippet(manifest: dict[str, Any]) -> str:
    if pipeline_tag(manifest) == "image-classification":
        return "The browser page of mpismoe-edge runs text exports only."
    note = (
        ""
        if "transformers.js" in (manifest.get("runtimes") or [])
        else f" (it loads the export with transformers.js, which target `{manifest.get('target')}` does not list)"
    )
    return (
        "From a clone of mpismoe-edge, after `cd examples/browser && npm ci` once: a page on 127.0.0.1 that runs this "
        f"folder with transformers.js (onnxruntime-web, wasm), nothing fetched from elsewhere{note}:\n\n"
        + _code("bash", f"python {BROWSER_PAGE} EXPORT --port 8000   # then open http://127.0.0.1:8000/")
    )


def usage_section(manifest: dict[str, Any]) -> str:
    return "\n\n".join(
        [
            "## Use",
            "`EXPORT` is the path of this folder (`EXPORT_NAME` its name, `PARENT_OF_EXPORT` the folder holding it).",
            "### Python",
            _python_snippet(manifest),
            "### Node",
            _node_snippet(manifest),
            "### Browser",
            _browser_snippet(manifest),
        ]
    )


def model_card(manifest: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """``README.md`` of an export: front matter, then task, training, backbone, export, validation, use."""
    meta = front_matter(manifest, config)
    title = f"# {meta['base_model']} + MP-ISMoE side network, {manifest['task']} (ONNX, {manifest.get('target')})"
    intro = (
        "Exported by `mpismoe-export` (mpismoe-edge): a frozen low-bit Hugging Face encoder and a trained ladder side "
        "network with a mixture of experts, as one ONNX graph in Hugging Face's ONNX layout (`onnx/model.onnx`, "
        "`config.json`, tokenizer files) plus `manifest.json`, which mpismoe-edge's runtime reads."
    )
    sections = [
        _yaml(meta),
        title,
        intro,
        task_section(manifest, config),
        training_section(metrics),
        backbone_section(manifest, config),
        export_section(manifest),
        validation_section(manifest),
        usage_section(manifest),
    ]
    return "\n\n".join(sections) + "\n"
