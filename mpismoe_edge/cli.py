"""``mpismoe-train``: fine-tune an MP-ISMoE side network on a frozen low-bit backbone.

Every default comes from the configs (``config.py``) or the bundled data's split (``data.py``);
``--help`` shows them. Options are checked before the backbone is loaded or quantized.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import (
    DEVICES,
    PRECISIONS,
    QUANT_METHODS,
    SIDE_INITS,
    SKIP_INITS,
    TASKS,
    ModelConfig,
    QuantConfig,
    SideConfig,
    TrainConfig,
)
from .data import DEFAULT_TEST_ROWS, DEFAULT_TRAIN_ROWS, DEFAULT_VAL_ROWS
from .files import WriteError

EXIT_CODES = """exit codes: 0 trained; 2 bad input (an option, a data file, a --resume whose last.pt is
unreadable or was made with other settings) or an output that cannot be written (the run stops;
the last finished epoch's last.pt is kept for --resume)"""


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it has none (``None``) or is a switch (``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpismoe-train",
        description="Fine-tune an MP-ISMoE side network on a frozen low-bit backbone.",
        epilog=EXIT_CODES,
        formatter_class=_DefaultsHelp,
    )
    data = p.add_argument_group("data")
    data.add_argument("--backbone", help="local Hugging Face encoder directory (default: bundled all-MiniLM-L6-v2)")
    data.add_argument("--data", help="training CSV/JSONL with text,label columns (default: bundled tweets, 3-class)")
    data.add_argument(
        "--eval-data", help="validation CSV/JSONL: picks the best epoch, stops early (needed with --data)"
    )
    data.add_argument("--test-data", help="test CSV/JSONL, scored once by the final model (optional with --data)")
    data.add_argument(
        "--task",
        choices=TASKS,
        default=ModelConfig.task,
        help="token-classification reads JSONL with 'tokens' (words) and 'tags' (one per word)",
    )
    data.add_argument("--text-column", help="column of --data holding the texts ('tokens' for token-classification)")
    data.add_argument(
        "--label-column",
        help="column of --data holding the labels ('tags' for token-classification, e.g. 'ner_tags' in a Hugging "
        "Face CoNLL export)",
    )
    data.add_argument("--n-train", type=int, default=DEFAULT_TRAIN_ROWS, help="training rows of the bundled data")
    data.add_argument("--n-test", type=int, default=DEFAULT_TEST_ROWS, help="test rows of the bundled data")
    data.add_argument(
        "--n-val", type=int, default=DEFAULT_VAL_ROWS, help="validation rows of the bundled data (disjoint from both)"
    )
    data.add_argument("--max-length", type=int, default=ModelConfig.max_length, help="tokens per text")

    quant = p.add_argument_group("backbone quantization")
    quant.add_argument("--bits", type=int, default=QuantConfig.bits, help="bit width (2/3/4/8); 0 keeps it fp32")
    quant.add_argument("--group-size", type=int, default=QuantConfig.group_size, help="weights per scale and zero")
    quant.add_argument(
        "--bits-map", help="JSON {layer or pattern: bits} for mixed precision, e.g. '{\"*.attention.*\": 8}'"
    )
    quant.add_argument("--quant-method", choices=QUANT_METHODS, default=QuantConfig.method, help="quantizer")
    quant.add_argument(
        "--float-embeddings", action="store_true", help="keep the embedding tables fp32 (default: packed at --bits)"
    )
    quant.add_argument(
        "--backbone-from",
        metavar="CHECKPOINT",
        help="train on the quantized backbone of this model.pt, bit for bit, instead of quantizing again (its "
        "quantization settings are taken; --backbone, if given, is only where the float weights for the side "
        "network's pruned init are read): tasks on one backbone can share its pass (mpismoe-export a b -o OUT)",
    )

    side = p.add_argument_group("side network")
    side.add_argument("--reduction", type=int, default=SideConfig.reduction, help="side width = backbone hidden / this")
    side.add_argument("--experts", type=int, default=SideConfig.num_experts, help="experts per ISMoE layer")
    side.add_argument("--top-k", type=int, default=SideConfig.top_k, help="experts each token is routed to")
    side.add_argument("--shared-expert", action="store_true", help="one more expert every token goes through")
    side.add_argument("--dense-ffn", action="store_true", help="one dense FFN per side block (the LST baseline)")
    side.add_argument("--no-interactive", action="store_true", help="the router sees only the side token")
    side.add_argument(
        "--skip", action="store_true", help="add a linear map from the frozen backbone's pooled states to the outputs"
    )
    side.add_argument(
        "--skip-init",
        choices=SKIP_INITS,
        default=TrainConfig.skip_init,
        help="with --skip: ridge fits it in closed form and freezes it before training; zero trains it from zero",
    )
    side.add_argument(
        "--side-init",
        choices=SIDE_INITS,
        default=SideConfig.init,
        help="the side network's start: slices of the backbone (down-projections, FFN units to experts) or random",
    )
    side.add_argument(
        "--expert-bits",
        type=int,
        default=SideConfig.expert_bits,
        help="quantization-aware training + packing of the experts; 0 keeps them fp32",
    )

    train = p.add_argument_group("training")
    train.add_argument("-o", "--out", default="runs/mpismoe", help="output folder (model.pt, metrics.json, last.pt)")
    train.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="raised on small data to take --min-steps steps"
    )
    train.add_argument(
        "--min-steps",
        type=int,
        default=TrainConfig.min_steps,
        help="optimizer steps at least (0: exactly --epochs): small data trains for more epochs, and early "
        "stopping waits for them",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=TrainConfig.patience,
        help="epochs without a better validation metric (ties broken by the validation loss) before stopping early",
    )
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="the global batch")
    train.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate")
    train.add_argument("--seed", type=int, default=TrainConfig.seed, help="fixes the data split, init and order")
    train.add_argument("--threads", type=int, default=TrainConfig.threads, help="CPU threads per process")
    train.add_argument(
        "--device",
        choices=DEVICES,
        default=TrainConfig.device,
        help="where the backbone, the custom ops and the side network run (auto: CUDA when there is one; "
        "under torchrun each rank takes GPU LOCAL_RANK)",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=TrainConfig.precision,
        help="bf16/fp16: autocast of the forward pass, the packed backbone dequantized to that dtype",
    )
    train.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="leave glibc's malloc policy and oneDNN's kernel cache as they are: faster training, "
        "higher resident memory (see README)",
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (made with the same settings)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def train_main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.keep_freed_memory:
        from .memory import bound_kernel_cache

        bound_kernel_cache()  # before any torch computation, or oneDNN ignores it
    try:
        if args.backbone_from:
            _check_backbone_from(args, parser)
        return _train(args)
    except (ValueError, FileNotFoundError, WriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from .distributed import leave

        leave()


def _train_config(args) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        min_steps=args.min_steps,
        patience=args.patience,
        skip_init=args.skip_init,
        return_freed_memory=not args.keep_freed_memory,
        device=args.device,
        precision=args.precision,
    )


def _quant_config(args) -> QuantConfig | None:
    if not args.bits:
        return None
    try:
        bits_map = json.loads(args.bits_map) if args.bits_map else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--bits-map is not valid JSON ({e.msg} at character {e.pos}): {args.bits_map}") from None
    if not isinstance(bits_map, dict):
        raise ValueError(f"--bits-map must be a JSON object {{layer or pattern: bits}}, got {args.bits_map}")
    return QuantConfig(
        bits=args.bits,
        group_size=args.group_size,
        method=args.quant_method,
        bits_map=bits_map,
        seed=args.seed,
        embeddings=not args.float_embeddings,
    )


QUANT_OPTIONS = ("bits", "group_size", "bits_map", "quant_method", "float_embeddings")


def _check_backbone_from(args, parser: argparse.ArgumentParser) -> None:
    """--backbone-from takes the quantization from its checkpoint: a quantization option set too
    would be ignored, so it is an error."""
    given = [name for name in QUANT_OPTIONS if getattr(args, name) != parser.get_default(name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"--backbone-from takes the backbone's quantization from {args.backbone_from}; drop {flags}")


def _side_config(args) -> SideConfig:
    return SideConfig(
        reduction=args.reduction,
        num_experts=args.experts,
        top_k=args.top_k,
        shared_expert=args.shared_expert,
        dense_ffn=args.dense_ffn,
        interactive=not args.no_interactive,
        skip=args.skip,
        expert_bits=args.expert_bits or None,
        init=args.side_init,
    )


def _datasets(args):
    from .data import load_default, load_default_validation, load_splits

    if args.data:
        if not args.eval_data:
            raise ValueError("--data needs --eval-data")
        return load_splits([args.data, args.eval_data, args.test_data], args.task, args.text_column, args.label_column)
    if args.task != "classification":
        raise ValueError(f"the bundled data is 3-class sentiment; --task {args.task} needs --data and --eval-data")
    if args.test_data:
        raise ValueError("--test-data needs --data (the bundled data has its own test split)")
    train_ds, test_ds = load_default(args.n_train, args.n_test, seed=args.seed)
    return train_ds, load_default_validation(args.n_val, args.n_train, args.n_test, seed=args.seed), test_ds


def _train(args) -> int:
    from pathlib import Path

    import torch

    from .device import resolve_device
    from .distributed import launched_rank
    from .model import build_model, default_backbone_path, load_backbone
    from .resume import read_last, run_settings
    from .runtime.spec import LAST_CHECKPOINT_FILE
    from .train import train

    # every check that needs no backbone runs first: a bad option costs no quantization
    cfg = _train_config(args)
    resolve_device(args.device)  # a device this machine lacks fails now
    quant, side = _quant_config(args), _side_config(args)
    train_ds, eval_ds, test_ds = _datasets(args)
    shared = None
    if args.backbone_from:  # its quantized backbone, read before any slow work
        from .model import shared_backbone

        source, backbone_state, shared_tokenizer, shared_print = shared = shared_backbone(args.backbone_from)
        quant, provenance = source.quant, source.backbone
        backbone_path = args.backbone or source.backbone
    else:
        backbone_path = provenance = args.backbone or default_backbone_path()
    config = ModelConfig(
        backbone=provenance,
        task=args.task,
        labels=train_ds.labels,
        max_length=args.max_length,
        side=side,
        quant=quant,
    )
    if args.resume:
        read_last(Path(args.out) / LAST_CHECKPOINT_FILE, run_settings(config, cfg))
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    backbone, tokenizer_json = load_backbone(backbone_path)
    torch.manual_seed(args.seed)  # the side network's initial weights, so that --seed fixes the whole run
    if shared is None:
        model = build_model(backbone, config, tokenizer_json, progress=not args.quiet and launched_rank() == 0)
    else:
        model = build_model(backbone, config, shared_tokenizer or tokenizer_json, backbone_state=backbone_state)
        if model.backbone_fingerprint != shared_print:
            raise ValueError(f"{args.backbone_from}: its backbone does not match its fingerprint {shared_print}")
    result = train(
        model, train_ds, eval_ds, cfg, args.out, resume=args.resume, progress=not args.quiet, test_data=test_ds
    )
    if launched_rank() == 0:
        summary = {
            "out": args.out,
            "validation": result.final,
            "test": result.test,
            "train_seconds": round(result.train_seconds, 1),
            "trainable_params": result.trainable_params,
            "world_size": result.world_size,
            "device": result.device,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
