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
import math
import os
import statistics
import subprocess
import sys
import threading
import time

METHODS = ["full-ft", "lora", "lst", "lst-pruned", "mp-ismoe"]
SIDE_METHODS = ("lst", "lst-pruned", "mp-ismoe")  # frozen backbone + ladder side network, trained by mpismoe_edge.train


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS in a thread; ``peak`` is the largest value seen since start."""

    def __init__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


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
    """(model, tokenizer) for ``method``, as the training run builds it."""
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.inference import make_tokenizer
    from mpismoe_edge.model import build_model, default_backbone_path, load_backbone

    path = default_backbone_path()
    backbone, tok_json = load_backbone(path)
    tok = make_tokenizer(tok_json, args.max_length)
    if method in SIDE_METHODS:
        if method.startswith("lst"):  # LST: fp32 backbone, one dense FFN per side block; side init random or pruned
            side, quant = (
                SideConfig(dense_ffn=True, expert_bits=None, init="pruned" if method == "lst-pruned" else "random"),
                None,
            )
        else:
            side, quant = SideConfig(expert_bits=args.expert_bits), QuantConfig(bits=args.bits, seed=args.seed)
        cfg = ModelConfig(backbone=path, labels=train_ds.labels, max_length=args.max_length, side=side, quant=quant)
        return build_model(backbone, cfg, tok_json, progress=False), tok
    model = _Classifier(backbone, len(train_ds.labels))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model.backbone = get_peft_model(
            backbone, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
        )
    return model, tok


def _run_one(method: str, args) -> dict:
    """Build and train ``method``; test accuracy at the epoch chosen on validation, peak RSS (and
    on CUDA peak allocated accelerator memory), params, seconds (whole run, and per epoch of steps)."""
    import torch

    from mpismoe_edge.device import peak_memory, reset_peak_memory, resolve_device
    from mpismoe_edge.train import TrainConfig, train

    train_ds, val_ds, test_ds = _prepare(args)
    device = resolve_device(args.device)
    base = _rss()
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
    train_ds, _, _ = _prepare(args)
    model, tok = _build(method, train_ds, args)
    return _tensor_peak(model, tok, train_ds, args, aux=method in SIDE_METHODS)


def peak_live_bytes(prof) -> int:
    """The peak of net CPU tensor allocations (bytes) over a ``torch.profiler`` window with
    ``profile_memory=True``: allocations and frees replayed in time order."""
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _tensor_peak(model, tok, train_ds, args, aux: bool) -> dict:
    """Model tensor bytes and peak live tensor bytes (MB) over ``args.probe_steps`` training steps
    on the longest batches, with a fresh AdamW (its state is allocated inside the window)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mpismoe_edge.inference import encode, token_lengths
    from mpismoe_edge.loop import Batch, batch_order, train_epoch

    names = getattr(model, "input_names", ["input_ids", "attention_mask", "token_type_ids"])
    lengths = token_lengths(tok, train_ds.texts)
    batches = sorted(batch_order(lengths, args.batch_size, args.seed), key=lambda b: -max(lengths[j] for j in b))
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]
    }
    model_bytes = sum(storages.values())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    steps = (
        Batch(encode(tok, [train_ds.texts[j] for j in idx], names), torch.tensor([train_ds.targets[j] for j in idx]))
        for idx in batches[: args.probe_steps]
    )
    model.train()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_epoch(
            lambda inputs: model(**inputs),
            steps,
            opt,
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
            params,
            "classification",
            aux_loss=model.aux_loss if aux else None,
            grad_clip=None,
            progress=False,
        )
    peak = peak_live_bytes(prof)
    return {"model_tensors_mb": model_bytes / 2**20, "tensor_peak_mb": (model_bytes + peak) / 2**20}


class _Classifier:
    """Mean-pooled encoder + linear head, trained end to end (the full-FT / LoRA peers)."""

    def __new__(cls, backbone, num_labels):
        import torch

        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = backbone
                self.head = torch.nn.Linear(backbone.config.hidden_size, num_labels)

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                h = self.backbone(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                m = attention_mask.unsqueeze(-1).float()
                return self.head((h * m).sum(1) / m.sum(1))

        return Classifier()


def _train_plain(model, tok, train_ds, val_ds, test_ds, args, lr, device):
    """(best validation accuracy, test accuracy at that epoch, trainable params, seconds of each epoch's steps)."""
    import torch

    from mpismoe_edge.inference import encode, token_lengths
    from mpismoe_edge.loop import Batch, batch_order, train_epoch
    from mpismoe_edge.memory import release_free_pages
    from mpismoe_edge.train import TrainConfig, make_optimizer

    names = ["input_ids", "attention_mask", "token_type_ids"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, TrainConfig(lr=lr), args.epochs * math.ceil(len(train_ds) / args.batch_size))
    best, test_acc = -1.0, 0.0
    lengths = token_lengths(tok, train_ds.texts)
    epochs = []
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        batches = (
            Batch(
                encode(tok, [train_ds.texts[j] for j in idx], names, device),
                torch.tensor([train_ds.targets[j] for j in idx]),
            )
            for idx in batch_order(lengths, args.batch_size, args.seed * 1000 + epoch)
        )
        train_epoch(
            lambda inputs: model(**inputs),
            batches,
            opt,
            sched,
            params,
            "classification",
            grad_clip=1.0,
            device=device,
            precision=args.precision,
            after_step=None if args.keep_freed_memory else release_free_pages,
            progress=False,
        )
        epochs.append(time.perf_counter() - start)
        val = _accuracy(model, tok, val_ds, names)
        if val > best:  # the test split is scored only at the epoch validation chooses
            best, test_acc = val, _accuracy(model, tok, test_ds, names)
    return best, test_acc, sum(p.numel() for p in params), epochs


def _accuracy(model, tok, data, names) -> float:
    import torch

    from mpismoe_edge.inference import predict

    return (predict(model, tok, data.texts, names).argmax(-1) == torch.tensor(data.targets)).float().mean().item()


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
