"""``mpismoe-train``: fine-tune an MP-ISMoE side network on a frozen low-bit backbone."""

from __future__ import annotations

import argparse
import json
import sys

from .config import QUANT_METHODS, SIDE_INITS, TASKS, ModelConfig, QuantConfig, SideConfig
from .device import DEVICES, PRECISIONS
from .model import default_backbone_path  # noqa: F401  (its home is model.py; benchmarks import it from here)
from .skip_fit import SKIP_INITS
from .train import TrainConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpismoe-train", description=__doc__)
    p.add_argument("--backbone", help="local Hugging Face encoder directory (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--data", help="training CSV/JSONL with text,label columns (default: bundled tweets, 3-class)")
    p.add_argument("--eval-data", help="validation CSV/JSONL: picks the best epoch, stops early (required with --data)")
    p.add_argument("--test-data", help="test CSV/JSONL, scored once by the final model (optional with --data)")
    p.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="token-classification reads JSONL with 'tokens' (words) and 'tags' (one per word)",
    )
    p.add_argument(
        "--text-column", help="column of --data holding the texts (default 'text'; 'tokens' for token-classification)"
    )
    p.add_argument(
        "--label-column",
        help="column of --data holding the labels (default 'label'; 'tags' for token-classification, "
        "e.g. 'ner_tags' in a Hugging Face CoNLL export)",
    )
    p.add_argument("-o", "--out", default="runs/mpismoe", help="output directory (model.pt, metrics.json, last.pt)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument(
        "--n-val", type=int, default=1000, help="validation rows of the bundled data (disjoint from train and test)"
    )
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--bits", type=int, default=4, help="backbone bit width (2/3/4/8); 0 keeps it fp32")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits-map", help="JSON {layer or pattern: bits} for mixed precision")
    p.add_argument("--quant-method", choices=QUANT_METHODS, default=QuantConfig.method)
    p.add_argument(
        "--float-embeddings",
        action="store_true",
        help="keep the backbone's embedding tables fp32 (default: packed at --bits)",
    )
    p.add_argument("--reduction", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--shared-expert", action="store_true")
    p.add_argument("--dense-ffn", action="store_true", help="one dense FFN per side block (LST baseline)")
    p.add_argument("--no-interactive", action="store_true", help="router sees only the side token")
    p.add_argument(
        "--skip", action="store_true", help="add a linear map from the frozen backbone's pooled states to the outputs"
    )
    p.add_argument(
        "--skip-init",
        choices=SKIP_INITS,
        default=TrainConfig.skip_init,
        help="with --skip: ridge fits it in closed form and freezes it before training (default); "
        "zero trains it from zero",
    )
    p.add_argument(
        "--side-init",
        choices=SIDE_INITS,
        default=SideConfig.init,
        help="side network's start: slices of the backbone (down-projections, FFN units to experts) or random",
    )
    p.add_argument(
        "--expert-bits",
        type=int,
        default=SideConfig.expert_bits,
        help=f"quantization-aware training + packing of experts (default {SideConfig.expert_bits}); 0 keeps them fp32",
    )
    p.add_argument(
        "--epochs", type=int, default=TrainConfig.epochs, help="raised on small data to take --min-steps steps"
    )
    p.add_argument(
        "--min-steps",
        type=int,
        default=TrainConfig.min_steps,
        help="optimizer steps at least (default %(default)s; 0: exactly --epochs): small data trains for more epochs, "
        "and early stopping waits for them",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=TrainConfig.patience,
        help="epochs without a better validation metric (ties broken by the validation loss) before stopping early",
    )
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (torch.set_num_threads)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=TrainConfig.device,
        help="where the backbone, the custom ops and the side network run (auto: CUDA when there is one; "
        "under torchrun each rank takes GPU LOCAL_RANK)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16/fp16: autocast of the forward pass, the packed backbone dequantized to that dtype",
    )
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="leave glibc's malloc policy and oneDNN's kernel cache as they are: faster training, "
        "higher resident memory (see README)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.keep_freed_memory:
        from .memory import bound_kernel_cache

        bound_kernel_cache()  # before any torch computation, or oneDNN ignores it
    try:
        return _train(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from .distributed import leave

        leave()


def _train(args) -> int:
    import torch

    from .data import load_default, load_default_validation, load_splits
    from .device import resolve_device
    from .model import build_model, load_backbone
    from .train import train

    resolve_device(args.device)  # a device this machine lacks fails now, before any loading
    if args.data:
        if not args.eval_data:
            raise ValueError("--data needs --eval-data")
        train_ds, eval_ds, test_ds = load_splits(
            [args.data, args.eval_data, args.test_data], args.task, args.text_column, args.label_column
        )
    else:
        if args.task != "classification":
            raise ValueError(f"the bundled data is 3-class sentiment; --task {args.task} needs --data and --eval-data")
        if args.test_data:
            raise ValueError("--test-data needs --data (the bundled data has its own test split)")
        train_ds, test_ds = load_default(args.n_train, args.n_test, seed=args.seed)
        eval_ds = load_default_validation(args.n_val, args.n_train, args.n_test, seed=args.seed)
    quant = None
    if args.bits:
        bits_map = json.loads(args.bits_map) if args.bits_map else {}
        quant = QuantConfig(
            bits=args.bits,
            group_size=args.group_size,
            method=args.quant_method,
            bits_map=bits_map,
            seed=args.seed,
            embeddings=not args.float_embeddings,
        )
    side = SideConfig(
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
    backbone_path = args.backbone or default_backbone_path()
    config = ModelConfig(
        backbone=backbone_path,
        task=args.task,
        labels=train_ds.labels,
        max_length=args.max_length,
        side=side,
        quant=quant,
    )
    backbone, tokenizer_json = load_backbone(backbone_path)
    torch.manual_seed(args.seed)  # the side network's initial weights, so that --seed fixes the whole run
    from .distributed import launched_rank

    model = build_model(backbone, config, tokenizer_json, progress=not args.quiet and launched_rank() == 0)
    cfg = TrainConfig(
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
    result = train(
        model, train_ds, eval_ds, cfg, args.out, resume=args.resume, progress=not args.quiet, test_data=test_ds
    )
    if launched_rank() == 0:
        print(
            json.dumps(
                {
                    "out": args.out,
                    "validation": result.final,
                    "test": result.test,
                    "train_seconds": round(result.train_seconds, 1),
                    "trainable_params": result.trainable_params,
                    "world_size": result.world_size,
                    "device": result.device,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
