"""Full fine-tuning vs LoRA vs LST vs MP-ISMoE on the default task (MiniLM-L6, tweets, 3 classes).

Every method sees the same split, seed, batch order, tokenizer, epochs and evaluation: a
validation split (``--n-val`` tweets, disjoint from train and test) chooses each run's best
epoch, and the test split is scored only by the model of that epoch. Each method runs in its
own subprocess so that its memory is its own. Two LST runs: ``lst`` starts its side network
from random weights, ``lst-pruned`` from slices of the backbone as MP-ISMoE does
(``SideConfig.init``, side/prune.py); a dense side FFN inherits only 1/8 of the backbone FFN's units.
Two memory figures per method:

* **peak live tensors** (torch profiler, ``profile_memory``): the bytes of the model's own
  tensors (parameters and buffers) plus the peak of net tensor allocations over
  ``--probe-steps`` training steps on the longest batches (worst-case activations), with a
  fresh AdamW so that gradients and optimizer state are allocated inside the window; in a
  process of its own (the profiler's records would inflate the training run's RSS). This is
  weights + gradients + optimizer state + activations, free of allocator effects.
* **peak RSS**: resident set size sampled from /proc every 5 ms during model build (load,
  quantization) and training, minus the RSS just before the build (Python, torch, the
  backbone's modeling code and the data already loaded). It adds what the C allocator keeps
  after frees, and the float backbone held while it is quantized.

Every method's process first calls ``mpismoe_edge.memory.return_freed_memory`` and, after each
training step, ``release_free_pages``, with oneDNN's kernel cache capped (``bound_kernel_cache``),
which is what ``mpismoe-train`` does: glibc gives freed activations and heap holes back to the
system for all of them alike. ``--keep-freed-memory`` leaves the defaults of glibc and oneDNN.
``--preload`` runs every method under another allocator (LD_PRELOAD), e.g. jemalloc.

``--seeds 0 1 2`` trains every method once per seed (the split, initialisation, batch order and
GNP-IQ noise follow the seed) and reports the mean accuracy and each seed's; the tensor probe
runs once per method, at the first seed.

    python benchmarks/train.py [--seeds 0] [--epochs 3] [--n-train 4000] [--n-test 2000] [--n-val 1000]
                               [--probe-steps 8]
                               [--preload LIB] [--device cpu|cuda|auto] [--precision fp32|bf16|fp16]

On CUDA the table adds each method's peak allocated accelerator memory (``torch.cuda.max_memory_allocated``).
``--speed`` only times an epoch of training steps: MP-ISMoE vs LST, each in one process x 2 threads
and in 2 torchrun processes x 1 thread (gloo), interleaved ``--repeats`` times (``--arms`` picks some):

    python benchmarks/train.py --speed --repeats 3 --n-train 640 --n-val 100 --n-test 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run by path: import benchmarks.* from the repository root (see benchmarks/__init__.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.measure import PeakRSS, rss

METHODS = ["full-ft", "lora", "lst", "lst-pruned", "mp-ismoe"]
SIDE_METHODS = ("lst", "lst-pruned", "mp-ismoe")  # frozen backbone + ladder side network, trained by mpismoe_edge.train
CLASSIFICATION = {"task": "classification"}  # the tweets' task kind, as benchmarks/scoring.py reads it


def _prepare(args):
    import torch

    from mpismoe_edge.data import load_default, load_default_validation
    from mpismoe_edge.memory import bound_kernel_cache, return_freed_memory

    if not args.keep_freed_memory:
        bound_kernel_cache()
        return_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ds, test_ds = load_default(args.n_train, args.n_test, seed=args.seed)
    val_ds = load_default_validation(args.n_val, args.n_train, args.n_test, seed=args.seed)
    import peft  # noqa: F401  (code, not training memory: imported before the baseline)
    import transformers.models.bert.modeling_bert  # noqa: F401

    return train_ds, val_ds, test_ds


def _build(method: str, train_ds, args):
    """(model, tokenizer) for ``method``, as the training run builds it (``benchmarks/peers.py``)."""
    from benchmarks.peers import fine_tuned, side_model
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import default_backbone_path, load_backbone

    path = default_backbone_path()
    backbone, tok_json = load_backbone(path)
    tok = make_tokenizer(tok_json, args.max_length)
    if method in SIDE_METHODS:  # LST: fp32 backbone, one float dense FFN per side block; side init random or pruned
        model = side_model(
            method, backbone, tok_json, path, "classification", train_ds.labels, max_length=args.max_length,
            expert_bits=args.expert_bits, bits=args.bits, seed=args.seed, lst_ffn_bits=None,
        )  # fmt: skip
        return model, tok
    return fine_tuned(backbone, len(train_ds.labels), token_level=False, lora=method == "lora"), tok


def _run_one(method: str, args) -> dict:
    """Build and train ``method``; test accuracy at the epoch chosen on validation, peak RSS (and
    on CUDA peak allocated accelerator memory), params, seconds (whole run, and per epoch of steps)."""
    import torch

    from mpismoe_edge.device import peak_memory, reset_peak_memory, resolve_device
    from mpismoe_edge.train import TrainConfig, train

    train_ds, val_ds, test_ds = _prepare(args)
    device = resolve_device(args.device)
    base = rss()
    reset_peak_memory(device)
    with PeakRSS() as mem:
        start = time.perf_counter()
        model, tok = _build(method, train_ds, args)
        if method in SIDE_METHODS:
            tcfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.side_lr,
                seed=args.seed,
                patience=args.epochs,
                min_steps=0,
                return_freed_memory=not args.keep_freed_memory,
                device=args.device,
                precision=args.precision,
            )
            res = train(
                model, train_ds, val_ds, tcfg, os.path.join(args.workdir, method), progress=False, test_data=test_ds
            )
            val, acc, params = res.final["accuracy"], res.test["accuracy"], res.trainable_params
            epochs = [h["seconds"] for h in res.history]
        else:
            lr = args.full_lr if method == "full-ft" else args.lora_lr
            val, acc, params, epochs = _train_plain(model.to(device), tok, train_ds, val_ds, test_ds, args, lr, device)
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {
        "method": method,
        "accuracy": acc,
        "val_accuracy": val,
        "peak_mb": (mem.peak - base) / 2**20,
        "cuda_peak_mb": peak_memory(device).get("peak_cuda_allocated_mb"),
        "trainable_params": params,
        "seconds": seconds,
        "epoch_seconds": epochs,
    }


def _probe_one(method: str, args) -> dict:
    """Build ``method`` and measure its training-step tensor memory (a process of its own, so
    that the profiler's own records stay out of the training run's RSS)."""
    from benchmarks.measure import tensor_peak

    train_ds, _, _ = _prepare(args)
    model, tok = _build(method, train_ds, args)
    return tensor_peak(
        model, tok, train_ds, "classification", batch_size=args.batch_size, seed=args.seed, steps=args.probe_steps,
        aux=method in SIDE_METHODS,
    )  # fmt: skip


def _train_plain(model, tok, train_ds, val_ds, test_ds, args, lr, device):
    """Full fine-tuning / LoRA by ``benchmarks/peer_training.py`` for exactly ``--epochs`` (the
    side methods' patience and minimum steps here); (validation accuracy of the chosen epoch, test
    accuracy at it, trainable params, seconds of each epoch's steps)."""
    from benchmarks.peer_training import fit
    from benchmarks.scoring import score
    from mpismoe_edge.memory import release_free_pages

    run = fit(
        model, tok, "classification", train_ds, lambda: score(model, tok, val_ds, CLASSIFICATION, model.input_names),
        lambda: score(model, tok, test_ds, CLASSIFICATION, model.input_names)["accuracy"],  # only at a better epoch
        lr=lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, patience=args.epochs, min_steps=0,
        device=device, precision=args.precision, after_step=None if args.keep_freed_memory else release_free_pages,
    )  # fmt: skip
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return run.log.best_metrics["accuracy"], run.log.best, params, run.epoch_seconds


SPEED_ARMS = {  # name: (processes, threads per process, mpismoe-train arguments)
    "mp-ismoe, 1 process x 2 threads": (1, 2, ["--expert-bits", "4"]),
    "lst, 1 process x 2 threads": (1, 2, ["--bits", "0", "--dense-ffn", "--side-init", "random"]),
    "mp-ismoe, 2 processes x 1 thread (torchrun, gloo)": (2, 1, ["--expert-bits", "4"]),
    "lst, 2 processes x 1 thread (torchrun, gloo)": (2, 1, ["--bits", "0", "--dense-ffn", "--side-init", "random"]),
}


def _speed(args) -> None:
    """Seconds per epoch of training steps (``metrics.json`` history), the arms (``--arms``: those
    whose name starts with one of them) interleaved ``--repeats`` times, each a fresh
    ``mpismoe-train`` process (or torchrun job); prints a table. "vs LST" compares an arm with
    the LST arm of the same processes x threads when it ran."""
    common = [
        "--epochs",
        "1",
        "--min-steps",
        "0",
        "--n-train",
        str(args.n_train),
        "--n-val",
        str(args.n_val),
        "--n-test",
        str(args.n_test),
        "--batch-size",
        str(args.batch_size),
        "--quant-method",
        "rtn",
        "--device",
        args.device,
        "--precision",
        args.precision,
        "-q",
    ]
    arms = {k: v for k, v in SPEED_ARMS.items() if not args.arms or any(k.startswith(a) for a in args.arms)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    rss: dict[str, list[float]] = {name: [] for name in arms}  # rank 0's peak since its start
    for rep in range(args.repeats):
        for name, (procs, threads, extra) in arms.items():
            out = os.path.join(args.workdir, f"speed-{rep}-{len(times[name])}-{name.split(',')[0]}-{procs}")
            launch = (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                if procs > 1
                else [sys.executable]
            )
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            subprocess.run(
                [*launch, "-m", "mpismoe_edge.cli", "-o", out, "--threads", str(threads), *common, *extra],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            with open(os.path.join(out, "metrics.json")) as f:
                metrics = json.load(f)
            times[name].append(metrics["history"][0]["seconds"])
            rss[name].append(metrics["peak_rss_mb"])
            print(f"# repeat {rep} {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    lst = {arms[n][:2]: t for n, t in med.items() if n.startswith("lst,")}
    one = med.get("mp-ismoe, 1 process x 2 threads")
    print(
        f"| arm | epoch of steps (s, median of {args.repeats}) | per repeat | rows/s | vs LST (same procs x threads) "
        "| vs MP-ISMoE 1 x 2 | peak RSS (MB, rank 0, max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        ref = lst.get(arms[name][:2])
        print(
            f"| {name} | {med[name]:.1f} | {' / '.join(f'{t:.1f}' for t in ts)} | {args.n_train / med[name]:.1f} | "
            f"{f'{med[name] / ref:.2f}x' if ref else '-'} | {f'{med[name] / one:.2f}x' if one else '-'} | "
            f"{max(rss[name]):.0f} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=1000, help="held-out rows that choose each method's best epoch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--expert-bits", type=int, default=4)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--side-lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where every method trains")
    p.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast of every method's forward"
    )
    p.add_argument(
        "--probe-steps", type=int, default=8, help="training steps on the longest batches for the tensor-memory probe"
    )
    p.add_argument("--workdir", default="runs/bench-train")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="leave glibc's malloc policy and oneDNN's kernel cache as they are",
    )
    p.add_argument(
        "--preload",
        help="a malloc library for every method's processes (LD_PRELOAD), "
        "e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    )
    p.add_argument(
        "--speed",
        action="store_true",
        help="only time an epoch: MP-ISMoE vs LST, and 2 processes x 1 thread vs "
        "1 process x 2 threads (interleaved, --repeats times; RTN backbone)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arms", nargs="+", help="with --speed: only the arms whose name starts with one of these")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # the one seed of a --one/--probe child
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.speed:
        _speed(args)
        return
    if args.one or args.probe:
        print(json.dumps(_run_one(args.one, args) if args.one else _probe_one(args.probe, args)))
        return
    env = dict(os.environ)
    if args.preload:
        if not os.path.isfile(args.preload):
            p.error(f"--preload: no such file {args.preload}")
        env["LD_PRELOAD"] = args.preload
    passthrough = sys.argv[1:]

    def child(mode: str, method: str, seed: int) -> dict:
        cmd = [sys.executable, __file__, mode, method, "--seed", str(seed), *passthrough]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows = []
    for method in args.methods:
        row = child("--probe", method, args.seeds[0])
        runs = []
        for seed in args.seeds:
            runs.append(child("--one", method, seed))
            print(f"# done {method} seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
        row.update(
            method=method,
            trainable_params=runs[0]["trainable_params"],
            accuracies=[r["accuracy"] for r in runs],
            accuracy=statistics.mean(r["accuracy"] for r in runs),
            val_accuracy=statistics.mean(r["val_accuracy"] for r in runs),
            peak_mb=max(r["peak_mb"] for r in runs),
            seconds=statistics.median(r["seconds"] for r in runs),
            epoch_seconds=statistics.median(e for r in runs for e in r["epoch_seconds"]),
            cuda_peak_mb=max((r["cuda_peak_mb"] for r in runs if r["cuda_peak_mb"] is not None), default=None),
        )
        rows.append(row)
    ref = {r["method"]: r for r in rows}

    def ratio(r, key, base):
        return f"{r[key] / ref[base][key]:.2f}x" if base in ref else "-"

    seeds = ", ".join(map(str, args.seeds))
    cuda = all(r["cuda_peak_mb"] is not None for r in rows)
    print(
        f"| method | test accuracy (mean of seeds {seeds}) | per seed | validation accuracy (mean) | "
        "peak live tensors (MB) | vs full FT | vs LST "
        "| peak RSS (MB, max over seeds) | vs full FT | vs LST | model tensors (MB) | trainable params | "
        "time (s, median) "
        "| epoch of steps (s, median) | vs LST |" + (" peak CUDA allocated (MB) | vs LST |" if cuda else "")
    )
    print("|---" * (15 + 2 * cuda) + "|")
    for r in rows:
        per = " / ".join(f"{100 * a:.2f}" for a in r["accuracies"])
        print(
            f"| {r['method']} | {100 * r['accuracy']:.2f} | {per} | {100 * r['val_accuracy']:.2f} | "
            f"{r['tensor_peak_mb']:.0f} | {ratio(r, 'tensor_peak_mb', 'full-ft')} "
            f"| {ratio(r, 'tensor_peak_mb', 'lst')} | {r['peak_mb']:.0f} | {ratio(r, 'peak_mb', 'full-ft')} "
            f"| {ratio(r, 'peak_mb', 'lst')} | {r['model_tensors_mb']:.1f} | {r['trainable_params']:,} | "
            f"{r['seconds']:.0f} "
            f"| {r['epoch_seconds']:.1f} | {ratio(r, 'epoch_seconds', 'lst')} |"
            + (f" {r['cuda_peak_mb']:.0f} | {ratio(r, 'cuda_peak_mb', 'lst')} |" if cuda else "")
        )
    if "mp-ismoe" in ref and "lst" in ref:
        m, lst = ref["mp-ismoe"], ref["lst"]
        paired = " / ".join(f"{100 * (a - b):+.2f}" for a, b in zip(m["accuracies"], lst["accuracies"]))
        print(
            f"\nMP-ISMoE vs LST: accuracy {100 * (m['accuracy'] - lst['accuracy']):+.2f} points (per seed {paired}), "
            f"live tensors {m['tensor_peak_mb'] / lst['tensor_peak_mb']:.2f}x, RSS {m['peak_mb'] / lst['peak_mb']:.2f}x"
        )
    if "mp-ismoe" in ref and "lst-pruned" in ref:
        m, lst = ref["mp-ismoe"], ref["lst-pruned"]
        print(f"MP-ISMoE vs LST with pruned init: accuracy {100 * (m['accuracy'] - lst['accuracy']):+.2f} points")
    if "mp-ismoe" in ref and "full-ft" in ref:
        m, f = ref["mp-ismoe"], ref["full-ft"]
        print(
            f"MP-ISMoE vs full FT: accuracy {100 * (m['accuracy'] - f['accuracy']):+.2f} points, "
            f"live tensors {m['tensor_peak_mb'] / f['tensor_peak_mb']:.2f}x, RSS {m['peak_mb'] / f['peak_mb']:.2f}x"
        )


if __name__ == "__main__":
    main()
