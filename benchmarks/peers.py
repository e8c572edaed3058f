"""The methods the benchmarks compare, built one way for every benchmark.

* ``full-ft``: the whole fp32 backbone plus a linear head (mean-pooled; on every token for token
  classification) trained end to end: :class:`FineTuned`, the one full fine-tuning peer of
  ``benchmarks/tasks.py`` and ``benchmarks/train.py``;
* ``lora``: the same with peft LoRA (r 8, alpha 16, dropout 0.1) on the attention's query and value;
* ``lst`` / ``lst-pruned``: fp32 frozen backbone, ladder side network with one dense FFN per
  block, random / pruned init (``lst_ffn_bits``: ``benchmarks/tasks.py`` has always trained its
  dense FFN 4-bit quantization-aware, ``SideConfig``'s default; ``benchmarks/train.py`` in float);
* ``mp-ismoe``: 4-bit GNP-IQ backbone, ISMoE side network (8 experts, top-2, 4-bit QAT experts,
  pruned init), the interactive router; ``mp-ismoe-side-router``: the router reads only the side
  token; ``mp-ismoe-skip`` / ``mp-ismoe-ridge``: plus the linear skip from the frozen pooled
  states, trained from zero / fitted as a ridge probe first (``TrainConfig.skip_init``);
* ``mpismoe-train``: the command line with every default but the seed and threads
  (:func:`run_mpismoe_train`).

The side networks train with ``mpismoe_edge.train``; full fine-tuning and LoRA with
``benchmarks/peer_training.py``: the same loop, batches and epoch rule.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

METHODS = ("full-ft", "lora", "lst", "mp-ismoe", "mp-ismoe-side-router")  # benchmarks/tasks.py's default sweep
CLI_METHOD = "mpismoe-train"  # the command line with every default: the subject of the small-data check
SKIP_METHOD = "mp-ismoe-skip"
RIDGE_METHOD = "mp-ismoe-ridge"
SKIP_METHODS = (SKIP_METHOD, RIDGE_METHOD)  # the linear skip: trained from zero / the ridge probe, frozen
SIDE_METHODS = ("lst", "lst-pruned", "mp-ismoe", "mp-ismoe-side-router", *SKIP_METHODS)
LORA_TARGETS = {"bert": ["query", "value"], "mpnet": ["q", "v"]}  # attention query/value Linears by model_type
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class FineTuned(torch.nn.Module):
    """Encoder + linear head trained end to end: mean-pooled, or on every token (``token_level``);
    ``input_names``: the text inputs the backbone takes."""

    def __init__(self, backbone, outputs: int, token_level: bool, input_names: list[str]):
        super().__init__()
        self.input_names, self.token_level = input_names, token_level
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, outputs)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        h = self.backbone(**{k: feed[k] for k in self.input_names}).last_hidden_state
        if self.token_level:
            return self.head(h)
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def fine_tuned(backbone, outputs: int, token_level: bool, lora: bool) -> FineTuned:
    """The full fine-tuning peer, or with ``lora`` the LoRA one (the adapters drawn before the head)."""
    accepted = [n for n in TEXT_INPUTS if n in inspect.signature(backbone.forward).parameters]  # before peft wraps it
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = LORA_TARGETS[backbone.config.model_type]
        backbone = get_peft_model(backbone, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets))
    return FineTuned(backbone, outputs, token_level, accepted)


def side_config(method: str, expert_bits: int | None, bits: int, seed: int, lst_ffn_bits: int | None):
    """(``SideConfig``, backbone ``QuantConfig`` or None) of a side-network method."""
    from mpismoe_edge.config import QuantConfig, SideConfig

    if method.startswith("lst"):
        init = "pruned" if method == "lst-pruned" else "random"
        return SideConfig(dense_ffn=True, expert_bits=lst_ffn_bits, init=init), None
    side = SideConfig(
        expert_bits=expert_bits, interactive=method != "mp-ismoe-side-router", skip=method in SKIP_METHODS
    )
    return side, QuantConfig(bits=bits, seed=seed)


def side_model(method: str, backbone, tok_json: str, path: str, task: str, labels: list[str], *, max_length: int,
               expert_bits: int | None, bits: int, seed: int, lst_ffn_bits: int | None):  # fmt: skip
    """An MP-ISMoE model of a side-network method on ``backbone`` (quantized when the method says so)."""
    from mpismoe_edge.config import ModelConfig
    from mpismoe_edge.model import build_model

    side, quant = side_config(method, expert_bits, bits, seed, lst_ffn_bits)
    cfg = ModelConfig(backbone=path, task=task, labels=labels, max_length=max_length, side=side, quant=quant)
    return build_model(backbone, cfg, tok_json, progress=False)


def run_mpismoe_train(files: list[Path], task: str, backbone: str | None, seed: int, threads: int, out: Path):
    """``mpismoe-train`` on the split files ``files`` (train, validation, test), every option at its
    default but the seed and threads (``backbone``: None for the default); returns (model,
    tokenizer, chosen epoch, epochs trained, trainable parameters as trained)."""
    from mpismoe_edge.cli import train_main
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import load_checkpoint
    from mpismoe_edge.selection import EpochLog

    train, val, test = files
    argv = ["--data", str(train), "--eval-data", str(val), "--test-data", str(test), "--task", task,
            "--seed", str(seed), "--threads", str(threads), "-o", str(out), "-q"]  # fmt: skip
    if backbone is not None:
        argv += ["--backbone", backbone]
    if train_main(argv) != 0:
        raise RuntimeError(f"mpismoe-train {' '.join(argv)} failed")
    result = json.loads((out / "metrics.json").read_text())
    model = load_checkpoint(out / "model.pt")
    epoch = EpochLog(task, result["history"]).best_metrics["epoch"]
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    return model, tok, epoch, result["history"][-1]["epoch"], result["trainable_params"]
