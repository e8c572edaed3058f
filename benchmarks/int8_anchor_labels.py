"""What the int8 anchor itself loses in labels: a fully fine-tuned MiniLM-L6 on the bundled tweets,
its PyTorch logits against its int8 export (the way a CPU user makes one: Hugging Face's exporter,
ORT's BERT optimizer, ``quantize_dynamic``), on the 500 test tweets. The bar an ``ort-int8`` export
of MP-ISMoE is judged against when int8 activations cannot reach 99.5% label agreement.

Training is ``benchmarks/tasks.py``'s full fine-tuning (``peer_training.fit``: mean-pooled head,
lr 5e-5, batch 32, epochs chosen on the held-out validation tweets) on the quickstart's rows.

    python benchmarks/int8_anchor_labels.py [--epochs 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import onnxruntime as ort
import torch

TEXT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def export_int8(model: torch.nn.Module, work: Path) -> Path:
    """The fine-tuned model exported as benchmarks/export.py's int8 anchor is (Hugging Face's
    exporter, ORT's BERT optimizer, ``quantize_dynamic``); the int8 file."""
    from benchmarks.export import export_hf_way, int8_the_ort_way

    fp32, opt, int8 = work / "fp32.onnx", work / "fp32-opt.onnx", work / "int8.onnx"
    export_hf_way(model, fp32, output="logits", per_token=False)
    cfg = model.backbone.config
    int8_the_ort_way(fp32, opt, int8, heads=cfg.num_attention_heads, hidden=cfg.hidden_size)
    return int8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from benchmarks.peer_training import fit, trainable_state
    from benchmarks.peers import fine_tuned
    from benchmarks.scoring import score
    from mpismoe_edge.data import load_default, load_default_validation
    from mpismoe_edge.inference import encode, make_tokenizer
    from mpismoe_edge.model import load_backbone

    torch.manual_seed(args.seed)
    train, test = load_default()
    val = load_default_validation()
    info = {"task": "classification", "labels": train.labels}
    backbone, tok_json = load_backbone()
    backbone.set_attn_implementation("eager")  # the graph ORT's BERT optimizer fuses
    tok = make_tokenizer(tok_json, 64)
    model = fine_tuned(backbone, len(train.labels), token_level=False, lora=False)
    t0 = time.perf_counter()
    run = fit(
        model, tok, "classification", train, lambda: score(model, tok, val, info, model.input_names),
        lambda: trainable_state(model), lr=5e-5, epochs=args.epochs, batch_size=32, seed=args.seed,
        patience=args.epochs, min_steps=0,
    )  # fmt: skip
    model.load_state_dict(run.log.best, strict=False)
    model.eval()
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="mpismoe-anchor-") as tmp:
        path = export_int8(model, Path(tmp))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ref, got = [], []
        for i in range(0, len(test), 32):
            feed = encode(tok, list(test.texts[i : i + 32]), TEXT_INPUTS)
            with torch.no_grad():
                ref.append(model(**feed).numpy())
            got.append(sess.run(None, {k: v.numpy() for k, v in feed.items()})[0])
    ref_l, got_l = np.concatenate(ref), np.concatenate(got)
    gold = np.asarray(test.targets)
    print(
        f"\n### Full fine-tuning of MiniLM-L6 on the bundled tweets "
        f"(epoch {run.epoch} of {run.epochs}, {seconds:.0f} s)\n"
    )
    print("| model | test accuracy | label agreement with PyTorch | max abs logit diff |")
    print("|---|---|---|---|")
    print(f"| PyTorch | {100 * (ref_l.argmax(-1) == gold).mean():.2f} | | |")
    print(
        f"| its int8 export (HF exporter + ORT optimizer + quantize_dynamic) | "
        f"{100 * (got_l.argmax(-1) == gold).mean():.2f} | {100 * (got_l.argmax(-1) == ref_l.argmax(-1)).mean():.2f}% | "
        f"{np.abs(got_l - ref_l).max():.3f} |"
    )


if __name__ == "__main__":
    main()
