"""Hugging Face's ONNX layout: the JSON files HF loaders (transformers.js, Optimum, transformers)
read next to ``onnx/model.onnx`` and ``tokenizer.json``.

* ``config.json``: the backbone's config with the task's head: ``architectures`` (e.g.
  ``BertForSequenceClassification``), ``id2label``/``label2id``, ``problem_type``, and
  ``transformers.js_config`` (``dtype: fp32``, so transformers.js picks ``onnx/model.onnx``).
* ``tokenizer_config.json`` / ``special_tokens_map.json``: the special tokens, read from the
  tokenizer.json itself (its post-processor for CLS/SEP, its model for UNK; PAD is the one our
  runtime pads with), ``model_max_length`` and the model's input names.
"""

from __future__ import annotations

import json
from typing import Any

from mpismoe_edge.runtime.tasks import kind
from mpismoe_edge.runtime.text import TextEncoder

IMAGE_HEAD = "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"


def head_architecture(model_type: str, task: str, image: bool = False) -> str | None:
    """The Hugging Face class name of ``model_type``'s head for ``task`` (None if it has none)."""
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, IMAGE_HEAD if image else kind(task).head_mapping)
    name = mapping.get(model_type)
    return name if isinstance(name, str) else None


def hf_config(
    backbone_config: dict[str, Any], task: str, labels: list[str] | None, num_outputs: int, image: bool = False
) -> dict[str, Any]:
    """``config.json``: the backbone's config plus the head a loader builds the pipeline from."""
    head = kind(task)  # the Hugging Face head and problem_type of the task (runtime/tasks.py)
    names = list(labels or [])
    if len(names) != num_outputs:
        names = [f"LABEL_{i}" for i in range(num_outputs)]
    cfg = {
        k: v for k, v in backbone_config.items() if k not in ("id2label", "label2id", "architectures", "problem_type")
    }
    arch = head_architecture(cfg.get("model_type", ""), task, image)
    if arch:
        cfg["architectures"] = [arch]
    cfg["id2label"] = {str(i): name for i, name in enumerate(names)}
    cfg["label2id"] = {name: i for i, name in enumerate(names)}
    if head.problem_type and not image:
        cfg["problem_type"] = head.problem_type
    cfg["transformers.js_config"] = {"dtype": "fp32"}
    return cfg


def _template_specials(post_processor: dict | None) -> tuple[str | None, str | None]:
    """(CLS, SEP) of a tokenizer.json post-processor: the special tokens before and after ``$A``."""
    if not post_processor:
        return None, None
    kind = post_processor.get("type")
    if kind in ("BertProcessing", "RobertaProcessing"):
        return post_processor["cls"][0], post_processor["sep"][0]
    if kind == "TemplateProcessing":
        before, after, seen_a = [], [], False
        for piece in post_processor.get("single", []):
            if "Sequence" in piece:
                seen_a = True
            elif "SpecialToken" in piece:
                (after if seen_a else before).append(piece["SpecialToken"]["id"])
        return (before[0] if before else None), (after[0] if after else None)
    if kind == "Sequence":
        for sub in post_processor.get("processors", []):
            found = _template_specials(sub)
            if found != (None, None):
                return found
    return None, None


def special_tokens(tokenizer_json: str) -> dict[str, str]:
    """``{cls_token, sep_token, pad_token, unk_token, mask_token}`` (those the tokenizer has)."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_json)
    tok = Tokenizer.from_str(tokenizer_json)
    found: dict[str, str | None] = {}
    found["cls_token"], found["sep_token"] = _template_specials(spec.get("post_processor"))
    found["pad_token"] = tok.id_to_token(TextEncoder(tok, 2).pad_id)  # the id our runtime pads with
    model = spec.get("model") or {}
    unk = model.get("unk_token")
    if unk is None and isinstance(model.get("unk_id"), int):  # Unigram
        unk = model["vocab"][model["unk_id"]][0]
    found["unk_token"] = unk
    specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    found["mask_token"] = next((t for t in specials if "mask" in t.lower()), None)
    return {k: v for k, v in found.items() if v is not None}


def tokenizer_config(tokenizer_json: str, max_length: int, input_names: list[str]) -> dict[str, Any]:
    """``tokenizer_config.json``: the generic fast tokenizer over tokenizer.json, as our runtime uses it."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(max_length),
        "model_input_names": list(input_names),
        "padding_side": "right",
        "truncation_side": "right",
        **special_tokens(tokenizer_json),
    }


def write_json(path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
